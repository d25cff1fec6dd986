// The DeepSpeed input layout (a ZeRO checkpoint's step folder): its row's
// functions. The set is the step folder's files, each a torch.save file
// described as one (torch_pickle), read together:
//
//   <save_dir>/latest                          the tag of the newest save ("global_step1200")
//   <save_dir>/<tag>/mp_rank_00_model_states.pt                   ZeRO-1/2: the 16-bit module,
//                                                                 buffer_names, param_shapes, ...
//   <save_dir>/<tag>/zero_pp_rank_{r}_mp_rank_00_model_states.pt  ZeRO-3: one per rank
//   <save_dir>/<tag>/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   every rank:
//       optimizer_state_dict = {zero_stage, partition_count,
//         single_partition_of_fp32_groups (ZeRO-1/2) | fp32_flat_groups (ZeRO-3): the fp32
//         masters, one flat tensor per group; base_optimizer_state | optimizer_state_dict:
//         Adam's exp_avg / exp_avg_sq over the same partitions, ...}
//
// The state dict is zero_to_fp32's: buffers (as fp32) from the module, frozen
// parameters from their fragments, trainable parameters from the fp32 masters
// (layout/zero.hpp), then shared_params as ties; only those byte ranges are read.
// A BF16_Optimizer's files (no zero_stage; partitions whole, padding kept) are
// read as ZeRO-1's, where zero_to_fp32 refuses them (the one place this reads
// more than it). Tensor-parallel (mp_rank_01 and up),
// pipeline (layer_*) and MoE expert files are refused by the set check.
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <unordered_map>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/io/units.hpp"
#include "ckpt/layout/zero.hpp"
#include "ckpt/manifest/input_layouts.hpp"

