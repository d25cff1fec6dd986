// Resharding: consolidate each input part (weights and per-parameter optimizer
// state) as byte ranges, re-cut the model-parallel parts, flatten and chunk for
// the new FSDP world size, and write each output as an edited copy of an input
// file, so every object the training code saved is carried through.
#include "ckpt/plan/reshard.hpp"

#include "ckpt/io/parallel.hpp"

#include <fmt/format.h>

#include <map>
#include <set>
#include <thread>

#include "ckpt/format/pyobject.hpp"
#include "ckpt/layout/fsdp.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/optimizer_state.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/plan_file.hpp"

namespace ckpt {

using pickle::kNoNode;
using pickle::NodeId;

std::string output_path(const std::string& pattern, int mp, int dp, int m, int d) {
  bool has_m = pattern.find("{m}") != std::string::npos;
  bool has_d = pattern.find("{d}") != std::string::npos;
  if ((mp > 1 && !has_m) || (dp > 1 && !has_d)) {
    throw Error(ErrorKind::Usage,
                fmt::format("-o '{}' must contain {}{}{} to name {} x {} outputs", pattern, mp > 1 ? "{m}" : "",
                            mp > 1 && dp > 1 ? " and " : "", dp > 1 ? "{d}" : "", mp, dp));
  }
  std::string path = pattern;
  for (std::size_t at; (at = path.find("{m}")) != std::string::npos;) path.replace(at, 3, std::to_string(m));
  for (std::size_t at; (at = path.find("{d}")) != std::string::npos;) path.replace(at, 3, std::to_string(d));
  return path;
}

namespace {

// The pickle node of the tensor at `path` in `base`, to replace.
pickle::NodeId base_tensor_node(const Checkpoint& base, const std::string& path) {
  std::optional<std::size_t> index = base.tensor_index(path);
  if (!index || base.tensors()[*index].alias_of) {
    throw Error(Location{base.path(), path, std::nullopt}, "expected a tensor here to replace");
  }
  return base.tensor_nodes()[*index].node;
}

// shard_metadata of an output: the base's, with each flat parameter's shapes,
// numels and padding rewritten.
void rewrite_metadata(CheckpointBuilder& builder, const Checkpoint& base, const std::vector<FlatShard>& flats) {
  pickle::Graph& graph = builder.graph();
  NodeId metadata = builder.top_level("shard_metadata");
  NodeId instances = config_get(graph, metadata, "param_metadata");
  auto list = as_sequence(graph, instances);
  auto fail = [&](const std::string& message) {
    return Error(Location{base.path(), "shard_metadata", std::nullopt}, message);
  };
  if (!list) throw fail("no param_metadata list");
  for (const FlatShard& flat : flats) {
    if (flat.instance >= list->size()) throw fail("fewer instances than the input's first file");
    NodeId params = config_get(graph, (*list)[flat.instance], "params");
    std::span<const pickle::Entry> entries = graph.mapping_entries(params);
    if (flat.flat_param >= entries.size()) throw fail("params do not match the first file's");
    NodeId entry = entries[flat.flat_param].second;
    std::vector<NodeId> shapes;
    for (const auto& shape : flat.shapes) shapes.push_back(add_torch_size(graph, shape));
    bool ok = builder.set_entry(entry, "shapes", add_list(graph, std::move(shapes))) &&
              builder.set_entry(entry, "numels", add_int_list(graph, flat.numels)) &&
              builder.set_entry(entry, "padding", graph.integer(flat.padding));
    if (!ok) throw fail("a flat parameter's metadata lacks shapes, numels or padding");
  }
}

// Per output part, [m], the consolidated parameters of one kind: the weights or
// one optimizer state.
using PartTensors = std::vector<std::vector<NamedTensor>>;

// The request alone, before any input is read.
void check_request(const ReshardOptions& options) {
  if (options.mp < 1 || options.dp < 1) throw Error(ErrorKind::Usage, "--mp and --dp must be at least 1");
  if (options.unflatten && options.dp != 1)
    throw Error(ErrorKind::Usage, "--unflatten writes consolidated parts: it needs --dp 1");
}

// The step of an optimizer state: an int, or (torch >= 1.12) a 0-dim tensor.
struct OptimizerStep {
  std::int64_t value = 0;
  std::optional<NamedTensor> tensor;
};

// The step the states of `file` (manifest file `index`) share, if they have one
// (check_optimizer_states has checked that they agree).
std::optional<OptimizerStep> optimizer_step(const ManifestFile& file, int index) {
  const nlohmann::ordered_json& root = *file.objects;
  const nlohmann::ordered_json& frame = root.at(std::string(kOptimizerStateKey));
  const nlohmann::ordered_json& states = frame.at("state");
  if (!states.contains("0") || !states.at("0").contains("step")) return std::nullopt;
  const nlohmann::ordered_json& step = states.at("0").at("step");
  if (step.is_number_integer()) return OptimizerStep{step.get<std::int64_t>(), std::nullopt};
  const std::string path = optimizer_state_path(0, "step");
  const StoredTensor* tensor = find_tensor(file, path);
  if (tensor == nullptr || tensor->alias_of) {
    throw Error(Location{file.path, path, std::nullopt}, "a step that is neither an int nor a tensor");
  }
  TensorSource source = source_of(*tensor, file, static_cast<std::uint32_t>(index));
  return OptimizerStep{0, NamedTensor{path, tensor->dtype, source, std::nullopt}};
}

// The files every output is an edited copy of, and whose FSDP layout it takes:
// the input grid's, or the template's (--layout-from).
struct Bases {
  const PlanInputs& inputs;
  std::vector<std::vector<int>> grid;  // [m][d] -> index in inputs.manifest().files
  std::vector<std::uint32_t> sources;  // plan source of each file

