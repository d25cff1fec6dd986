// ckpt-tool diff A B: exit 0 when equal, 1 when different, 2 on error (main: the diff column of kErrorKinds).
#include <fmt/format.h>
#include <fmt/ostream.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <unordered_map>

#include "ckpt/exec/compare.hpp"
#include "ckpt/exec/source_check.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/io/parallel.hpp"
#include "ckpt/layout/hf_opt.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/plan/stitch.hpp"
#include "command_line.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "usage.hpp"

namespace ckpt::cli {

using json = nlohmann::ordered_json;

namespace {

// One side of a comparison: a single file's tensors as they are, or a set of
// shard files consolidated on the fly (the stitched model, "model/<key>"), or
// a file or set of a layout that is one state dict (safetensors: "model/<key>").
struct Side {
  explicit Side(PlanInputs opened) : inputs(std::move(opened)), layout(&input_layout(inputs.manifest())) {}
  PlanInputs inputs;
  const InputLayout* layout;
  std::vector<NamedTensor> tensors;
  std::size_t object_tensors = 0;  // the last of `tensors` lie inside object items (StateDict::object_tensors)
  std::vector<NestedItem> items;   // a set's items in order, where each nests (StateDict::items)
  bool consolidated = false;
  // A layout that is one state dict and nothing else (no training layout).
  bool state_dict_layout() const { return !layout->training; }
  // The side's files as plan sources: their records and CRCs, for the CRC check.
  Plan crc_sources() const {
    Plan plan;
    for (std::size_t i = 0; i < inputs.files().size(); ++i) plan.add_source(inputs.source(static_cast<int>(i)));
    return plan;
  }
};

// The metaseq state dict of a torch side under transformers' OPT names
// (--names hf-opt): the side's model/ tensors through the one mapping table.
std::vector<NamedTensor> hf_opt_named(const std::vector<NamedTensor>& tensors) {
  std::vector<NamedTensor> model;
  for (const NamedTensor& tensor : tensors) {
    if (!tensor.name.starts_with(kModelPrefix)) continue;
    std::string key = tensor.name.substr(kModelPrefix.size());
    std::optional<std::string> alias;
    if (tensor.alias_of) alias = unescape_label(std::string_view(*tensor.alias_of).substr(kModelPrefix.size()));
    NamedTensor output(unescape_label(key), tensor.source, alias);
    model.push_back(std::move(output));
  }
  std::vector<NamedTensor> out;
  for (const NamedTensor& tensor : to_hf_opt(model).tensors) {
    out.push_back({state_dict_path(kModelPrefix, tensor.name), tensor.source, std::nullopt});
  }
  return out;
}

// When no name pairs (a Hugging Face folder against metaseq files), how many
// would under --names hf-opt: the torch side renamed and looked for on the
// other. 0 when nothing would pair, or the torch side has a key the mapping
// does not know.
std::size_t pairs_under_hf_opt(const Side& a, const Side& b, const DiffReport& report) {
  if (report.compared > 0 || !report.differing.empty() || a.state_dict_layout() == b.state_dict_layout()) return 0;
  const Side& torch_side = a.state_dict_layout() ? b : a;
  const Side& named_side = a.state_dict_layout() ? a : b;
  std::vector<NamedTensor> renamed;
  try {
    renamed = hf_opt_named(torch_side.tensors);
  } catch (const Error&) {
    return 0;
  }
  std::set<std::string_view> names;
  for (const NamedTensor& tensor : named_side.tensors) names.insert(tensor.name);
  return static_cast<std::size_t>(std::count_if(
      renamed.begin(), renamed.end(), [&](const NamedTensor& tensor) { return names.count(tensor.name) != 0; }));
}

// The side's model state dict only, as `model/<key>`: a plain state dict
// (torch.save(model.state_dict())) is that state dict; otherwise it is the
// `model` entry's.
void keep_model(Side& side) {
  bool plain = std::none_of(side.tensors.begin(), side.tensors.end(),
                            [](const NamedTensor& t) { return t.name.starts_with(kModelPrefix); });
  for (NamedTensor& tensor : side.tensors) {
    if (!plain) break;
    tensor.name = std::string(kModelPrefix) + tensor.name;
    if (tensor.alias_of) tensor.alias_of = std::string(kModelPrefix) + *tensor.alias_of;
  }
  std::erase_if(side.tensors, [](const NamedTensor& t) { return !t.name.starts_with(kModelPrefix); });
}

// Each tie made a tensor of its own over the bytes of the one it is tied to.
void resolve_ties(std::vector<NamedTensor>& tensors) {
  std::map<std::string, std::size_t> by_name;
  for (std::size_t i = 0; i < tensors.size(); ++i) by_name.emplace(tensors[i].name, i);
  for (NamedTensor& tensor : tensors) {
    if (!tensor.alias_of) continue;
    auto target = by_name.find(*tensor.alias_of);
    if (target == by_name.end() || tensors[target->second].alias_of) continue;  // (compared as missing)
    untie(tensor, tensors[target->second]);
  }
}

std::unique_ptr<Side> open_side(const std::string& input, std::optional<std::int64_t> model_parts) {
  auto side = std::make_unique<Side>(open_inputs({input}, model_parts));
  return side;
}

// The side's tensors, as its layout reads them (input_layouts.hpp). With
// `state_dict_only` (against another layout, or under another naming), one
// FSDP-flattened file is consolidated like a set of shards.
void load_side(Side& side, bool state_dict_only) {
  StateDict read = side.layout->state_dict(side.inputs.manifest(), {state_dict_only});
  side.consolidated = read.consolidated;
  // Part 0's copy of a replicated tensor stands for the others only when they agree.
  std::vector<std::string> differing = compare_replicated(read.checks, side.inputs.files());
  if (!differing.empty()) {
    throw Error(ErrorKind::IncompleteSet, first_replicated_problem(differing) + ": the set is not one model");
  }
  side.tensors = std::move(read.tensors);
  side.object_tensors = read.object_tensors;
  side.items = std::move(read.items);
}

// Whether the side is a set whose keys nest (DCP's planner_data: a path of
// more than one element).
bool nests(const Side& side) {
  return std::any_of(side.items.begin(), side.items.end(), [](const NestedItem& item) { return item.path.size() > 1; });
}

// Whether more of `file`'s tensor paths are where `set`'s keys nest than are
// its flat keys.
bool written_nested(const Side& set, const Side& file) {
  std::set<std::string_view> names;
  for (const NamedTensor& tensor : file.tensors) names.insert(tensor.name);
  std::size_t nested = 0;
  std::size_t flat = 0;
  for (const NestedItem& item : set.items) {
    if (!item.tensor) continue;
    nested += names.count(object_path(item.path));
    flat += names.count(escape_label(item.key)) + names.count(state_dict_path(kModelPrefix, item.key));
  }
  return nested > flat;
}

// The side's tensors named by where they nest: a tensor item at its key's
// path, a tensor inside an object item ("model/<key>/<rest>") under its item's.
void name_by_nesting(Side& side) {
  std::map<std::string, std::string> item_paths;  // "model/<escaped key>" -> its nested path
  for (const NestedItem& item : side.items) {
    std::string path = object_path(item.path);
    if (item.tensor) {
      side.tensors.at(*item.tensor).name = path;
    } else {
      item_paths.emplace(state_dict_path(kModelPrefix, item.key), path);
    }
  }
  for (std::size_t i = side.tensors.size() - side.object_tensors; i < side.tensors.size(); ++i) {
    NamedTensor& tensor = side.tensors[i];
    for (std::string* name : {&tensor.name, tensor.alias_of ? &*tensor.alias_of : nullptr}) {
      if (name == nullptr) continue;
      const std::size_t slash = name->find('/', kModelPrefix.size());
      auto it = item_paths.find(name->substr(0, slash));
      if (it != item_paths.end()) *name = it->second + (slash == std::string::npos ? "" : name->substr(slash));
    }
  }
}

// Non-tensor objects that differ (tensors, {"$tensor": i}, are compared as data).
void diff_objects(const json& a, const json& b, const std::string& path, std::vector<std::string>& out,
                  std::size_t limit) {
  if (out.size() >= limit) return;
  bool tensor_a = a.is_object() && a.contains("$tensor");
  bool tensor_b = b.is_object() && b.contains("$tensor");
  if (tensor_a && tensor_b) return;
  // (an int read back from a manifest is unsigned where the file's own is signed: numbers compare by value)
  const bool same_type = a.type() == b.type() || (a.is_number_integer() && b.is_number_integer());
  if (!same_type || tensor_a != tensor_b) {
    out.push_back(fmt::format("{}: {} != {}", path.empty() ? "<root>" : path,
                              a.dump(-1, ' ', false, json::error_handler_t::replace).substr(0, 80),
                              b.dump(-1, ' ', false, json::error_handler_t::replace).substr(0, 80)));
    return;
  }
  auto join = [&](const std::string& key) { return append_path(path, key); };  // escaped as tensor paths are
  auto is_tensor = [](const json& value) { return value.is_object() && value.contains("$tensor"); };
  // Configs render as {"$class", "value"}: name the path by the config's keys.
  for (const char* wrapper : {"value", "attributes"}) {
    if (a.is_object() && b.is_object() && a.contains("$class") &&
        a.value("$class", json()) == b.value("$class", json()) && a.contains(wrapper) && b.contains(wrapper)) {
      diff_objects(a[wrapper], b[wrapper], path, out, limit);
      return;
    }
  }
  if (a.is_object()) {
    // By key through an index: an ordered object looks a key up one entry at a
    // time (n^2 for a state dict of 10^5 keys).
    auto index = [](const json& object) {
      std::unordered_map<std::string_view, const json*> by_key;
      for (const auto& [key, value] : object.get_ref<const json::object_t&>()) by_key.emplace(key, &value);
      return by_key;
    };
    const auto in_a = index(a);
    const auto in_b = index(b);
    for (const auto& [key, value] : a.get_ref<const json::object_t&>()) {
      auto other = in_b.find(key);
      if (other == in_b.end()) {
        // A missing tensor is reported by the tensor comparison.
        if (!is_tensor(value)) out.push_back(fmt::format("{}: only in A", join(key)));
      } else {
        diff_objects(value, *other->second, join(key), out, limit);
      }
      if (out.size() >= limit) return;
    }
    for (const auto& [key, value] : b.get_ref<const json::object_t&>()) {
      if (in_a.count(key) == 0 && !is_tensor(value) && out.size() < limit) {
        out.push_back(fmt::format("{}: only in B", join(key)));
      }
    }
  } else if (a.is_array()) {
    if (a.size() != b.size()) {
      out.push_back(fmt::format("{}: {} items != {} items", path, a.size(), b.size()));
      return;
    }
    for (std::size_t i = 0; i < a.size(); ++i) diff_objects(a[i], b[i], join(std::to_string(i)), out, limit);
  } else if (a != b) {
    out.push_back(fmt::format("{}: {} != {}", path, a.dump(-1, ' ', false, json::error_handler_t::replace),
                              b.dump(-1, ' ', false, json::error_handler_t::replace)));
  }
}

// The object items of a DCP set against the values at the same places in one
// torch file (where each key nests with `by_nesting`, else at its flat key):
// what differs, "<key>: ..." (`set_is_a`: the set is diff's A side).
void diff_items_with_file(const Side& set, const Side& file, bool by_nesting, bool set_is_a,
                          std::vector<std::string>& out, std::size_t limit) {
  const json items = set.layout->object_items(set.inputs.manifest());
  const json& tree = *file.inputs.manifest().files[0].objects;
  std::map<std::string_view, const KeyPath*> paths;
  for (const NestedItem& item : set.items) paths.emplace(item.key, &item.path);
  for (const auto& [key, value] : items.items()) {
    if (out.size() >= limit) return;
    KeyPath flat{key};
    auto it = paths.find(key);
    const KeyPath& path = by_nesting && it != paths.end() ? *it->second : flat;
    const json* there = &tree;
    for (const auto& element : path) {
      const auto* name = std::get_if<std::string>(&element);
      if (name != nullptr && there->is_object() && there->contains(*name)) {
        there = &(*there)[*name];
      } else if (name == nullptr && there->is_array() &&
                 static_cast<std::size_t>(std::get<std::int64_t>(element)) < there->size()) {
        there = &(*there)[static_cast<std::size_t>(std::get<std::int64_t>(element))];
      } else {
        there = nullptr;
        break;
      }
    }
    if (there == nullptr) {
      out.push_back(fmt::format("{}: only in {}", key, set_is_a ? "A" : "B"));
    } else {
      diff_objects(set_is_a ? value : *there, set_is_a ? *there : value, key, out, limit);
    }
  }
}

// A value as JSON: integers exact, floats as numbers (non-finite ones as the
// strings "nan", "inf", "-inf"), complex as {"real", "imag"}.
json real_json(double x, DType dtype = DType::Float64) {
  if (std::isfinite(x)) return x;
  return format_value(ElementValue{ElementValue::Kind::Real, dtype, 0, 0, x, 0.0});
}

json value_json(const ElementValue& value) {
  switch (value.kind) {
    case ElementValue::Kind::Bool:
      if (value.signed_value == 0 || value.signed_value == 1) return value.signed_value == 1;
      return value.signed_value;
    case ElementValue::Kind::Signed: return value.signed_value;
    case ElementValue::Kind::Unsigned: return value.unsigned_value;
    case ElementValue::Kind::Real: return real_json(value.real, value.dtype);
    case ElementValue::Kind::Complex:
      return {{"real", real_json(value.real, value.dtype)}, {"imag", real_json(value.imag, value.dtype)}};
  }
  return nullptr;
}

std::string index_text(const std::vector<std::int64_t>& index) {
  return index.size() == 1 ? fmt::format("({},)", index[0]) : fmt::format("({})", fmt::join(index, ", "));
}

}  // namespace

constexpr std::size_t kMaxPositions = 100000;

Action add_diff_command(CLI::App& app) {
  struct Options {
    std::string a;
    std::string b;
    std::string tag;
    double atol = 0.0;
    double rtol = 0.0;
    bool tolerance_given = false;
    std::size_t max_positions = 20;
    bool json_output = false;
    unsigned threads = 0;
    std::optional<std::int64_t> model_parts;
    std::string names;
  };
  auto options = std::make_shared<Options>();
  app.add_option("A", options->a, "a checkpoint file, or a set of shards (directory, quoted glob, manifest)")
      ->required();
  app.add_option("B", options->b, "the same for the other side")->required();
  // Either one given, even as 0, compares by value (-0.0 == 0.0, NaN == NaN, across float dtypes).
  auto tolerance_option = [&](const char* name, double& value, const char* help) {
    app.add_option_function<double>(
           name,
           [options, &value](double given) {
             value = given;
             options->tolerance_given = true;
           },
           help)
        ->check(finite_non_negative());
  };
  tolerance_option("--atol", options->atol, "absolute tolerance (default: exact, bit for bit)");
  tolerance_option("--rtol", options->rtol, "relative tolerance (default: exact, bit for bit)");
  // Every position listed is held until the report is printed (about 370 bytes each).
  app.add_option("--max-positions", options->max_positions,
                 fmt::format("wrong positions listed per tensor (default 20, at most {})", kMaxPositions))
      ->check(CLI::Range(std::size_t{0}, kMaxPositions));
  app.add_flag("--json", options->json_output, "print JSON for machines");
  app.add_option("--names", options->names,
                 "hf-opt: compare a torch side (metaseq names) under transformers' OPT names, as stitch --format hf "
                 "writes them")
      ->check(CLI::IsMember({"hf-opt"}));
  add_model_parts_flag(app, options->model_parts);
  add_tag_flag(app, options->tag);
  app.add_option("--threads", options->threads, "comparison threads (default: all cores)")->check(thread_count());
  return [options]() -> int {
    auto start = std::chrono::steady_clock::now();
    const std::vector<std::string> sides = with_tag({options->a, options->b}, options->tag);
    std::unique_ptr<Side> a = open_side(sides[0], options->model_parts);
    std::unique_ptr<Side> b = open_side(sides[1], options->model_parts);
    // A set (several files, or one FSDP-flattened file that is a whole set: one
    // rank) is compared by its model: the other side is then consolidated too,
    // and read for its model only. One shard of a larger set is a file.
    auto is_set = [](const Side& side) {
      const Manifest& manifest = side.inputs.manifest();
      return !side.state_dict_layout() &&
             (manifest.files.size() > 1 || (manifest.files.front().fsdp && manifest.grid.problems.empty()));
    };
    const bool sets = is_set(*a) || is_set(*b);
    for (Side* side : {a.get(), b.get()}) {
      Side* other = side == a.get() ? b.get() : a.get();
      load_side(*side, !options->names.empty() || other->state_dict_layout() || sets);
    }
    // A DCP set that nests its keys against one torch file written nested (what
    // dcp_to_torch_save writes): compared by where each key nests, the file's
    // tensors at their paths. (A file of the flat keys is compared by them.)
    const bool by_nesting = !sets && options->names.empty() && nests(*a) != nests(*b) &&
                            !(nests(*a) ? *b : *a).state_dict_layout() &&
                            written_nested(nests(*a) ? *a : *b, nests(*a) ? *b : *a);
    for (Side* side : {a.get(), b.get()}) {
      Side* other = side == a.get() ? b.get() : a.get();
      if (by_nesting && nests(*side)) name_by_nesting(*side);
      // Against a set or a safetensors file, only the model state dict is compared.
      if ((sets || other->state_dict_layout()) && !side->state_dict_layout() && !by_nesting) keep_model(*side);
      if (!options->names.empty() && !side->state_dict_layout()) side->tensors = hf_opt_named(side->tensors);
      // A tie is one tensor in safetensors: its second name is not looked for
      // there. In DCP it is two items: compared as a copy of its tensor. Against
      // a side that keeps ties (a DeepSpeed set's shared_params), a tie.
      auto has_ties = [](const Side& s) {
        return std::any_of(s.tensors.begin(), s.tensors.end(),
                           [](const NamedTensor& t) { return t.alias_of.has_value(); });
      };
      const bool other_has_ties = has_ties(*other);
      if (other->state_dict_layout() && (!side->state_dict_layout() || has_ties(*side))) {
        if (other->layout->ties_as_copies) {
          resolve_ties(side->tensors);
        } else if (!other_has_ties) {  // (a DeepSpeed set's shared_params are ties: compared as ties)
          std::erase_if(side->tensors, [](const NamedTensor& t) { return t.alias_of.has_value(); });
        }
      }
      // Nor has it objects: the tensors inside a DCP set's object items are not looked for there.
      if (other->state_dict_layout() && other->layout->object_items == nullptr) {
        side->tensors.resize(side->tensors.size() - side->object_tensors);
      }
    }
    CompareOptions compare;
    compare.tolerance = {options->atol, options->rtol, options->tolerance_given};
    compare.max_positions = options->max_positions;
    compare.threads = options->threads;
    // Every byte compared is checked against its record's CRC-32, as stitch does
    // with what it copies: two corrupt copies are not "equal".
    Plan sources_a = a->crc_sources();
    Plan sources_b = b->crc_sources();
    SourceCrcCheck check_a(sources_a, {}, a->inputs.files());
    SourceCrcCheck check_b(sources_b, {}, b->inputs.files());
    compare.check_a = &check_a;
    compare.check_b = &check_b;
    DiffReport report = diff_tensors(a->tensors, a->inputs.files(), b->tensors, b->inputs.files(), compare);
    check_a.finish(resolve_threads(options->threads));
    check_b.finish(resolve_threads(options->threads));
    std::vector<std::string> objects;
    if (!a->consolidated && !b->consolidated && !a->state_dict_layout() && !b->state_dict_layout()) {
      diff_objects(*a->inputs.manifest().files[0].objects, *b->inputs.manifest().files[0].objects, "", objects, 50);
    } else if (a->layout->object_items != nullptr && b->layout->object_items != nullptr) {
      // (their tensors, {"$tensor": i}, are compared as tensors: model/<key>/<path in the item>)
      diff_objects(a->layout->object_items(a->inputs.manifest()), b->layout->object_items(b->inputs.manifest()), "",
                   objects, 50);
    } else if (Side* set = a->layout->object_items != nullptr   ? a.get()
                           : b->layout->object_items != nullptr ? b.get()
                                                                : nullptr;
               set != nullptr && !sets && options->names.empty()) {
      Side& file = set == a.get() ? *b : *a;
      if (!file.state_dict_layout() && !file.consolidated &&
          (by_nesting || !is_training_checkpoint(file.inputs.manifest().files[0]))) {
        diff_items_with_file(*set, file, by_nesting, set == a.get(), objects, 50);
      }
    }
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    bool equal = report.equal() && objects.empty();
    // Pairs found but not compared element by element: a shape or dtype mismatch.
    const auto not_comparable = static_cast<std::size_t>(std::count_if(
        report.differing.begin(), report.differing.end(), [](const TensorDiff& d) { return !d.mismatch.empty(); }));
    const std::size_t differ = report.differing.size() - not_comparable;
    std::string hint;
    if (std::size_t pairs = options->names.empty() ? pairs_under_hf_opt(*a, *b, report) : 0; pairs > 0) {
      hint = fmt::format(
          "no tensor name is on both sides ({} only in A, {} only in B), but {} pair under transformers' OPT "
          "names: add --names hf-opt to compare a Hugging Face folder with metaseq files",
          report.only_in_a.size(), report.only_in_b.size(), pairs);
    }
    if (options->json_output) {
      json result = {{"equal", equal},
                     {"model_only", sets},  // a set is compared by its model state dict
                     {"only_in_a", report.only_in_a},
                     {"only_in_b", report.only_in_b},
                     {"objects", objects},
                     {"compared_tensors", report.compared},
                     {"not_comparable_tensors", not_comparable},
                     {"compared_tensor_bytes", report.compared_tensor_bytes},
                     {"seconds", seconds}};
      json differing = json::array();
      for (const TensorDiff& diff : report.differing) {
        json positions = json::array();
        for (const DiffPosition& p : diff.positions)
          positions.push_back({{"index", p.index}, {"a", value_json(p.a)}, {"b", value_json(p.b)}});
        differing.push_back({{"name", diff.name},
                             {"mismatch", diff.mismatch},
                             {"note", diff.note},
                             {"numel", diff.numel},
                             {"count", diff.count},
                             {"max_abs", value_json(diff.max_abs)},
                             {"max_rel", real_json(diff.max_rel)},
                             {"positions", positions}});
      }
      result["differing"] = std::move(differing);
      json notes = json::array();
      for (const TensorDiff& diff : report.noted) notes.push_back({{"name", diff.name}, {"note", diff.note}});
      result["notes"] = std::move(notes);
      if (!hint.empty()) result["hint"] = hint;
      out() << result.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
      return equal ? 0 : 1;
    }
    if (!hint.empty()) {
      fmt::print(out(), "different: {}\n", hint);
      return 1;
    }
    for (const std::string& name : report.only_in_a) fmt::print(out(), "only in A: {}\n", printable(name));
    for (const std::string& name : report.only_in_b) fmt::print(out(), "only in B: {}\n", printable(name));
    for (const TensorDiff& diff : report.differing) {
      const std::string name = printable(diff.name);
      if (!diff.mismatch.empty()) {
        fmt::print(out(), "{}: {}\n", name, printable(diff.mismatch));
        continue;
      }
      fmt::print(out(), "{}: {} of {} elements differ (max abs {}, max rel {:.6g}){}\n", name, diff.count, diff.numel,
                 format_value(diff.max_abs), diff.max_rel, diff.note.empty() ? "" : "; " + diff.note);
      for (const DiffPosition& p : diff.positions)
        fmt::print(out(), "  {} {}: {} != {}\n", name, index_text(p.index), format_value(p.a), format_value(p.b));
      if (diff.count > diff.positions.size()) fmt::print(out(), "  ... {} more\n", diff.count - diff.positions.size());
    }
    for (const TensorDiff& diff : report.noted) fmt::print(out(), "note: {}: {}\n", printable(diff.name), diff.note);
    for (const std::string& line : objects) fmt::print(out(), "object {}\n", printable(line));
    fmt::print(
        out(),
        "{}: {} tensors compared ({} tensor bytes in A) in {:.2f} s; {} differ, {}{} only in A, {} only in B{}\n",
        equal ? "equal" : "different", report.compared, human_bytes(report.compared_tensor_bytes), seconds, differ,
        not_comparable == 0 ? "" : fmt::format("{} not comparable (shape/dtype), ", not_comparable),
        report.only_in_a.size(), report.only_in_b.size(),
        objects.empty() ? "" : fmt::format(", {} object difference(s)", objects.size()));
    if (sets)
      fmt::print(
          out(),
          "note: a set of files is compared by its model state dict: optimizer state and other objects are not\n");
    return equal ? 0 : 1;
  };
}

}  // namespace ckpt::cli