namespace ckpt {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

enum class DsKind : std::uint8_t { Model, Optim, PipelineLayer, Expert };

struct DsName {
  DsKind kind = DsKind::Model;
  std::optional<int> rank;  // zero_pp_rank_{r}
  int mp = 0;               // mp_rank_{mp}
};

int number(const std::ssub_match& digits) {
  return digits.length() > 9 ? 1'000'000'000 : std::stoi(digits.str());
}

std::optional<DsName> parse_name(const std::string& name) {
  static const std::regex model12(R"(mp_rank_(\d+)_model_states\.pt)");
  static const std::regex model3(R"(zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt)");
  static const std::regex optim(R"((?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt)");
  static const std::regex layer(R"(layer_\d+(?:-model_\d+)?-model_states\.pt)");
  static const std::regex expert(
      R"((?:layer_\d+_)?expert_\d+_mp_rank_\d+_model_states\.pt|expp_rank_\d+_mp_rank_\d+_optim_states\.pt)");
  std::smatch match;
  if (std::regex_match(name, match, model12)) return DsName{DsKind::Model, std::nullopt, number(match[1])};
  if (std::regex_match(name, match, model3)) return DsName{DsKind::Model, number(match[1]), number(match[2])};
  if (std::regex_match(name, match, optim)) return DsName{DsKind::Optim, number(match[1]), number(match[2])};
  if (std::regex_match(name, match, layer)) return DsName{DsKind::PipelineLayer, std::nullopt, 0};
  if (std::regex_match(name, match, expert)) return DsName{DsKind::Expert, std::nullopt, 0};
  return std::nullopt;
}

std::string file_name(const std::string& path) {
  return fs::path(path).filename().string();
}

// The DeepSpeed files of `folder`, sorted; none when it holds none.
std::vector<std::string> deepspeed_files(const fs::path& folder) {
  std::vector<std::string> files;
  std::error_code ec;
  fs::directory_iterator entries(folder, ec);
  if (ec) throw Error(ErrorKind::Io, Location{folder.string(), "", std::nullopt}, "cannot list: " + ec.message());
  for (const auto& entry : entries) {
    std::error_code entry_ec;
    if (!entry.is_regular_file(entry_ec) && !entry.is_symlink(entry_ec)) continue;
    if (parse_name(entry.path().filename().string())) files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// The tag `latest` names: its text without surrounding white space (DeepSpeed
// writes it without a newline; a person may add one).
std::string read_latest(const fs::path& latest) {
  std::ifstream in(latest, std::ios::binary);
  std::string text(256, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(in.gcount()));
  if (in.bad()) throw Error(ErrorKind::Io, Location{latest.string(), "", std::nullopt}, "cannot read");
  const auto first = text.find_first_not_of(" \t\r\n");
  const auto last = text.find_last_not_of(" \t\r\n");
  std::string tag = first == std::string::npos ? "" : text.substr(first, last - first + 1);
  if (tag.empty() || tag.size() > 200 || tag.find('/') != std::string::npos || tag == "." || tag == ".." ||
      tag.find('\0') != std::string::npos) {
    throw Error(Location{latest.string(), "", std::nullopt},
                fmt::format("holds {}, which is no step folder's name (DeepSpeed writes a tag such as "
                            "global_step1200; give the step folder itself or --tag)",
                            tag.empty() ? std::string("nothing") : "'" + tag + "'"));
  }
  return tag;
}

// --- Reading the set ------------------------------------------------------

// A value of the pickle for a message: its JSON, invalid UTF-8 replaced, cut at 40 bytes.
std::string shown(const json& value) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 40) text = text.substr(0, 40) + "...";
  return text;
}

const json* member(const json& object, std::string_view key) {
  if (!object.is_object()) return nullptr;
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

// The node a {"$ref": path} stands for (pickle memo sharing), from `root`.
const json& resolved(const json& root, const json& node) {
  const json* ref = member(node, "$ref");
  if (ref == nullptr || !ref->is_string()) return node;
  const json* at = &root;
  for (const std::string& label : path_labels(ref->get_ref<const std::string&>())) {
    if (at == nullptr) break;
    if (at->is_array()) {
      char* end = nullptr;
      unsigned long index = std::strtoul(label.c_str(), &end, 10);
      at = (end != nullptr && *end == '\0' && index < at->size()) ? &(*at)[index] : nullptr;
    } else {
      at = member(*at, label);
    }
  }
  static const json kNull;
  return at == nullptr ? kNull : *at;
}

// ZeroStageEnum as pickled: an int (DeepSpeed before 0.7), the class called
// with its value (Python before 3.11), or getattr(class, member name).
std::optional<int> zero_stage_of(const json& node) {
  if (node.is_number_integer()) return node.get<int>();
  const json* args = member(node, "args");
  if (args == nullptr || !args->is_array() || args->empty()) return std::nullopt;
  const json& last = args->back();
  if (last.is_number_integer()) return last.get<int>();
  static const std::map<std::string, int> kMembers = {
      {"disabled", 0}, {"optimizer_states", 1}, {"gradients", 2}, {"weights", 3}, {"max_stage", 3}};
  if (last.is_string()) {
    auto it = kMembers.find(last.get<std::string>());
    if (it != kMembers.end()) return it->second;
  }
  return std::nullopt;
}

std::optional<std::vector<std::int64_t>> shape_of(const json& node) {
  const json* value = member(node, "value");  // torch.Size
  const json& dims = value != nullptr ? *value : node;
  if (!dims.is_array()) return std::nullopt;
  std::vector<std::int64_t> shape;
  for (const json& dim : dims) {
    if (!dim.is_number_integer()) return std::nullopt;
    shape.push_back(dim.get<std::int64_t>());
  }
  return shape;
}

// An ordered name -> torch.Size mapping (param_shapes' groups, frozen_param_shapes).
std::optional<std::vector<ZeroParam>> params_of(const json& root, const json& node) {
  if (!node.is_object() || node.contains("$class")) return std::nullopt;
  std::vector<ZeroParam> params;
  for (const auto& [name, value] : node.items()) {
    std::optional<std::vector<std::int64_t>> shape = shape_of(resolved(root, value));
    if (!shape) return std::nullopt;
    params.push_back({name, std::move(*shape)});
  }
  return params;
}

struct DsSet {
  std::vector<std::string> problems;
  int stage = 0;
  bool bf16_optimizer = false;  // a BF16_Optimizer's files: no zero_stage
  std::int64_t world = 0;
  std::vector<int> optim;  // [rank]: the file index
  std::vector<int> model;  // ZeRO-1/2: the one model file; ZeRO-3: [rank]
  std::string flat_key;    // single_partition_of_fp32_groups or fp32_flat_groups
  std::vector<std::vector<ZeroParam>> groups;
  std::vector<ZeroParam> frozen;
  std::vector<std::pair<std::string, std::string>> shared;  // alias -> source
  std::vector<std::string> buffer_names;
  std::vector<std::pair<std::string, const StoredTensor*>> buffers;  // the module's buffers, in its order

  std::string ds_version;
  std::optional<std::int64_t> step;
  fs::path folder;
};

// The object path of `key`'s tensor in a file's dict `section` ("module/<key>"),
// its label as the describer makes it (an empty key too).
std::string tensor_path(std::string_view section, const std::string& key) {
  return state_dict_path(std::string(section) + "/", key);
}

// The optimizer file's ZeRO state (its optimizer_state_dict), or null.
const json* zero_state(const ManifestFile& file) {
  const json* state = member(*file.objects, "optimizer_state_dict");
  return state != nullptr && state->is_object() ? state : nullptr;
}

// The flat fp32 groups of rank file `file`, in group order; nullopt (a problem
// added) when one is not a stored tensor.
std::optional<std::vector<const StoredTensor*>> flat_groups(const ManifestFile& file, const std::string& key,
                                                            std::vector<std::string>& problems) {
  const json* state = zero_state(file);
  const json* groups = state == nullptr ? nullptr : member(*state, key);
  if (groups == nullptr || !groups->is_array()) {
    problems.push_back(fmt::format("{}: optimizer_state_dict has no list {}", file.path, key));
    return std::nullopt;
  }
  std::vector<const StoredTensor*> out;
  for (std::size_t g = 0; g < groups->size(); ++g) {
    const std::string path = fmt::format("optimizer_state_dict/{}/{}", key, g);
    const StoredTensor* tensor = find_tensor(file, path);
    if (tensor != nullptr && tensor->alias_of) tensor = find_tensor(file, *tensor->alias_of);
    if (tensor == nullptr) {
      problems.push_back(fmt::format("{}: {} is not a tensor", file.path, path));
      return std::nullopt;
    }
    out.push_back(tensor);
  }
  return out;
}

// Why a rank's file is not in the set: not there, or there but not read (its
// own error is reported where it was read).
std::string absence(const fs::path& folder, const std::string& name) {
  std::error_code ec;
  const bool there = fs::exists(folder / name, ec) || fs::exists(folder / ("bf16_" + name), ec);
  return there ? "is there but did not read" : "is missing";
}

// Whether the set's problems already say enough (a partition_count of 10^6
// with one file would list a million missing ranks): true once there are
// kMaxListed, after noting that the rest are left out.
constexpr std::size_t kMaxListed = 8;
bool enough_listed(DsSet& set, std::string_view what) {
  if (set.problems.size() < kMaxListed) return false;
  if (set.problems.size() == kMaxListed) {
    set.problems.push_back(fmt::format("{}: more missing {} not listed", set.folder.string(), what));
  }
  return true;
}

// What the optimizer files say: stage, world, the files by rank.
void read_optimizer_files(const std::vector<ManifestFile>& files, const std::vector<std::pair<int, DsName>>& optims,
                          DsSet& set) {
  std::optional<int> stage;
  std::optional<std::int64_t> world;
  std::string first;
  for (const auto& [index, name] : optims) {
    const ManifestFile& file = files[static_cast<std::size_t>(index)];
    const json* state = zero_state(file);
    if (state == nullptr) {
      set.problems.push_back(
          fmt::format("{}: no optimizer_state_dict: not a DeepSpeed ZeRO optimizer file", file.path));
      continue;
    }
    std::optional<int> file_stage;
    if (const json* node = member(*state, "zero_stage")) {
      file_stage = zero_stage_of(resolved(*file.objects, *node));
      if (!file_stage || *file_stage < 1 || *file_stage > 3) {
        set.problems.push_back(fmt::format("{}: zero_stage {} is no ZeRO stage 1, 2 or 3", file.path, shown(*node)));
        continue;
      }
    } else if (member(*state, "single_partition_of_fp32_groups") != nullptr) {
      file_stage = 1;  // BF16_Optimizer: ZeRO-1's partitions, padding kept
      set.bf16_optimizer = true;
    } else {
      set.problems.push_back(
          fmt::format("{}: optimizer_state_dict has no zero_stage: not a DeepSpeed ZeRO optimizer file", file.path));
      continue;
    }
    std::optional<std::int64_t> file_world;
    const json* count = member(*state, "partition_count");
    if (count != nullptr) {
      const json& value = resolved(*file.objects, *count);
      if (value.is_number_integer()) file_world = value.get<std::int64_t>();
      if (value.is_array()) {  // ZeRO-1/2: one per group; the largest is the world (zero_to_fp32's max)
        for (const json& item : value) {
          if (item.is_number_integer()) file_world = std::max(file_world.value_or(0), item.get<std::int64_t>());
        }
      }
    }
    if (!file_world || *file_world < 1 || *file_world > kMaxGridSide) {
      set.problems.push_back(
          count == nullptr
              ? fmt::format("{}: no partition_count (the data-parallel world size)", file.path)
              : fmt::format("{}: partition_count {} is no world size (an int, or a list of them, from 1 to {})",
                            file.path, shown(*count), kMaxGridSide));
      continue;
    }
    if (!stage) {
      stage = file_stage;
      world = file_world;
      first = file.path;
    } else if (*stage != *file_stage || *world != *file_world) {
      set.problems.push_back(
          fmt::format("{}: ZeRO stage {} over {} ranks, but {} says stage {} over {}: files of "
                      "two saves",
                      file.path, *file_stage, *file_world, file_name(first), *stage, *world));
    }
  }
  if (!stage) return;
  set.stage = *stage;
  set.world = *world;
  set.flat_key = set.stage <= 2 ? "single_partition_of_fp32_groups" : "fp32_flat_groups";
  set.optim.assign(static_cast<std::size_t>(set.world), -1);
  for (const auto& [index, name] : optims) {
    const int rank = *name.rank;
    const std::string& path = files[static_cast<std::size_t>(index)].path;
    if (rank >= set.world) {
      set.problems.push_back(
          fmt::format("{}: rank {}, but partition_count is {}: a file of another save", path, rank, set.world));
    } else if (int& slot = set.optim[static_cast<std::size_t>(rank)]; slot >= 0) {
      set.problems.push_back(fmt::format("{}: a second optimizer file of rank {} (beside {})", path, rank,
                                         file_name(files[static_cast<std::size_t>(slot)].path)));
    } else {
      slot = index;
    }
  }
  for (std::size_t r = 0; r < set.optim.size(); ++r) {
    if (set.optim[r] < 0 && !enough_listed(set, "optimizer files")) {
      const std::string name = fmt::format("zero_pp_rank_{}_mp_rank_00_optim_states.pt", r);
      set.problems.push_back(fmt::format("{}: rank {}'s optimizer file ({}) {}: partition_count is {}",
                                         set.folder.string(), r, name, absence(set.folder, name), set.world));
    }
  }
}

// What the model file(s) say: param_shapes, frozen and shared parameters, buffers.
void read_model_files(const std::vector<ManifestFile>& files, const std::vector<std::pair<int, DsName>>& models,
                      DsSet& set) {
  if (set.stage <= 2) {
    for (const auto& [index, name] : models) {
      if (name.rank) {
        set.problems.push_back(fmt::format("{}: a ZeRO-3 model file in a ZeRO-{} set", files[index].path, set.stage));
      } else if (!set.model.empty()) {
        set.problems.push_back(fmt::format("{}: a second model file (beside {})", files[index].path,
                                           file_name(files[static_cast<std::size_t>(set.model.front())].path)));
      } else {
        set.model.push_back(index);
      }
    }
    if (set.model.empty()) {
      set.problems.push_back(
          fmt::format("{}: mp_rank_00_model_states.pt is missing (it holds param_shapes)", set.folder.string()));
    }
  } else {
    set.model.assign(static_cast<std::size_t>(set.world), -1);
    for (const auto& [index, name] : models) {
      if (!name.rank) {
        set.problems.push_back(fmt::format("{}: a ZeRO-1/2 model file in a ZeRO-3 set", files[index].path));
      } else if (*name.rank >= set.world) {
        set.problems.push_back(fmt::format("{}: rank {}, but partition_count is {}: a file of another save",
                                           files[index].path, *name.rank, set.world));
      } else if (set.model[static_cast<std::size_t>(*name.rank)] >= 0) {
        set.problems.push_back(fmt::format("{}: a second model file of rank {}", files[index].path, *name.rank));
      } else {
        set.model[static_cast<std::size_t>(*name.rank)] = index;
      }
    }
    for (std::size_t r = 0; r < set.model.size(); ++r) {
      if (set.model[r] < 0 && !enough_listed(set, "model files")) {
        const std::string name = fmt::format("zero_pp_rank_{}_mp_rank_00_model_states.pt", r);
        set.problems.push_back(fmt::format("{}: rank {}'s model file ({}) {}: partition_count is {}",
                                           set.folder.string(), r, name, absence(set.folder, name), set.world));
      }
    }
  }
  if (set.model.empty() || set.model.front() < 0) return;
  const ManifestFile& first = files[static_cast<std::size_t>(set.model.front())];
  const json& root = *first.objects;
  const json* buffers = member(root, "buffer_names");
  const json* shapes = member(root, "param_shapes");
  if (buffers == nullptr || shapes == nullptr || !resolved(root, *shapes).is_array()) {
    set.problems.push_back(
        fmt::format("{}: no buffer_names and param_shapes: not a DeepSpeed ZeRO model state file", first.path));
    return;
  }
  const json& names = resolved(root, *buffers);
  if (!names.is_array() || !std::all_of(names.begin(), names.end(), [](const json& n) { return n.is_string(); })) {
    set.problems.push_back(fmt::format("{}: buffer_names is not a list of names", first.path));
    return;
  }
  for (const json& name : names) set.buffer_names.push_back(name.get<std::string>());
  // The buffers zero_to_fp32 takes: the module's entries named in buffer_names,
  // in the module's order, each a tensor (it calls .float() on them).
  const json* module = member(root, "module");
  if (module == nullptr || !module->is_object() || module->contains("$class")) {
    set.problems.push_back(fmt::format("{}: module is not a state dict", first.path));
    return;
  }
  const std::set<std::string> buffer_names(set.buffer_names.begin(), set.buffer_names.end());
  for (const auto& [key, value] : module->items()) {
    if (!buffer_names.contains(key)) continue;
    const StoredTensor* tensor = find_tensor(first, tensor_path("module", key));
    if (tensor != nullptr && tensor->alias_of) tensor = find_tensor(first, *tensor->alias_of);
    if (tensor == nullptr) {
      set.problems.push_back(fmt::format("{}: module/{}: a buffer (buffer_names) that is no tensor", first.path, key));
      return;
    }
    set.buffers.emplace_back(key, tensor);
  }
  for (const json& group : resolved(root, *shapes)) {
    std::optional<std::vector<ZeroParam>> params = params_of(root, resolved(root, group));
    if (!params) {
      set.problems.push_back(
          fmt::format("{}: param_shapes[{}] is not a map of names to shapes", first.path, set.groups.size()));
      return;
    }
    set.groups.push_back(std::move(*params));
  }
  if (const json* frozen = member(root, "frozen_param_shapes"); frozen != nullptr && !frozen->is_null()) {
    std::optional<std::vector<ZeroParam>> params = params_of(root, resolved(root, *frozen));
    if (!params) {
      set.problems.push_back(fmt::format("{}: frozen_param_shapes is not a map of names to shapes", first.path));
    } else {
      set.frozen = std::move(*params);
    }
  }
  if (const json* shared = member(root, "shared_params"); shared != nullptr && shared->is_object()) {
    for (const auto& [alias, source] : resolved(root, *shared).items()) {
      if (source.is_string()) set.shared.emplace_back(alias, source.get<std::string>());
    }
  }
  if (const json* steps = member(root, "global_steps"); steps != nullptr && steps->is_number_integer()) {
    set.step = steps->get<std::int64_t>();
  }
  if (const json* version = member(root, "ds_version"); version != nullptr && version->is_string()) {
    set.ds_version = version->get<std::string>();
  }
  // Every rank's model file of one save: the same step and param_shapes.
  for (std::size_t r = 1; r < set.model.size(); ++r) {
    if (set.model[r] < 0) continue;
    const ManifestFile& other = files[static_cast<std::size_t>(set.model[r])];
    const json* other_shapes = member(*other.objects, "param_shapes");
    const json* other_steps = member(*other.objects, "global_steps");
    if (other_shapes == nullptr || *other_shapes != *shapes) {
      set.problems.push_back(fmt::format("{}: its param_shapes differ from {}'s: files of two saves or models",
                                         other.path, file_name(first.path)));
    } else if (const json* steps = member(root, "global_steps");
               steps != nullptr && (other_steps == nullptr || *other_steps != *steps)) {
      set.problems.push_back(fmt::format("{}: global_steps {}, {} says {}: files of two saves", other.path,
                                         other_steps == nullptr ? "missing" : shown(*other_steps),
                                         file_name(first.path), shown(*steps)));
    }
  }
}

// The ds_version every file records, which must be one.
void check_versions(const std::vector<ManifestFile>& files, DsSet& set) {
  std::string first_path;
  std::string first;
  for (const ManifestFile& file : files) {
    const json* version = member(*file.objects, "ds_version");
    if (version == nullptr || !version->is_string()) continue;
    if (first_path.empty()) {
      first_path = file.path;
      first = version->get<std::string>();
    } else if (version->get<std::string>() != first) {
      set.problems.push_back(fmt::format("{}: written by DeepSpeed {}, {} by {}: files of two saves", file.path,
                                         version->get<std::string>(), file_name(first_path), first));
      return;
    }
  }
  if (set.ds_version.empty()) set.ds_version = first;
}

// The trainable parameters, groups merged, in param_shapes order.
std::vector<ZeroParam> trainable_params(const DsSet& set) {
  std::vector<ZeroParam> all;
  for (const std::vector<ZeroParam>& group : set.groups) all.insert(all.end(), group.begin(), group.end());
  return all;
}

// Each trainable parameter's bytes (trainable_params' order) from the ranks'
// flat tensors, ranks[r][g] being rank r's of group g (ZeRO-3: sub-group): the
// fp32 masters, or an Adam moment over the same partitions.
ZeroUnflattened unflatten_ranks(const DsSet& set, const std::vector<std::vector<TensorSource>>& ranks) {
  if (set.stage >= 3) return zero3_params(ranks, trainable_params(set), set.world);
  ZeroUnflattened out;
  for (std::size_t r = 0; r < ranks.size(); ++r) {
    if (ranks[r].size() != set.groups.size()) {
      out.problem =
          fmt::format("rank {} holds {} flat groups, and param_shapes has {}", r, ranks[r].size(), set.groups.size());
      return out;
    }
  }
  for (std::size_t g = 0; g < set.groups.size(); ++g) {
    std::vector<TensorSource> partitions;
    for (const std::vector<TensorSource>& rank : ranks) partitions.push_back(rank[g]);
    ZeroUnflattened made = zero12_group(partitions, set.groups[g], set.world);
    if (made.problem) {
      out.problem = fmt::format("param group {}: {}", g, *made.problem);
      return out;
    }
    for (TensorSource& param : made.params) out.params.push_back(std::move(param));
  }
  return out;
}

// The parameters of the set: trainable (in param_shapes order) and frozen.
struct Unflattened {
  std::vector<NamedTensor> trainable;
  std::vector<NamedTensor> frozen;
};

TensorSource stored_source(const std::vector<ManifestFile>& files, int index, const StoredTensor& tensor) {
  const ManifestFile& file = files[static_cast<std::size_t>(index)];
  return source_of(tensor, file, static_cast<std::uint32_t>(index));
}

Unflattened unflatten_set(const std::vector<ManifestFile>& files, DsSet& set) {
  Unflattened out;
  // ranks[r][g]: rank r's flat group g
  std::vector<std::vector<TensorSource>> ranks;
  for (std::size_t r = 0; r < set.optim.size(); ++r) {
    const ManifestFile& file = files[static_cast<std::size_t>(set.optim[r])];
    std::optional<std::vector<const StoredTensor*>> groups = flat_groups(file, set.flat_key, set.problems);
    if (!groups) return out;
    ranks.emplace_back();
    for (const StoredTensor* tensor : *groups) {
      if (tensor->shape.size() != 1) {
        set.problems.push_back(fmt::format("{}: {}: a flat group of shape {}, not 1-D", file.path, tensor->path,
                                           shape_text(tensor->shape)));
        return out;
      }
      ranks.back().push_back(stored_source(files, set.optim[r], *tensor));
    }
  }
  auto add = [&](std::vector<NamedTensor>& to, const std::vector<ZeroParam>& params, ZeroUnflattened made) {
    for (std::size_t i = 0; i < made.params.size(); ++i) {
      TensorKind kind{TensorWrap::Tensor, false};
      to.emplace_back(state_dict_path(kModelPrefix, params[i].name), std::move(made.params[i]), std::nullopt, kind);
    }
  };
  ZeroUnflattened made = unflatten_ranks(set, ranks);
  if (made.problem) {
    set.problems.push_back(fmt::format("{}: {}", set.folder.string(), *made.problem));
    return out;
  }
  add(out.trainable, trainable_params(set), std::move(made));
  // Frozen parameters: rank 0's whole 16-bit tensor (ZeRO-2; ZeRO-1 saves
  // none), or every rank's fragment glued (ZeRO-3).
  for (const ZeroParam& param : set.frozen) {
    std::vector<TensorSource> fragments;
    for (int index : set.model) {
      const ManifestFile& file = files[static_cast<std::size_t>(index)];
      const StoredTensor* tensor = find_tensor(file, tensor_path("frozen_param_fragments", param.name));
      if (tensor != nullptr && tensor->alias_of) tensor = find_tensor(file, *tensor->alias_of);
      if (tensor == nullptr) {
        set.problems.push_back(
            fmt::format("{}: frozen parameter {} has no tensor in frozen_param_fragments", file.path, param.name));
        return out;
      }
      fragments.push_back(stored_source(files, index, *tensor));
      if (set.stage <= 2) break;
    }
    if (set.stage <= 2) {
      out.frozen.emplace_back(state_dict_path(kModelPrefix, param.name), std::move(fragments.front()));
      continue;
    }
    ZeroUnflattened made = zero3_frozen(fragments, param);
    if (made.problem) {
      set.problems.push_back(fmt::format("{}: frozen {}", set.folder.string(), *made.problem));
      return out;
    }
    add(out.frozen, {param}, std::move(made));
  }
  return out;
}

// The whole set read, its problems listed (none: it reads as zero_to_fp32 reads it).
struct ReadSet {
  DsSet set;
  Unflattened params;
};

ReadSet read_set(const std::vector<ManifestFile>& files) {
  ReadSet out;
  DsSet& set = out.set;
  if (files.empty()) return out;
  set.folder = fs::path(files.front().path).parent_path();
  std::vector<std::pair<int, DsName>> optims;
  std::vector<std::pair<int, DsName>> models;
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string& path = files[i].path;
    std::optional<DsName> name = parse_name(file_name(path));
    if (fs::path(path).parent_path() != set.folder) {
      set.problems.push_back(
          fmt::format("{}: not in the step folder {} (a DeepSpeed set is one folder)", path, set.folder.string()));
    } else if (!name) {
      set.problems.push_back(fmt::format("{}: not a DeepSpeed checkpoint file", path));
    } else if (name->kind == DsKind::PipelineLayer) {
      set.problems.push_back(
          fmt::format("{}: a pipeline-parallel layer file: DeepSpeed pipeline checkpoints are not "
                      "supported yet (convert them with DeepSpeed's ds_to_universal.py)",
                      path));
    } else if (name->kind == DsKind::Expert) {
      set.problems.push_back(
          fmt::format("{}: a mixture-of-experts file: DeepSpeed MoE checkpoints are not supported yet", path));
    } else if (name->mp != 0) {
      set.problems.push_back(
          fmt::format("{}: tensor-parallel rank {}: DeepSpeed checkpoints with tensor "
                      "parallelism (mp_rank_01 and up) are not supported yet",
                      path, name->mp));
    } else {
      (name->kind == DsKind::Optim ? optims : models).emplace_back(static_cast<int>(i), *name);
    }
  }
  if (!set.problems.empty()) return out;
  if (optims.empty()) {
    set.problems.push_back(
        fmt::format("{}: no *_optim_states.pt: the fp32 weights are in the optimizer files, "
                    "and none is here",
                    set.folder.string()));
    return out;
  }
  read_optimizer_files(files, optims, set);
  if (!set.problems.empty()) return out;
  read_model_files(files, models, set);
  if (!set.problems.empty()) return out;
  check_versions(files, set);
  if (!set.problems.empty()) return out;
  // One name, one entry: zero_to_fp32's dict would keep one of two silently.
  std::map<std::string, std::string_view> kinds;
  auto once = [&](const std::string& name, std::string_view kind) {
    auto [it, added] = kinds.emplace(name, kind);
    if (!added) {
      set.problems.push_back(
          fmt::format("{}: {} is named twice, as a {} and as a {}: the state dict would hold one of "
                      "them",
                      set.folder.string(), name, it->second, kind));
    }
    return added;
  };
  for (const auto& [key, tensor] : set.buffers) {
    if (!once(key, "buffer")) return out;
  }
  for (const ZeroParam& param : set.frozen) {
    if (!once(param.name, "frozen parameter")) return out;
  }
  for (const std::vector<ZeroParam>& group : set.groups) {
    for (const ZeroParam& param : group) {
      if (!once(param.name, "trainable parameter")) return out;
    }
  }
  out.params = unflatten_set(files, set);
  return out;
}

bool is_moment(const StoredTensor& tensor) {
  return tensor.path.ends_with("/exp_avg") || tensor.path.ends_with("/exp_avg_sq");
}

// zero_to_fp32's `state_dict[alias] = state_dict[source]` for each shared
// parameter in order, whose source is a key by then: the alias's key (where it
// was, as dict assignment keeps a key's place; else appended) then names the
// object the source's key names at that moment. Each object is written once,
// at the first key naming it; the later keys are ties to that one.
void tie_shared(std::vector<NamedTensor>& tensors, const std::vector<std::pair<std::string, std::string>>& shared) {
  std::vector<std::string> keys;
  std::vector<std::size_t> object_of;  // key i names object object_of[i] (a tensor of `tensors` before)
  std::unordered_map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    keys.push_back(tensors[i].name);
    object_of.push_back(i);
    index.emplace(tensors[i].name, i);
  }
  for (const auto& [alias, source] : shared) {
    auto from = index.find(state_dict_path(kModelPrefix, source));
    if (from == index.end()) continue;
    const std::size_t object = object_of[from->second];
    const std::string alias_key = state_dict_path(kModelPrefix, alias);
    auto [at, added] = index.emplace(alias_key, keys.size());
    if (added) {
      keys.push_back(alias_key);
      object_of.push_back(object);
    } else {
      object_of[at->second] = object;
    }
  }
  std::vector<NamedTensor> out;
  std::unordered_map<std::size_t, std::string> written;  // object -> the key holding it
  for (std::size_t i = 0; i < keys.size(); ++i) {
    auto [holder, first] = written.emplace(object_of[i], keys[i]);
    if (first) {
      NamedTensor tensor = tensors[object_of[i]];
      tensor.name = keys[i];
      out.push_back(std::move(tensor));
    } else {
      out.emplace_back(keys[i], TensorSource{}, holder->second);
    }
  }
  tensors = std::move(out);
}

}  // namespace