  const ManifestFile& file(int index) const { return inputs.manifest().files[static_cast<std::size_t>(index)]; }
  const ManifestFile& first() const { return file(grid[0][0]); }
};

// The base grid's first file decides what can be written: flat outputs need its FSDP layout.
void check_layout_file(const ManifestFile& first, const ReshardOptions& options, bool is_template) {
  check_training_checkpoint(first);
  if (is_template && !first.fsdp) {
    throw Error(Location{first.path, "", std::nullopt},
                "--layout-from: no shard_metadata here, so this file holds no FSDP layout to take");
  }
  if (!options.unflatten && !first.fsdp) {
    throw Error(Location{first.path, "", std::nullopt},
                "no shard_metadata, so the FSDP layout is unknown: give it with --layout-from (a shard set of the "
                "same model), or write consolidated parts with --dp 1 --unflatten");
  }
}

// The form of the attention projections: a layout's flat parameters name them
// (fused or not), the written parts follow it; with no layout, metaseq's fused
// qkv_proj unless --split-qkv.
QkvForm output_qkv_form(const ManifestFile& layout_file, const ReshardOptions& options) {
  if (!layout_file.fsdp) return options.split_qkv ? QkvForm::Separate : QkvForm::Fused;
  for (const FsdpInstanceMeta& instance : layout_file.fsdp->instances) {
    for (const FlatParamMeta& flat : instance.flat_params) {
      for (const std::string& name : flat.names) {
        MpRule rule = megatron_rule(name);
        bool fused = rule == MpRule::FusedQkv;
        bool separate = !fused && (name.find("k_proj") != std::string::npos);
        if (fused && options.split_qkv) {
          throw Error(
              Location{layout_file.path, fsdp_key(instance.fsdp_path, name), std::nullopt},
              "--split-qkv: the outputs carry this shard_metadata, whose flat parameters hold a fused qkv_proj, so "
              "they can only be written fused");
        }
        if (fused) return QkvForm::Fused;
        if (separate) return QkvForm::Separate;
      }
    }
  }
  return QkvForm::AsInput;
}

// Every input part's weights consolidated (`parts`), and re-cut into `mp`
// parts with the projections in `form`; what should agree across the input
// parts goes to `checks`.
struct Weights {
  PartTensors parts;
  PartTensors recut;
};
Weights recut_weights(const Manifest& manifest, const std::vector<std::vector<int>>& grid, int mp, QkvForm form,
                      std::vector<ReplicatedCheck>& checks) {
  Weights weights;
  weights.parts = consolidate_grid(manifest, grid);
  std::vector<std::string> replicated;
  weights.recut = reshard_megatron(weights.parts, mp, &replicated, form);
  checks = replicated_checks(weights.parts, replicated);
  for (ReplicatedCheck& check : data_parallel_checks(manifest, grid)) checks.push_back(std::move(check));
  return weights;
}

// --layout-from: the weights, cut as the template's model parts, have the
// names and shapes of its shard_metadata, and each of them has a place in it
// (a flat parameter, a buffer, or a tie of shared_param_info), so nothing is
// lost. Throws Error naming the tensor, before anything is written.
void check_against_template(const Weights& weights, QkvForm form, const Bases& bases, const std::string& input) {
  const int parts = static_cast<int>(bases.grid.size());
  PartTensors cut;
  try {
    cut = reshard_megatron(weights.parts, parts, nullptr, form);
  } catch (const Error& error) {
    throw Error(error.kind(), fmt::format("--layout-from: the weights, cut as the template's {} model parts: {}", parts,
                                          error.what()));
  }
  for (int m = 0; m < parts; ++m) {
    const ManifestFile& layout_file = bases.file(bases.grid[m][0]);
    if (!layout_file.fsdp)
      throw Error(Location{layout_file.path, "", std::nullopt}, "--layout-from: no shard_metadata");
    std::map<std::string, const NamedTensor*> by_name;
    for (const NamedTensor& tensor : cut[m]) by_name[tensor.name] = &tensor;
    std::set<std::string> placed(layout_file.fsdp->buffer_names.begin(), layout_file.fsdp->buffer_names.end());
    std::set<std::string> ties;
    std::string where = parts == 1 ? std::string("the template") : fmt::format("model part {} of the template", m);
    for (const FsdpInstanceMeta& instance : layout_file.fsdp->instances) {
      for (const auto& [source, tied] : instance.shared_param_info) ties.insert(fsdp_key(instance.fsdp_path, tied));
      for (const FlatParamMeta& flat : instance.flat_params) {
        for (std::size_t i = 0; i < flat.names.size(); ++i) {
          std::string key = fsdp_key(instance.fsdp_path, flat.names[i]);
          placed.insert(key);
          auto it = by_name.find(key);
          if (it == by_name.end() || it->second->alias_of) {
            throw Error(Location{layout_file.path, key, std::nullopt},
                        fmt::format("a parameter of {} ({}) that {} does not hold", flat.state_key, where, input));
          }
          const std::vector<std::int64_t>& shape = it->second->source.shape;
          if (shape != flat.shapes[i]) {
            throw Error(Location{input, key, std::nullopt},
                        fmt::format("shape [{}] cut as {} ({}), which has [{}]: not the template's model",
                                    fmt::join(shape, ", "), where, layout_file.path, fmt::join(flat.shapes[i], ", ")));
          }
        }
      }
    }
    for (const std::string& buffer : layout_file.fsdp->buffer_names) {  // the ones the template saved
      const StoredTensor* saved = find_tensor(layout_file, state_dict_path(kModelPrefix, buffer));
      if (saved == nullptr) continue;
      auto it = by_name.find(buffer);
      if (it == by_name.end() || it->second->alias_of) {
        throw Error(Location{input, buffer, std::nullopt},
                    fmt::format("a buffer that {} ({}) holds and these weights do not", where, layout_file.path));
      }
      if (it->second->source.shape != saved->shape) {
        throw Error(Location{input, buffer, std::nullopt},
                    fmt::format("buffer of shape [{}], but {} ({}) has [{}]: not the template's model",
                                fmt::join(it->second->source.shape, ", "), where, layout_file.path,
                                fmt::join(saved->shape, ", ")));
      }
    }
    for (const NamedTensor& tensor : cut[m]) {
      if (tensor.alias_of ? ties.count(tensor.name) != 0 : placed.count(tensor.name) != 0) continue;
      throw Error(Location{input, tensor.name, std::nullopt},
                  fmt::format("{} in the weights, but {} ({}) has no place for it: it would be lost",
                              tensor.alias_of ? fmt::format("tied to {}", *tensor.alias_of) : std::string("held"),
                              where, layout_file.path));
    }
  }
}

// The optimizer states (exp_avg, ...) the outputs carry: the input's, written
// in place of the base's (its last_optimizer_state, step and param_groups
// included, is the frame). None with --drop-optimizer-state or --unflatten; a
// template's states are never carried (they belong to other weights), so an
// input without any gives outputs without any, said in `notes`.
std::vector<std::string> optimizer_states_to_write(const ManifestFile& input, const ManifestFile& layout_file,
                                                   bool is_template, const ReshardOptions& options,
                                                   std::vector<std::string>& notes) {
  if (options.drop_optimizer_state || options.unflatten) return {};
  const std::vector<std::string>& buffers = layout_file.fsdp->buffer_names;
  std::vector<std::string> names = optimizer_state_names(input, buffers);
  if (!is_template) return names;
  std::vector<std::string> frame = optimizer_state_names(layout_file, buffers);
  if (names.empty()) {
    if (!frame.empty()) {
      notes.push_back(
          fmt::format("{} holds no optimizer state, so the outputs have none (the template's belongs "
                      "to other weights)",
                      input.path));
    }
    return {};
  }
  if (frame.empty()) {
    throw Error(Location{layout_file.path, std::string(kOptimizerStateKey), std::nullopt},
                fmt::format("--layout-from: no optimizer state here to write the input's ({}) in; "
                            "--drop-optimizer-state writes none",
                            fmt::join(names, ", ")));
  }
  std::set<std::string> have(names.begin(), names.end());
  if (have != std::set<std::string>(frame.begin(), frame.end())) {
    throw Error(Location{layout_file.path, std::string(kOptimizerStateKey), std::nullopt},
                fmt::format("--layout-from: the template's optimizer states ({}) are not the input's ({}), which "
                            "are written in their place; --drop-optimizer-state writes none",
                            fmt::join(frame, ", "), fmt::join(names, ", ")));
  }
  if (optimizer_hyperparameters(input) != optimizer_hyperparameters(layout_file)) {
    notes.push_back(
        fmt::format("the template's param_groups (lr, betas, weight decay, ...) are written with the "
                    "optimizer state of {}, whose own differ",
                    input.path));
  }
  return names;
}

// Each optimizer state re-cut like its weights, parameter by parameter: state
// name -> [m] -> parameters.
std::map<std::string, PartTensors> recut_optimizer_state(const Manifest& manifest,
                                                         const std::vector<std::vector<int>>& grid,
                                                         const std::vector<std::string>& names,
                                                         const std::vector<std::string>& buffers, int mp, QkvForm form,
                                                         std::vector<ReplicatedCheck>& checks) {
  std::map<std::string, PartTensors> optimizer;
  for (const std::string& name : names) {
    PartTensors state_parts;
    for (const auto& shards : grid) state_parts.push_back(consolidate_optimizer_state(manifest, shards, name, buffers));
    std::vector<std::string> replicated;
    optimizer[name] = reshard_megatron(state_parts, mp, &replicated, form);
    for (ReplicatedCheck& check : replicated_checks(state_parts, replicated, optimizer_state_label(name)))
      checks.push_back(std::move(check));
  }
  return optimizer;
}

// What every output of the plan is cut from.
struct Recut {
  const ManifestFile& first;  // the base grid's first file: its FSDP layout is the outputs'
  const ReshardOptions& options;
  bool keep_optimizer = false;
  bool keep_stateless_frame = false;  // the base's last_optimizer_state holds no state to cut (Adam before step 1)
  // With a template: the input's `step`, written in place of the template's in every state.
  std::optional<OptimizerStep> step;
  PartTensors weights;
  std::map<std::string, PartTensors> optimizer;  // empty unless keep_optimizer
  // Per output part, each flat parameter whole (flatten_whole), cut per rank by chunk_flat.
  std::vector<std::vector<FlatShard>> flat_weights;
  std::map<std::string, std::vector<std::vector<FlatShard>>> flat_optimizer;

