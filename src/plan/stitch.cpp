#include "ckpt/plan/stitch.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/optimizer_state.hpp"

#include <fmt/format.h>

#include <charconv>
#include <map>
#include <numeric>

#include "ckpt/format/pyobject.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/export.hpp"
#include "ckpt/plan/nested_output.hpp"

namespace ckpt {

std::string ema_state_dict(const ManifestFile& file) {
  for (const char* candidate : {"extra_state/ema_fp32_params", "extra_state/ema"}) {
    std::string prefix = std::string(candidate) + "/";
    for (const StoredTensor& tensor : file.tensors) {
      if (tensor.path.rfind(prefix, 0) == 0) return candidate;
    }
  }
  throw Error(Location{file.path, "", std::nullopt},
              "--ema: no EMA weights here (extra_state holds neither ema_fp32_params nor ema)");
}

namespace {

void convert_dtype(std::vector<NamedTensor>& tensors, DType dtype) {
  for (NamedTensor& tensor : tensors) {
    if (!tensor.alias_of && dtype_info(tensor.dtype()).floating) tensor.convert_to = dtype;
  }
}

// Whose other objects each output carries: the grid's first file, or with one
// output per part, each part's first file.
std::vector<const Checkpoint*> stitch_bases(const PlanInputs& inputs, const std::vector<std::vector<int>>& grid,
                                            bool stitch_megatron) {
  std::vector<const Checkpoint*> bases;
  if (stitch_megatron) {
    bases.push_back(&inputs.checkpoint(grid[0][0]));
  } else {
    for (const std::vector<int>& shards : grid) bases.push_back(&inputs.checkpoint(shards[0]));
  }
  return bases;
}

// --filter on a state dict: the tensors whose key matches, in order. A kept
// tie whose tensor is left out becomes that tensor's copy under its own key.
std::vector<NamedTensor> filtered(std::vector<NamedTensor> tensors,
                                  const std::function<bool(const std::string&)>& keep) {
  std::map<std::string, const NamedTensor*> by_name;
  for (const NamedTensor& tensor : tensors) by_name.emplace(tensor.name, &tensor);
  std::vector<NamedTensor> kept;
  for (NamedTensor& tensor : tensors) {
    if (!keep(tensor.name)) continue;
    if (tensor.alias_of && !keep(*tensor.alias_of)) untie(tensor, *by_name.at(*tensor.alias_of));
    kept.push_back(std::move(tensor));
  }
  return kept;
}

// The consolidated parts glued into one state dict, and the checks of what was
// taken from one part as replicated.
// (Both take the consolidated parts to free them as soon as they are used.)
void plan_glued(std::vector<std::vector<NamedTensor>> consolidated, const GlueOptions& glue, StitchPlan& out) {
  out.tensors.push_back(glue_and_check(std::move(consolidated), glue, out.checks));
}

// One state dict per consolidated part.
void plan_per_part(std::vector<std::vector<NamedTensor>> consolidated, StitchPlan& out) {
  for (auto& part : consolidated) out.tensors.push_back(std::move(part));
}

// --optimizer-state: every state of every part consolidated (FSDP flat states
// unpadded and split, or a consolidated file's per-parameter states), then
// glued like the weights, or one list per part; what should agree across the
// parts (the states of replicated weights) goes to `checks`.
std::vector<OptimizerStates> consolidate_states(const Manifest& manifest, const std::vector<std::vector<int>>& grid,
                                                const StitchOptions& options, std::vector<ReplicatedCheck>& checks) {
  const ManifestFile& first = manifest.files[grid[0][0]];
  std::vector<std::string> buffers = first.fsdp ? first.fsdp->buffer_names : std::vector<std::string>{};
  std::vector<std::string> names = optimizer_state_names(first, buffers);
  if (names.empty()) {
    throw Error(Location{first.path, std::string(kOptimizerStateKey), std::nullopt},
                "--optimizer-state: no per-parameter optimizer state (exp_avg, ...) here");
  }
  check_optimizer_states(manifest, grid, names, buffers);
  std::vector<OptimizerStates> out(options.stitch_megatron ? 1 : grid.size());
  for (const std::string& name : names) {
    std::vector<std::vector<NamedTensor>> parts;
    for (const auto& shards : grid) parts.push_back(consolidate_optimizer_state(manifest, shards, name, buffers));
    if (options.stitch_megatron) {
      out[0].emplace_back(name, glue_and_check(std::move(parts), options.glue, checks, optimizer_state_label(name)));
    } else {
      for (std::size_t m = 0; m < parts.size(); ++m) out[m].emplace_back(name, std::move(parts[m]));
    }
  }
  return out;
}

// last_optimizer_state as torch's optimizer saves it for the output's
// parameters: state <i> of the i-th parameter (`weights` in order, ties left
// out) holds its tensor of each state and the other entries (step, ...) of the
// input's state 0; the one param group lists them all. The rest of the
// input's last_optimizer_state (loss_scale, ...) is carried.
void set_parameter_states(CheckpointBuilder& builder, const std::vector<NamedTensor>& weights,
                          const OptimizerStates& states, const std::string& base_path) {
  pickle::Graph& graph = builder.graph();
  auto fail = [&](const std::string& where, const std::string& message) {
    return Error(Location{base_path, where, std::nullopt}, "--optimizer-state: " + message);
  };
  pickle::NodeId frame = builder.top_level(std::string(kOptimizerStateKey));
  pickle::NodeId state = frame == pickle::kNoNode ? pickle::kNoNode : graph.lookup(frame, "state");
  std::span<const pickle::Entry> entries = graph.mapping_entries(state);
  if (entries.empty() || !graph.is_mapping(entries.front().second)) {
    throw fail(std::string(kOptimizerStateKey) + "/state", "not a dict of per-parameter dicts");
  }
  std::span<const pickle::Entry> first = graph.mapping_entries(entries.front().second);
  const std::vector<pickle::Entry> frame_entries(first.begin(), first.end());
  auto groups = as_sequence(graph, graph.lookup(frame, "param_groups"));
  if (!groups || groups->size() != 1) {
    throw fail(std::string(kOptimizerStateKey) + "/param_groups",
               fmt::format("{} param groups: which parameters each holds is not recorded per parameter, so only "
                           "one group can be written",
                           groups ? groups->size() : 0));
  }
  const pickle::NodeId group = groups->front();
  std::map<std::string, std::map<std::string, const NamedTensor*>> by_state;  // state -> parameter -> tensor
  for (const auto& [name, tensors] : states) {
    for (const NamedTensor& tensor : tensors) by_state[unescape_label(name)][tensor.name] = &tensor;
  }
  const auto& params_of_first = by_state.begin()->second;
  std::vector<std::string> params;
  for (const NamedTensor& tensor : weights) {
    if (!tensor.alias_of && params_of_first.count(tensor.name) != 0) params.push_back(tensor.name);
  }
  check_invariant(params.size() == params_of_first.size(), "optimizer states of parameters the weights lack");
  pickle::Node per_parameter;
  per_parameter.kind = pickle::Kind::Dict;
  for (std::size_t i = 0; i < params.size(); ++i) {
    pickle::Node one;
    one.kind = pickle::Kind::Dict;
    for (const auto& [key, value] : frame_entries) {
      std::optional<std::string> name = as_str(graph, key);
      auto it = name ? by_state.find(*name) : by_state.end();
      one.entries.emplace_back(key, it == by_state.end() ? value : builder.add_tensor((*it->second.at(params[i]))));
    }
    per_parameter.entries.emplace_back(graph.integer(static_cast<std::int64_t>(i)), graph.add(std::move(one)));
  }
  std::vector<std::int64_t> indices(params.size());
  std::iota(indices.begin(), indices.end(), 0);
  bool ok = builder.set_entry(frame, "state", graph.add(std::move(per_parameter))) &&
            builder.set_entry(group, "params", add_int_list(graph, indices));
  if (!ok) throw fail(std::string(kOptimizerStateKey) + "/param_groups", "a param group without params");
}

// A state dict to write, and what its format may need beside it (StateDictOutput).
struct ToPlan {
  const Checkpoint* base;
  std::vector<NamedTensor> tensors;
  const OptimizerStates* states;
  const StateDict* nested;
  const ParameterStates* parameter_states = nullptr;
  const Checkpoint* states_file = nullptr;
};

// The node at object path `path` of `graph` ("a/0/b": dict keys, an int key by
// its text, list indices), or kNoNode.
pickle::NodeId node_at(const pickle::Graph& graph, std::string_view path) {
  pickle::NodeId at = graph.root;
  for (const std::string& label : path_labels(path)) {
    if (at == pickle::kNoNode) break;
    pickle::NodeId next = pickle::kNoNode;
    if (graph.is_mapping(at)) {
      for (const auto& [key, value] : graph.mapping_entries(at)) {
        const pickle::NodeView view = graph[key];
        if ((view.kind == pickle::Kind::Str && view.text == label) ||
            (view.kind == pickle::Kind::Int && std::to_string(view.integer) == label)) {
          next = value;
          break;
        }
      }
    } else if (auto items = as_sequence(graph, at)) {
      std::size_t index = 0;
      auto [end, ec] = std::from_chars(label.data(), label.data() + label.size(), index);
      if (ec == std::errc() && end == label.data() + label.size() && index < items->size()) next = (*items)[index];
    }
    at = next;
  }
  return at;
}

// A torch file {"model": the tensors, "last_optimizer_state": the states in
// torch's optimizer form} (ParameterStates): what stitch --optimizer-state
// writes for a set that is no training checkpoint (DeepSpeed).
PlannedFile plan_torch_with_parameter_states(const std::string& path, const std::vector<NamedTensor>& tensors,
                                             const ParameterStates& states, const Checkpoint& states_file,
                                             const std::vector<std::uint32_t>& sources, Plan& plan) {
  CheckpointBuilder builder;
  pickle::Graph& graph = builder.graph();
  const pickle::Graph& from = states_file.graph();
  auto fail = [&](const std::string& where, const std::string& message) {
    return Error(Location{states_file.path(), where, std::nullopt}, "--optimizer-state: " + message);
  };
  // What is copied as it is (hyperparameters, a step that is a number) holds no
  // tensor: its storage would name the input's record, not one of the output.
  auto copied_once = [&](pickle::NodeId node, const std::string& where) {
    for (pickle::NodeId reached : reachable(from, node)) {
      if (from[reached].kind == pickle::Kind::PersId) throw fail(where, "holds a tensor, which is not carried yet");
    }
    return copy_value(graph, from, node);
  };
  // Each state's entries: a parameter's own tensors, a copy of each of the
  // state's scalar tensors, and the other values copied once (its parameters'
  // states share them).
  struct Entry {
    pickle::NodeId key;
    std::optional<std::string> name;
    pickle::NodeId value = pickle::kNoNode;  // a value copied once, or kNoNode for a tensor
  };
  std::vector<std::vector<Entry>> layouts;
  for (std::size_t k = 0; k < states.state_paths.size(); ++k) {
    const pickle::NodeId entries = node_at(from, states.state_paths[k]);
    if (!from.is_mapping(entries)) throw fail(states.state_paths[k], "not a dict");
    layouts.emplace_back();
    for (const auto& [key, value] : from.mapping_entries(entries)) {
      Entry entry{copy_value(graph, from, key), as_str(from, key)};
      auto named = [&](const auto& list) {
        return std::any_of(list.begin(), list.end(), [&](const auto& item) { return entry.name == item.first; });
      };
      if (!named(states.tensors) && !named(states.shared[k])) {
        entry.value = copied_once(value, states.state_paths[k] + "/" + entry.name.value_or("?"));
      }
      layouts.back().push_back(std::move(entry));
    }
  }
  pickle::NodeId model = builder.add_state_dict(tensors);
  pickle::Node per_parameter;
  per_parameter.kind = pickle::Kind::Dict;
  for (std::size_t i = 0; i < states.params.size(); ++i) {
    const std::size_t k = states.state_of[i];
    pickle::Node one;
    one.kind = pickle::Kind::Dict;
    for (const Entry& entry : layouts.at(k)) {
      pickle::NodeId value = entry.value;
      for (const auto& [state, per] : states.tensors) {
        if (entry.name == state) value = builder.add_tensor(NamedTensor(states.params[i], per.at(i)));
      }
      for (const auto& [state, source] : states.shared[k]) {
        if (entry.name == state) value = builder.add_tensor(NamedTensor(states.params[i], source));
      }
      one.entries.emplace_back(entry.key, value);
    }
    per_parameter.entries.emplace_back(graph.integer(static_cast<std::int64_t>(i)), graph.add(std::move(one)));
  }
  std::vector<pickle::NodeId> groups;
  for (std::size_t g = 0; g < states.group_paths.size(); ++g) {
    const pickle::NodeId group = node_at(from, states.group_paths[g]);
    if (!from.is_mapping(group)) throw fail(states.group_paths[g], "not a dict");
    const pickle::NodeId copy = copied_once(group, states.group_paths[g]);
    std::vector<std::int64_t> params(states.group_params[g].begin(), states.group_params[g].end());
    if (!builder.set_entry(copy, "params", add_int_list(graph, params))) {
      throw fail(states.group_paths[g], "a param group without params");
    }
    groups.push_back(copy);
  }
  pickle::Node frame;
  frame.kind = pickle::Kind::Dict;
  frame.entries.emplace_back(graph.str(kOptimizerStates), graph.add(std::move(per_parameter)));
  frame.entries.emplace_back(graph.str(kParamGroups), graph.add_items(pickle::Kind::List, groups));
  builder.set_top_level("model", model);
  builder.set_top_level(std::string(kOptimizerStateKey), graph.add(std::move(frame)));
  return builder.finish(path, sources, plan);
}

// Each state dict written at its path in `format` (--dtype converting it): the
// inputs made the plan's sources, a folder format's folders made, the files of
// an earlier set there listed as stale.
void plan_outputs(const PlanInputs& inputs, const OutputFormatInfo& format, const std::vector<std::string>& paths,
                  std::vector<ToPlan> outputs, const StitchOptions& options, StitchPlan& out) {
  std::vector<std::uint32_t> sources;
  for (std::size_t i = 0; i < inputs.files().size(); ++i)
    sources.push_back(out.plan.add_source(inputs.source(static_cast<int>(i))));
  for (std::size_t k = 0; k < outputs.size(); ++k) {
    ToPlan& output = outputs[k];
    if (options.dtype) convert_dtype(output.tensors, *options.dtype);
    if (format.folder) out.plan.directories.push_back(paths[k]);
    format.plan({output.base, std::move(output.tensors), paths[k], output.states, sources, output.nested,
                 &inputs.files(), output.parameter_states, output.states_file},
                options, out);
  }
  if (format.replaces_set) out.plan.stale_files = stale_set_files(out.plan, paths, format.folder);
}

// One torch.save output: the base's objects with the state dict replaced.
// The tensors are freed before the pickle is written, unless they are listed.
PlannedFile plan_torch_output(const Checkpoint& base, std::vector<NamedTensor>& tensors, const std::string& path,
                              const StitchOptions& options, const OptimizerStates* states,
                              const std::vector<std::uint32_t>& sources, Plan& plan) {
  CheckpointBuilder builder(base);
  pickle::NodeId state_dict = builder.add_state_dict(tensors);
  auto release = [&] {
    if (!options.list_tensors) std::vector<NamedTensor>().swap(tensors);
  };
  if (options.weights_only) {
    std::vector<std::pair<std::string, pickle::NodeId>> kept{{"model", state_dict}};
    if (options.stitch_megatron) builder.set_model_parallel_size(1);
    for (const char* config : {"cfg", "args"}) {
      pickle::NodeId node = builder.top_level(config);
      if (options.keep_cfg && node != pickle::kNoNode) kept.emplace_back(config, plain_value(builder.graph(), node));
    }
    for (const std::string& key : builder.top_level_keys()) builder.drop_top_level(key);
    for (const auto& [key, node] : kept) builder.set_top_level(key, node);
    release();
    return builder.finish(path, sources, plan);
  }
  builder.set_top_level("model", state_dict);
  builder.drop_top_level("shard_metadata");
  if (states != nullptr) {
    set_parameter_states(builder, tensors, *states, base.path());
  } else {
    builder.drop_top_level(std::string(kOptimizerStateKey));
  }
  if (options.stitch_megatron) builder.set_model_parallel_size(1);
  release();
  return builder.finish(path, sources, plan);
}

}  // namespace

void plan_torch_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out) {
  if (output.base == nullptr && output.parameter_states != nullptr) {
    out.plan.files.push_back(plan_torch_with_parameter_states(output.path, output.tensors, *output.parameter_states,
                                                              *output.states_file, output.sources, out.plan));
    if (!options.list_tensors) output.tensors.clear();
    out.tensors.push_back(std::move(output.tensors));
    return;
  }
  if (output.base == nullptr) {
    check_invariant(output.nested != nullptr && output.files != nullptr, "a torch output planned without its input");
    out.plan.files.push_back(plan_nested_torch_file(output.path, output.tensors, output.nested->items,
                                                    output.nested->items_from, *output.files, output.sources,
                                                    out.plan));
    if (!options.list_tensors) output.tensors.clear();
    out.tensors.push_back(std::move(output.tensors));
    return;
  }
  out.plan.files.push_back(plan_torch_output(*output.base, output.tensors, output.path, options,
                                             output.optimizer_states, output.sources, out.plan));
  out.tensors.push_back(std::move(output.tensors));  // empty unless list_tensors: plan_torch_output released them
}