bool claims_deepspeed(std::string_view path) {
  return parse_name(file_name(std::string(path))).has_value();
}

std::optional<std::vector<std::string>> deepspeed_files_in(const std::string& input) {
  std::error_code ec;
  if (!fs::is_directory(input, ec)) return std::nullopt;
  const fs::path latest = fs::path(input) / "latest";
  const bool named_latest = fs::symlink_status(latest, ec).type() != fs::file_type::not_found && !ec;
  if (named_latest && !fs::is_regular_file(latest, ec)) {
    throw Error(Location{latest.string(), "", std::nullopt},
                "not a file (DeepSpeed writes the tag of the newest save there): give the step folder itself");
  }
  if (named_latest) {
    const std::string tag = read_latest(latest);
    const fs::path folder = fs::path(input) / tag;
    if (!fs::is_directory(folder, ec)) {
      throw Error(ErrorKind::IncompleteSet, Location{latest.string(), "", std::nullopt},
                  fmt::format("names the step folder {}, which is not there", tag));
    }
    std::vector<std::string> files = deepspeed_files(folder);
    if (files.empty()) {
      throw Error(ErrorKind::IncompleteSet, Location{folder.string(), "", std::nullopt},
                  "the step folder `latest` names holds no *_model_states.pt or *_optim_states.pt");
    }
    return files;
  }
  std::vector<std::string> files = deepspeed_files(input);
  if (files.empty()) return std::nullopt;
  return files;
}