  // The flat parameters, whole, of every output part: once, not once per rank.
  void flatten() {
    if (options.unflatten) return;
    for (const std::vector<NamedTensor>& part : weights) flat_weights.push_back(flatten_whole(*first.fsdp, part));
    // What is flattened is cut from flat_weights from now on; the rest (buffers) stays.
    std::set<std::string> flattened;
    for (const FsdpInstanceMeta& instance : first.fsdp->instances) {
      for (const FlatParamMeta& flat : instance.flat_params) {
        for (const std::string& name : flat.names) flattened.insert(fsdp_key(instance.fsdp_path, name));
      }
    }
    for (std::vector<NamedTensor>& part : weights) {
      std::erase_if(part, [&](const NamedTensor& tensor) { return flattened.count(tensor.name) != 0; });
    }
    for (const auto& [name, state] : optimizer) {
      try {
        for (const std::vector<NamedTensor>& part : state)
          flat_optimizer[name].push_back(flatten_whole(*first.fsdp, part));
      } catch (const Error& error) {  // said of the state, not of the weights
        throw Error(error.kind(), error.where(), fmt::format("optimizer state {}: {}", name, error.message()));
      }
    }
  }
};

// One output being planned: an edited copy of its base, and its new tensors in
// the order they were written.
struct Output {
  explicit Output(const Checkpoint& base_checkpoint) : base(base_checkpoint), builder(base_checkpoint) {}