StitchPlan plan_stitch(const PlanInputs& inputs, const std::vector<std::string>& output_paths,
                       const StitchOptions& options) {
  const Manifest& manifest = inputs.manifest();
  std::vector<std::vector<int>> grid = complete_grid(manifest);
  std::vector<const Checkpoint*> bases = stitch_bases(inputs, grid, options.stitch_megatron);

  std::vector<std::vector<NamedTensor>> consolidated = consolidate_grid(manifest, grid, options.state_dict);

  const OutputFormatInfo& format = format_info(options.format);
  if (options.filter && (options.optimizer_state || format.hf_config)) {
    throw Error(ErrorKind::Usage,
                "--filter does not go with --optimizer-state or --format hf: they hold the whole model");
  }
  StitchPlan out;
  std::vector<ReplicatedCheck> state_checks;
  std::vector<OptimizerStates> states;
  if (options.optimizer_state) states = consolidate_states(manifest, grid, options, state_checks);

  if (options.stitch_megatron) {
    plan_glued(std::move(consolidated), options.glue, out);
  } else {
    plan_per_part(std::move(consolidated), out);
  }
  if (options.filter) {
    for (std::vector<NamedTensor>& tensors : out.tensors) {
      tensors = filtered(std::move(tensors), options.filter);
      if (tensors.empty()) {
        throw Error(ErrorKind::Usage, Location{output_paths.front(), "", std::nullopt},
                    "--filter matches no key of the state dict");
      }
    }
  }
  out.checks.insert(out.checks.end(), state_checks.begin(), state_checks.end());
  for (ReplicatedCheck& check : data_parallel_checks(manifest, grid, options.state_dict))
    out.checks.push_back(std::move(check));
  if (output_paths.size() != out.tensors.size() || bases.size() != out.tensors.size()) {
    internal_error(fmt::format("{} outputs planned for {} paths", out.tensors.size(), output_paths.size()));
  }

  std::vector<std::vector<NamedTensor>> state_dicts = std::move(out.tensors);
  out.tensors.clear();
  std::vector<ToPlan> outputs;
  for (std::size_t k = 0; k < state_dicts.size(); ++k) {
    outputs.push_back({bases[k], std::move(state_dicts[k]), states.empty() ? nullptr : &states[k], nullptr});
  }
  plan_outputs(inputs, format, output_paths, std::move(outputs), options, out);
  return out;
}