ManifestFile describe_deepspeed_file(FileDescriber& describer, const std::string& path) {
  ManifestFile file = describer.describe_torch(path);
  file.format = FileFormat::DeepSpeed;
  return file;
}

Grid check_deepspeed_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> /*model_parts*/) {
  Grid grid;
  ReadSet read = read_set(files);
  grid.problems = std::move(read.set.problems);
  return grid;
}

StateDict deepspeed_state_dict(const Manifest& manifest, const StateDictOptions& options) {
  ReadSet read = read_set(manifest.files);
  DsSet& set = read.set;
  if (!set.problems.empty()) {
    std::string more = set.problems.size() > 1 ? fmt::format(" (and {} more problem(s): `ckpt-tool verify` lists them)",
                                                             set.problems.size() - 1)
                                               : "";
    throw Error(ErrorKind::IncompleteSet, set.problems.front() + more);
  }
  const auto& files = manifest.files;
  const ManifestFile& model = files[static_cast<std::size_t>(set.model.front())];
  StateDict out;
  out.consolidated = true;
  // Buffers: the module's, in its order, as fp32 (zero_to_fp32 calls .float()).
  for (const auto& [key, tensor] : set.buffers) {
    out.tensors.emplace_back(state_dict_path(kModelPrefix, key), DType::Float32,
                             stored_source(files, set.model.front(), *tensor));
    if (tensor->dtype == DType::Float32) out.tensors.back().convert_to.reset();
  }
  for (NamedTensor& tensor : read.params.frozen) out.tensors.push_back(std::move(tensor));
  if (options.weights_from_module) {
    if (set.stage == 3) {
      throw Error(ErrorKind::Usage, Location{model.path, "", std::nullopt},
                  "--weights-from module: a ZeRO-3 module holds placeholders (each rank has a slice of every "
                  "parameter only in its optimizer file); read the fp32 weights");
    }
    for (NamedTensor& tensor : read.params.trainable) {
      const std::string key = unescape_label(std::string_view(tensor.name).substr(kModelPrefix.size()));
      const StoredTensor* stored = find_tensor(model, tensor_path("module", key));
      if (stored != nullptr && stored->alias_of) stored = find_tensor(model, *stored->alias_of);
      if (stored == nullptr || stored->shape != tensor.source.shape) {
        throw Error(Location{model.path, tensor_path("module", key), std::nullopt},
                    stored == nullptr ? std::string("not in the module, which param_shapes lists")
                                      : fmt::format("shape {} in the module, {} in param_shapes",
                                                    shape_text(stored->shape), shape_text(tensor.source.shape)));
      }
      tensor.source = stored_source(files, set.model.front(), *stored);
    }
  }
  for (NamedTensor& tensor : read.params.trainable) out.tensors.push_back(std::move(tensor));
  tie_shared(out.tensors, set.shared);
  return out;
}