  // The base's tensor at `path` now holds `tensor`.
  void replace(const std::string& path, NamedTensor tensor) {
    builder.replace_tensor(base_tensor_node(base, path), tensor);
    written.push_back(std::move(tensor));
  }

  const Checkpoint& base;
  CheckpointBuilder builder;
  std::vector<NamedTensor> written;
};

// Whether `file` holds its model flattened (its first flat parameter is there).
bool has_flat_model(const ManifestFile& file) {
  return file.fsdp &&
         find_tensor(file, state_dict_path(kModelPrefix, file.fsdp->instances.at(0).flat_params.at(0).state_key)) !=
             nullptr;
}

NamedTensor flat_output(const FlatShard& flat) {
  return {flat.state_key, flat.source.dtype, flat.source, std::nullopt};
}

// --unflatten: the part's consolidated weights, with shard_metadata (where the
// base has one) describing a single shard.
void write_unflattened(Output& output, const ManifestFile& base_file, const Recut& recut, int m) {
  std::vector<NamedTensor> model;
  for (const NamedTensor& tensor : recut.weights[m]) model.push_back((tensor));
  output.builder.set_top_level("model", output.builder.add_state_dict(model));
  for (const NamedTensor& tensor : model) {
    if (!tensor.alias_of) output.written.push_back(tensor);
  }
  if (base_file.fsdp)
    rewrite_metadata(output.builder, output.base, flatten_fsdp(*recut.first.fsdp, recut.weights[m], 1, 0));
}

// Edits the base's flattened model in place: key order and _metadata stay.
void replace_flat_model(Output& output, const ManifestFile& base_file, const std::vector<FlatShard>& flats,
                        const std::map<std::string, const NamedTensor*>& by_name) {
  for (const FlatShard& flat : flats) output.replace(state_dict_path(kModelPrefix, flat.state_key), flat_output(flat));
  for (const StoredTensor& tensor : base_file.tensors) {
    if (!tensor.path.starts_with(kModelPrefix) || tensor.alias_of) continue;
    std::string key = unescape_label(std::string_view(tensor.path).substr(kModelPrefix.size()));
    bool is_flat = std::any_of(flats.begin(), flats.end(), [&](const FlatShard& f) { return f.state_key == key; });
    if (is_flat) continue;
    auto it = by_name.find(key);
    if (it == by_name.end() || it->second->alias_of) {
      throw Error(Location{output.base.path(), tensor.path, std::nullopt}, "not a flat parameter and not a buffer");
    }
    output.replace(tensor.path, (*it->second));
  }
}

// From consolidated parts: flat parameters in metadata order, then buffers.
void build_flat_model(Output& output, const FsdpMetadata& layout, const std::vector<FlatShard>& flats,
                      const std::map<std::string, const NamedTensor*>& by_name) {
  std::vector<NamedTensor> model;
  for (const FlatShard& flat : flats) model.push_back(flat_output(flat));
  for (const std::string& buffer : layout.buffer_names) {
    auto it = by_name.find(buffer);
    if (it != by_name.end() && !it->second->alias_of) model.push_back((*it->second));
  }
  output.builder.set_top_level("model", output.builder.add_state_dict(model));
  output.written.insert(output.written.end(), model.begin(), model.end());
}

// The input's step in every state of the output's last_optimizer_state: an int,
// or (torch >= 1.12) a tensor of its own in each state, which Adam increments
// in place.
void replace_step(Output& output, const OptimizerStep& step) {
  pickle::Graph& graph = output.builder.graph();
  pickle::NodeId frame = output.builder.top_level(std::string(kOptimizerStateKey));
  std::vector<pickle::NodeId> dicts;
  for (const auto& [key, state] : graph.mapping_entries(graph.lookup(frame, "state"))) dicts.push_back(state);
  for (pickle::NodeId state : dicts) {
    pickle::NodeId value = step.tensor ? output.builder.add_tensor(*step.tensor) : graph.integer(step.value);
    if (!output.builder.set_entry(state, "step", value)) {
      throw Error(Location{output.base.path(), std::string(kOptimizerStateKey) + "/state", std::nullopt},
                  "--layout-from: a state of the template without the step the input's states have");
    }
  }
}

// Shard d of part m of each flat optimizer state, in place of the base's.
void replace_optimizer_state(Output& output, const Recut& recut, int m, int d) {
  if (recut.step) replace_step(output, *recut.step);
  for (const auto& [name, state] : recut.flat_optimizer) {
    std::vector<FlatShard> slices = chunk_flat(*recut.first.fsdp, state[m], recut.options.dp, d);
    for (std::size_t k = 0; k < slices.size(); ++k) {
      NamedTensor tensor = flat_output(slices[k]);
      tensor.name = optimizer_state_path(k, name);
      output.replace(tensor.name, tensor);
    }
  }
}

// FSDP shard d of part m: the flattened model, its shard_metadata and its
// optimizer state.
void write_flattened(Output& output, const ManifestFile& base_file, bool base_flattened, const Recut& recut, int m,
                     int d) {
  std::vector<FlatShard> flats = chunk_flat(*recut.first.fsdp, recut.flat_weights[m], recut.options.dp, d);
  std::map<std::string, const NamedTensor*> by_name;
  for (const NamedTensor& tensor : recut.weights[m]) by_name[tensor.name] = &tensor;
  if (base_flattened) {
    replace_flat_model(output, base_file, flats, by_name);
  } else {
    build_flat_model(output, *recut.first.fsdp, flats, by_name);
  }
  rewrite_metadata(output.builder, output.base, flats);
  replace_optimizer_state(output, recut, m, d);
}

// Output (m, d): an edited copy of input part m % M, shard d % D.
struct PlannedOutput {
  std::string path;
  PlannedFile file;
  std::vector<NamedTensor> tensors;
};
PlannedOutput plan_output(const Bases& bases, const Recut& recut, const std::string& pattern,
                          const std::vector<std::uint32_t>& sources, int m, int d) {
  const ReshardOptions& options = recut.options;
  const int in_mp = static_cast<int>(bases.grid.size());
  const int in_dp = static_cast<int>(bases.grid[0].size());
  int base_index = bases.grid[m % in_mp][d % in_dp];
  const ManifestFile& base_file = bases.file(base_index);
  std::shared_ptr<const Checkpoint> base = bases.inputs.open(base_index);
  Output output(*base);
  bool base_flattened = has_flat_model(base_file);
  if (options.unflatten) {
    write_unflattened(output, base_file, recut, m);
  } else {
    write_flattened(output, base_file, base_flattened, recut, m, d);
  }
  if (!recut.keep_optimizer && !recut.keep_stateless_frame)
    output.builder.drop_top_level(std::string(kOptimizerStateKey));
  output.builder.set_model_parallel_size(options.mp);
  PlannedOutput out;
  out.path = output_path(pattern, options.mp, options.dp, m, d);
  out.file = output.builder.finish(out.path, sources, bases.sources.at(static_cast<std::size_t>(base_index)));
  pack(out.file);  // hundreds of outputs are planned before the first is written
  if (options.list_tensors) out.tensors = std::move(output.written);
  return out;
}

// Every output, planned in parallel (each opens its base file and edits a copy
// of its object graph: the cost of a plan of hundreds of outputs), kept in
// (m, d) order; the first failing output in that order is the one reported.
void plan_outputs(const Bases& bases, const Recut& recut, const std::string& pattern,
                  const std::vector<std::uint32_t>& sources, ReshardPlan& out) {
  const auto dp = static_cast<std::size_t>(recut.options.dp);
  std::vector<PlannedOutput> planned = parallel_map(
      static_cast<std::size_t>(recut.options.mp) * dp, std::thread::hardware_concurrency(), [&](std::size_t k) {
        return plan_output(bases, recut, pattern, sources, static_cast<int>(k / dp), static_cast<int>(k % dp));
      });
  for (PlannedOutput& output : planned) {
    out.outputs.push_back(std::move(output.path));
    out.plan.files.push_back(std::move(output.file));
    if (recut.options.list_tensors) out.tensors.push_back(std::move(output.tensors));
  }
}

}  // namespace

ReshardPlan plan_reshard(const PlanInputs& inputs, const std::string& pattern, const ReshardOptions& options,
                         const PlanInputs* layout_from) {
  check_request(options);
  const Manifest& manifest = inputs.manifest();
  std::vector<std::vector<int>> grid = complete_grid(manifest);
  const ManifestFile& first = manifest.files[grid[0][0]];
  check_training_checkpoint(first);
  Bases bases{layout_from != nullptr ? *layout_from : inputs, {}, {}};
  bases.grid = layout_from != nullptr ? complete_grid(layout_from->manifest()) : grid;
  check_layout_file(bases.first(), options, layout_from != nullptr);
  QkvForm form = output_qkv_form(bases.first(), options);

  ReshardPlan out;
  std::vector<std::string> states =
      optimizer_states_to_write(first, bases.first(), layout_from != nullptr, options, out.notes);
  if (!states.empty()) {
    check_optimizer_states(manifest, grid, states, bases.first().fsdp->buffer_names);
    if (layout_from != nullptr)
      check_optimizer_states(layout_from->manifest(), bases.grid, states, bases.first().fsdp->buffer_names);
  }
  Recut recut{bases.first(), options, !states.empty(), false, std::nullopt, {}, {}, {}, {}};
  // A frame without states to cut (Adam before its first step) stays as it is.
  recut.keep_stateless_frame =
      states.empty() && layout_from == nullptr && !options.drop_optimizer_state && !options.unflatten;
  if (layout_from != nullptr && !states.empty()) recut.step = optimizer_step(first, grid[0][0]);
  // The layout rules name the tensor; with one input file, the error names it too.
  const bool one_file = grid.size() == 1 && grid[0].size() == 1;
  try {
    Weights weights = recut_weights(manifest, grid, options.mp, form, out.checks);
    if (layout_from != nullptr) check_against_template(weights, form, bases, first.path);
    recut.weights = std::move(weights.recut);
    if (recut.keep_optimizer) {
      recut.optimizer =
          recut_optimizer_state(manifest, grid, states, bases.first().fsdp->buffer_names, options.mp, form, out.checks);
    }
    recut.flatten();
  } catch (const Error& error) {
    if (!one_file || !error.where().file.empty()) throw;
    throw Error(error.kind(), Location{first.path, error.where().member, error.where().byte_offset}, error.message());
  }

  std::vector<std::uint32_t> sources;
  for (std::size_t i = 0; i < inputs.files().size(); ++i)
    sources.push_back(out.plan.add_source(inputs.source(static_cast<int>(i))));
  if (layout_from == nullptr) {
    bases.sources = sources;
  } else {
    for (std::size_t i = 0; i < layout_from->files().size(); ++i)
      bases.sources.push_back(out.plan.add_source(layout_from->source(static_cast<int>(i))));
  }
  plan_outputs(bases, recut, pattern, sources, out);
  std::set<std::string> unique(out.outputs.begin(), out.outputs.end());
  if (unique.size() != out.outputs.size()) throw Error(ErrorKind::Usage, "-o names two outputs with the same path");
  return out;
}

}  // namespace ckpt