namespace {

// One torch file that is no training checkpoint, its top level a dict
// (torch.save(model.state_dict()), a nested dict of tensors), as a state dict:
// every tensor reached through dicts and lists, as torch's flatten_state_dict
// reaches it, under its path's elements joined with '.' and nesting by them; a
// tie a tie. What is not such a tensor (a value, an object of a class, a
// tensor inside one) is left out, with a note; a torch output (which would
// lose it) is refused.
StateDict plain_file_state_dict(const Manifest& manifest, const OutputFormatInfo& format,
                                std::vector<std::string>& notes) {
  using json = nlohmann::ordered_json;
  const ManifestFile& file = manifest.files.at(0);
  const json& root = *file.objects;
  if (format.carries_objects || !root.is_object() || root.contains("$class") || root.contains("$tensor")) {
    throw Error(Location{file.path, "", std::nullopt},
                fmt::format("{}: no training checkpoint (no 'model' state dict); one torch file whose top level is "
                            "a dict of tensors is written as safetensors (-o FILE.safetensors) or a DCP directory "
                            "(--format dcp)",
                            describe_contents(file)));
  }
  StateDict state = torch_state_dict(manifest, {.state_dict_only = true});  // tensors[i]: the file's tensor i
  std::map<std::string_view, std::size_t> index;                            // the tensors by path
  for (std::size_t i = 0; i < state.tensors.size(); ++i) index.emplace(state.tensors[i].name, i);
  std::size_t left_out = 0;
  KeyPath path;
  std::function<void(const json&)> walk = [&](const json& node) {
    if (node.is_object() && node.contains("$tensor")) {
      NestedItem item;
      item.key = flat_key(path);
      // (by its path: a tie's node gives its tensor's index, and the tie is a tensor of its own path)
      auto found = index.find(object_path(path));
      item.path = path;
      item.tensor = found != index.end() ? found->second : node["$tensor"].get<std::size_t>();
      state.items.push_back(std::move(item));
    } else if (node.is_object() && !node.contains("$class") && !node.empty()) {
      for (const auto& [key, value] : node.items()) {
        path.emplace_back(key);
        walk(value);
        path.pop_back();
      }
    } else if (node.is_array() && !node.empty()) {
      for (std::size_t i = 0; i < node.size(); ++i) {
        path.emplace_back(static_cast<std::int64_t>(i));
        walk(node[i]);
        path.pop_back();
      }
    } else {
      ++left_out;
    }
  };
  walk(root);
  if (left_out > 0) {
    notes.push_back(
        fmt::format("{}: {} value(s) that are no tensors of its dicts are left out: {} holds tensors "
                    "only",
                    file.path, left_out, format.label));
  }
  return state;
}

}  // namespace