ParameterStates deepspeed_parameter_states(const Manifest& manifest) {
  ReadSet read = read_set(manifest.files);
  DsSet& set = read.set;
  if (!set.problems.empty()) throw Error(ErrorKind::IncompleteSet, set.problems.front());
  const auto& files = manifest.files;
  // Where the base optimizer's torch state is: ZeRO-1/2 keep it whole
  // (base_optimizer_state, one state per group over the padded partition),
  // ZeRO-3 as optimizer_state_dict (one state per sub-group).
  const std::string base =
      set.stage <= 2 ? "optimizer_state_dict/base_optimizer_state" : "optimizer_state_dict/optimizer_state_dict";
  const ManifestFile& first = files[static_cast<std::size_t>(set.optim.front())];
  auto fail = [&](const ManifestFile& file, const std::string& what) {
    return Error(Location{file.path, base, std::nullopt}, "--optimizer-state: " + what);
  };
  const json* base_node = member(*first.objects, "optimizer_state_dict");
  base_node = base_node == nullptr
                  ? nullptr
                  : member(*base_node, set.stage <= 2 ? "base_optimizer_state" : "optimizer_state_dict");
  const json* states = base_node == nullptr ? nullptr : member(*base_node, "state");
  const json* groups = base_node == nullptr ? nullptr : member(*base_node, "param_groups");
  if (states == nullptr || !states->is_object() || groups == nullptr || !groups->is_array()) {
    throw fail(first,
               "no optimizer state in torch's form (state and param_groups): an elastic checkpoint, or one "
               "saved without its optimizer, is not read yet");
  }
  ParameterStates out;
  out.file = static_cast<std::uint32_t>(set.optim.front());
  // One state per group (ZeRO-3: sub-group), k, as rank 0 holds it: its tensors
  // of one or more dimensions are the moments (a sub-group of one scalar
  // parameter has them of shape [1]), every state holding the same; its scalar
  // tensors (step) go to each of its parameters.
  std::vector<std::string> names;
  std::set<std::string> first_names;  // state 0's entries
  for (std::size_t k = 0; k < set.groups.size(); ++k) {
    out.state_paths.push_back(fmt::format("{}/state/{}", base, k));
    const json* state = member(*states, std::to_string(k));
    if (state == nullptr || !state->is_object() || state->contains("$class")) {
      throw fail(first, fmt::format("state {} is missing or no dict: there is one per param group", k));
    }
    out.shared.emplace_back();
    std::set<std::string> entry_names;
    for (const auto& [name, value] : state->items()) entry_names.insert(name);
    if (k == 0) first_names = entry_names;
    if (entry_names != first_names) {
      throw fail(first, fmt::format("state {} holds other entries than state 0 (a state per param group, each "
                                    "with the same)",
                                    k));
    }
    for (const auto& [name, value] : state->items()) {
      const StoredTensor* tensor = find_tensor(first, tensor_path(out.state_paths[k], name));
      if (tensor == nullptr) continue;
      if (tensor->shape.empty()) {
        out.shared[k].emplace_back(name, stored_source(files, set.optim.front(), *tensor));
      } else if (std::find(names.begin(), names.end(), name) == names.end()) {
        if (k > 0) throw fail(first, fmt::format("state {} holds {}, and state 0 does not", k, name));
        names.push_back(name);
      }
    }
  }
  if (names.empty()) throw fail(first, "state 0 holds no tensor over the flat partition (exp_avg)");
  // ranks[r][k]: rank r's flat state `name` of group k. At ZeRO-3 each must be
  // as long as the rank's fp32 flat group k: the sub-groups' moments are cut
  // across their boundaries, so a swap of two would go unseen otherwise.
  for (const std::string& name : names) {
    std::vector<std::vector<TensorSource>> ranks;
    for (int index : set.optim) {
      const ManifestFile& file = files[static_cast<std::size_t>(index)];
      std::vector<std::string> problems;
      std::optional<std::vector<const StoredTensor*>> weights = flat_groups(file, set.flat_key, problems);
      ranks.emplace_back();
      for (std::size_t k = 0; k < set.groups.size(); ++k) {
        const std::string path = tensor_path(out.state_paths[k], name);
        const StoredTensor* tensor = find_tensor(file, path);
        if (tensor == nullptr || tensor->shape.size() != 1) throw fail(file, path + " is not a 1-D tensor");
        if (set.stage == 3 && weights && k < weights->size() && tensor->numel() != (*weights)[k]->numel()) {
          throw fail(file, fmt::format("{} holds {} elements, and {}/{} {}", path, tensor->numel(), set.flat_key, k,
                                       (*weights)[k]->numel()));
        }
        ranks.back().push_back(stored_source(files, index, *tensor));
      }
    }
    ZeroUnflattened made = unflatten_ranks(set, ranks);
    if (made.problem) {
      throw Error(ErrorKind::IncompleteSet, Location{set.folder.string(), "", std::nullopt},
                  fmt::format("--optimizer-state: {}: {}", name, *made.problem));
    }
    out.tensors.emplace_back(name, std::move(made.params));
  }
  // Parameters in order, and the groups that hold them: ZeRO-1/2's torch group g
  // is param group g; ZeRO-3's lists its sub-groups.
  std::vector<std::size_t> first_of_group;  // the first parameter index of each (sub-)group
  for (std::size_t k = 0; k < set.groups.size(); ++k) {
    first_of_group.push_back(out.params.size());
    for (const ZeroParam& param : set.groups[k]) {
      out.params.push_back(state_dict_path(kModelPrefix, param.name));
      out.state_of.push_back(k);
    }
  }
  first_of_group.push_back(out.params.size());
  std::set<std::size_t> taken;
  for (std::size_t j = 0; j < groups->size(); ++j) {
    out.group_paths.push_back(fmt::format("{}/param_groups/{}", base, j));
    const json* params = member(resolved(*first.objects, (*groups)[j]), "params");
    if (params == nullptr || !params->is_array()) throw fail(first, fmt::format("param_groups[{}] has no params", j));
    std::vector<std::size_t> held;

    for (const json& k : *params) {
      if (!k.is_number_integer() || k.get<std::int64_t>() < 0 || k.get<std::size_t>() + 1 >= first_of_group.size()) {
        throw fail(first, fmt::format("param_groups[{}] lists {}, and there are {} groups", j, shown(k),
                                      first_of_group.size() - 1));
      }
      if (!taken.insert(k.get<std::size_t>()).second) {
        throw fail(first, fmt::format("param_groups[{}] lists {}, which a param group listed already", j, shown(k)));
      }
      for (std::size_t i = first_of_group[k.get<std::size_t>()]; i < first_of_group[k.get<std::size_t>() + 1]; ++i)
        held.push_back(i);
    }
    out.group_params.push_back(std::move(held));
  }
  return out;
}

ModelCounts count_deepspeed_model(const Manifest& manifest) {
  ModelCounts counts;
  counts.counted_from = "DeepSpeed's param_shapes";
  ReadSet read = read_set(manifest.files);
  for (const std::vector<ZeroParam>& group : read.set.groups) {
    for (const ZeroParam& param : group) counts.parameters += shape_numel(param.shape).value_or(0);
  }
  for (const ZeroParam& param : read.set.frozen) counts.parameters += shape_numel(param.shape).value_or(0);
  for (const auto& [name, tensor] : read.set.buffers) counts.buffers += tensor->numel();
  for (int index : read.set.optim) {
    if (index < 0) continue;
    for (const StoredTensor& tensor : manifest.files[static_cast<std::size_t>(index)].tensors) {
      if (is_moment(tensor)) counts.optimizer_state += tensor.numel();
    }
  }
  return counts;
}

std::vector<std::string> deepspeed_summary(const Manifest& manifest) {
  ReadSet read = read_set(manifest.files);
  const DsSet& set = read.set;
  std::vector<std::string> lines;
  if (set.stage == 0) return lines;
  const auto& files = manifest.files;
  const ManifestFile& first_optim =
      files[static_cast<std::size_t>(set.optim.empty() || set.optim.front() < 0 ? 0 : set.optim.front())];
  std::string optimizer = set.bf16_optimizer ? "BF16_Optimizer (ZeRO-1)" : fmt::format("ZeRO stage {}", set.stage);
  std::string prefix = file_name(first_optim.path).starts_with("bf16_") ? ", bf16" : "";
  lines.push_back(fmt::format("DeepSpeed {} checkpoint {}: {}{}, {} data-parallel rank(s){}",
                              set.ds_version.empty() ? std::string("(version not recorded)") : set.ds_version,
                              set.folder.string(), optimizer, prefix, set.world,
                              set.step ? fmt::format(", step {}", *set.step) : std::string()));
  std::size_t params = 0;
  std::uint64_t elements = 0;
  for (const std::vector<ZeroParam>& group : set.groups) {
    params += group.size();
    for (const ZeroParam& param : group) elements += shape_numel(param.shape).value_or(0);
  }
  lines.push_back(
      fmt::format("param groups: {} ({} trainable parameter(s), {} elements)", set.groups.size(), params, elements));
  if (!set.frozen.empty()) {
    std::uint64_t frozen = 0;
    for (const ZeroParam& param : set.frozen) frozen += shape_numel(param.shape).value_or(0);
    lines.push_back(fmt::format("frozen parameters: {} ({} elements, kept in the module's 16-bit dtype)",
                                set.frozen.size(), frozen));
  }
  if (!set.shared.empty()) {
    std::string pairs;
    for (const auto& [alias, source] : set.shared) {
      if (!pairs.empty()) pairs += ", ";
      pairs += alias;
      pairs += " -> ";
      pairs += source;
    }
    lines.push_back("shared parameters (written as ties): " + pairs);
  }
  std::uint64_t weights = 0;
  std::uint64_t moments = 0;
  std::uint64_t module = 0;
  for (int index : set.optim) {
    if (index < 0) continue;
    for (const StoredTensor& tensor : files[static_cast<std::size_t>(index)].tensors) {
      if (tensor.path.starts_with("optimizer_state_dict/" + set.flat_key + "/")) weights += tensor.nbytes;
      if (is_moment(tensor)) moments += tensor.nbytes;
    }
  }
  for (int index : set.model) {
    if (index < 0) continue;
    for (const StoredTensor& tensor : files[static_cast<std::size_t>(index)].tensors) {
      if (!tensor.alias_of &&
          (tensor.path.starts_with("module/") || tensor.path.starts_with("frozen_param_fragments/")))
        module += tensor.nbytes;
    }
  }
  lines.push_back(
      fmt::format("bytes: fp32 weights {}, Adam moments {}, 16-bit module {} (stitch reads the weights, "
                  "buffers and frozen parameters)",
                  human_bytes(weights), human_bytes(moments), human_bytes(module)));
  return lines;
}

}  // namespace ckpt