bool reads_as_one_state_dict(const Manifest& manifest, const OutputFormatInfo& format) {
  if (!input_layout(manifest).training) return true;
  if (manifest.files.size() != 1) return false;
  const ManifestFile& file = manifest.files[0];
  // (a `model` of nested dicts, as dcp_to_torch_save writes one, is no training
  // state dict either: read so where the output holds tensors only)
  return !is_training_checkpoint(file) ||
         (!format.carries_objects && !file.fsdp && nested_tensor(file, std::string(kModelPrefix)) != nullptr);
}

StitchPlan plan_stitch_state_dict(const PlanInputs& inputs, const std::string& output_path,
                                  const StitchOptions& options) {
  const Manifest& manifest = inputs.manifest();
  const InputLayout& layout = input_layout(manifest);
  const OutputFormatInfo& format = format_info(options.format);
  if (format.hf_config) {
    throw Error(ErrorKind::Usage, Location{output_path, "", std::nullopt},
                fmt::format("{} needs an OPT training checkpoint's cfg, and a {} set has none: write safetensors "
                            "(-o FILE.safetensors) or torch (-o FILE.pt)",
                            format.label, layout.name));
  }
  StitchPlan out;
  StateDict state = layout.training ? plain_file_state_dict(manifest, format, out.notes)
                                    : layout.state_dict(manifest, {.weights_from_module = options.weights_from_module});
  out.checks = std::move(state.checks);
  if (state.items.empty()) {  // a flat set of tensors: each at the top level under its key
    for (std::size_t i = 0; i < state.tensors.size(); ++i) {
      NestedItem item;
      item.key = unescape_label(std::string_view(state.tensors[i].name).substr(kModelPrefix.size()));
      item.path = {item.key};
      item.tensor = i;
      state.items.push_back(std::move(item));
    }
  }
  // Every tensor under its item's key, in the items' order (a tie naming its
  // tensor's key, or a copy of it where that tensor is no item: one inside an
  // object of a plain file); then what --filter keeps.
  std::map<std::string, std::string> keys;  // tensor name -> its item's key
  std::map<std::string, std::size_t> by_name;
  for (std::size_t i = 0; i < state.tensors.size(); ++i) by_name.emplace(state.tensors[i].name, i);
  for (const NestedItem& item : state.items) {
    if (item.tensor) keys.emplace(state.tensors.at(*item.tensor).name, item.key);
  }
  std::vector<NamedTensor> tensors;
  for (NestedItem& item : state.items) {
    if (!item.tensor) continue;
    // (moved: a tie untied below reads only a tensor that is no item, never moved)
    NamedTensor tensor = std::move(state.tensors.at(*item.tensor));
    tensor.name = item.key;
    if (tensor.alias_of) {
      auto key = keys.find(*tensor.alias_of);
      if (key != keys.end()) {
        tensor.alias_of = key->second;
      } else {
        untie(tensor, state.tensors.at(by_name.at(*tensor.alias_of)));
      }
    }
    item.tensor = tensors.size();
    tensors.push_back(std::move(tensor));
  }
  if (options.filter) {
    tensors = filtered(std::move(tensors), options.filter);
    std::map<std::string_view, std::size_t> index;
    for (std::size_t i = 0; i < tensors.size(); ++i) index.emplace(tensors[i].name, i);
    std::erase_if(state.items, [&](NestedItem& item) {
      if (!options.filter(item.key)) return true;
      if (item.tensor) item.tensor = index.at(item.key);
      return false;
    });
  }
  if (format.format == OutputFormat::Safetensors) {  // (torch and dcp outputs carry the object items)
    const auto objects =
        std::count_if(state.items.begin(), state.items.end(), [](const NestedItem& item) { return !item.tensor; });
    if (objects > 0) {
      out.notes.push_back(fmt::format(
          "{} object item(s) (non-tensor values: {}, ...) are left out: {} holds "
          "tensors only",
          objects,
          std::find_if(state.items.begin(), state.items.end(), [](const NestedItem& item) { return !item.tensor; })
              ->key,
          format.label));
    }
  }
  if (options.filter && state.items.empty()) {
    throw Error(ErrorKind::Usage, Location{output_path, "", std::nullopt}, "--filter matches no key of the input");
  }
  std::optional<ParameterStates> states;
  if (options.optimizer_state) {
    if (layout.parameter_states == nullptr || options.filter) {
      throw Error(ErrorKind::Usage, Location{output_path, "", std::nullopt},
                  options.filter
                      ? std::string("--filter does not go with --optimizer-state: it holds the whole model")
                      : fmt::format("--optimizer-state: a {} set holds no optimizer state to give", layout.name));
    }
    states = layout.parameter_states(manifest);
  }
  std::vector<ToPlan> outputs;
  outputs.push_back({nullptr, std::move(tensors), nullptr, &state, states ? &*states : nullptr,
                     states ? &inputs.checkpoint(static_cast<int>(states->file)) : nullptr});
  plan_outputs(inputs, format, {output_path}, std::move(outputs), options, out);
  return out;
}

}  // namespace ckpt
