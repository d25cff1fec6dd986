// Resharding: consolidate each input part (weights and per-parameter optimizer
// state) as byte ranges, re-cut the model-parallel parts, flatten and chunk for
// the new FSDP world size, and write each output as an edited copy of an input
// file, so every object the training code saved is carried through.
#include "ckpt/plan/reshard.hpp"

#include <fmt/format.h>

#include <map>
#include <set>

#include "ckpt/format/pyobject.hpp"
#include "ckpt/layout/fsdp.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"

namespace ckpt {

using pickle::kNoNode;
using pickle::NodeId;

std::string output_path(const std::string& pattern, int mp, int dp, int m, int d) {
  bool has_m = pattern.find("{m}") != std::string::npos;
  bool has_d = pattern.find("{d}") != std::string::npos;
  if ((mp > 1 && !has_m) || (dp > 1 && !has_d)) {
    throw Error(fmt::format("-o '{}' must contain {}{}{} to name {} x {} outputs", pattern, mp > 1 ? "{m}" : "",
                            mp > 1 && dp > 1 ? " and " : "", dp > 1 ? "{d}" : "", mp, dp));
  }
  std::string path = pattern;
  for (std::size_t at; (at = path.find("{m}")) != std::string::npos;) path.replace(at, 3, std::to_string(m));
  for (std::size_t at; (at = path.find("{d}")) != std::string::npos;) path.replace(at, 3, std::to_string(d));
  return path;
}

namespace {

// Names of the flat per-parameter optimizer states (exp_avg, exp_avg_sq, ...):
// 1-D tensors under last_optimizer_state/state/0/ as long as flat parameter 0.
std::vector<std::string> flat_state_names(const ManifestFile& file) {
  std::vector<std::string> names;
  if (!file.fsdp || file.fsdp->instances.empty() || file.fsdp->instances[0].flat_params.empty()) return names;
  const ManifestTensor* weight = find_tensor(file, "model/" + file.fsdp->instances[0].flat_params[0].state_key);
  if (weight == nullptr) return names;
  const std::string prefix = "last_optimizer_state/state/0/";
  for (const ManifestTensor& tensor : file.tensors) {
    if (tensor.path.rfind(prefix, 0) != 0 || !tensor.alias_of.empty()) continue;
    if (tensor.shape.size() == 1 && tensor.numel() == weight->numel())
      names.push_back(tensor.path.substr(prefix.size()));
  }
  return names;
}

const TensorRef* base_tensor(const Checkpoint& base, const std::string& path) {
  const TensorRef* tensor = base.find_tensor(path);
  if (tensor == nullptr || !tensor->alias_of.empty()) {
    throw Error(Location{base.path(), path, std::nullopt}, "expected a tensor here to replace");
  }
  return tensor;
}

// shard_metadata of an output: the base's, with each flat parameter's shapes,
// numels and padding rewritten.
void rewrite_metadata(CheckpointBuilder& builder, const Checkpoint& base, const std::vector<FlatShard>& flats) {
  pickle::Graph& graph = builder.graph();
  NodeId metadata = builder.top_level("shard_metadata");
  NodeId instances = config_get(graph, metadata, "param_metadata");
  const auto* list = as_sequence(graph, instances);
  auto fail = [&](const std::string& message) {
    return Error(Location{base.path(), "shard_metadata", std::nullopt}, message);
  };
  if (list == nullptr) throw fail("no param_metadata list");
  for (const FlatShard& flat : flats) {
    if (flat.instance >= list->size()) throw fail("fewer instances than the input's first file");
    NodeId params = config_get(graph, (*list)[flat.instance], "params");
    const auto* entries = graph.mapping_entries(params);
    if (entries == nullptr || flat.flat_param >= entries->size()) throw fail("params do not match the first file's");
    NodeId entry = (*entries)[flat.flat_param].second;
    std::vector<NodeId> shapes;
    for (const auto& shape : flat.shapes) shapes.push_back(add_torch_size(graph, shape));
    bool ok = builder.set_entry(entry, "shapes", add_list(graph, std::move(shapes))) &&
              builder.set_entry(entry, "numels", add_int_list(graph, flat.numels)) &&
              builder.set_entry(entry, "padding", graph.integer(flat.padding));
    if (!ok) throw fail("a flat parameter's metadata lacks shapes, numels or padding");
  }
}

}  // namespace

ReshardPlan plan_reshard(const Manifest& manifest, const std::vector<const MappedFile*>& files,
                         const std::function<const Checkpoint&(int)>& open_base, const std::string& pattern,
                         const ReshardOptions& options) {
  if (options.mp < 1 || options.dp < 1) throw Error("--mp and --dp must be at least 1");
  if (options.unflatten && options.dp != 1) throw Error("--unflatten writes consolidated parts: it needs --dp 1");
  std::vector<std::vector<int>> grid = complete_grid(manifest);
  const int in_mp = static_cast<int>(grid.size());
  const int in_dp = static_cast<int>(grid[0].size());
  const ManifestFile& first = manifest.files[grid[0][0]];
  check_training_checkpoint(first);
  if (!options.unflatten && !first.fsdp) {
    throw Error(Location{first.path, "", std::nullopt},
                "no shard_metadata, so the FSDP layout is unknown: only --dp 1 --unflatten can be written");
  }

  ReshardPlan out;
  // Weights: consolidate every input part, re-cut for the new part count.
  std::vector<std::vector<NamedTensor>> parts;
  for (const auto& shards : grid) parts.push_back(consolidate_part(manifest, shards));
  std::vector<std::string> replicated;
  std::vector<std::vector<NamedTensor>> weights = reshard_megatron(parts, options.mp, &replicated);
  for (const std::string& key : replicated) {
    ReplicatedCheck check{key, {}};
    for (const auto& part : parts) {
      for (const NamedTensor& tensor : part) {
        if (tensor.name == key) check.parts.push_back(tensor.source);
      }
    }
    out.checks.push_back(std::move(check));
  }

  // Optimizer state follows its weights, parameter by parameter.
  bool keep_optimizer = !options.drop_optimizer_state && !options.unflatten;
  std::vector<std::string> state_names = keep_optimizer ? flat_state_names(first) : std::vector<std::string>{};
  std::map<std::string, std::vector<std::vector<NamedTensor>>> optimizer;  // name -> [out part] -> params
  for (const std::string& name : state_names) {
    std::vector<std::vector<NamedTensor>> state_parts;
    for (const auto& shards : grid) state_parts.push_back(consolidate_optimizer_state(manifest, shards, name));
    optimizer[name] = reshard_megatron(state_parts, options.mp, nullptr);
  }

  std::vector<std::uint32_t> sources;
  for (const MappedFile* file : files) sources.push_back(out.plan.add_source(*file));
  for (int m = 0; m < options.mp; ++m) {
    for (int d = 0; d < options.dp; ++d) {
      int base_index = grid[m % in_mp][d % in_dp];
      const ManifestFile& base_file = manifest.files[base_index];
      const Checkpoint& base = open_base(base_index);
      CheckpointBuilder builder(base);
      std::vector<OutputTensor> written;
      auto replace = [&](const std::string& path, OutputTensor tensor) {
        builder.replace_tensor(base_tensor(base, path)->node, tensor);
        written.push_back(std::move(tensor));
      };
      bool base_flattened =
          base_file.fsdp &&
          find_tensor(base_file, "model/" + base_file.fsdp->instances.at(0).flat_params.at(0).state_key) != nullptr;

      if (options.unflatten) {
        std::vector<OutputTensor> model;
        for (const NamedTensor& tensor : weights[m]) model.push_back(as_output(tensor));
        builder.set_top_level("model", builder.add_state_dict(model));
        for (const OutputTensor& tensor : model) {
          if (!tensor.alias_of) written.push_back(tensor);
        }
        if (base_file.fsdp) rewrite_metadata(builder, base, flatten_fsdp(*first.fsdp, weights[m], 1, 0));
      } else {
        std::vector<FlatShard> flats = flatten_fsdp(*first.fsdp, weights[m], options.dp, d);
        std::map<std::string, const NamedTensor*> by_name;
        for (const NamedTensor& tensor : weights[m]) by_name[tensor.name] = &tensor;
        if (base_flattened) {
          // Edit the base's flattened model in place: key order and _metadata stay.
          for (const FlatShard& flat : flats)
            replace("model/" + flat.state_key, {flat.state_key, flat.source.dtype, flat.source, std::nullopt});
          for (const ManifestTensor& tensor : base_file.tensors) {
            if (tensor.path.rfind("model/", 0) != 0 || !tensor.alias_of.empty()) continue;
            std::string key = tensor.path.substr(6);
            bool is_flat =
                std::any_of(flats.begin(), flats.end(), [&](const FlatShard& f) { return f.state_key == key; });
            if (is_flat) continue;
            auto it = by_name.find(key);
            if (it == by_name.end() || it->second->alias_of) {
              throw Error(Location{base.path(), tensor.path, std::nullopt}, "not a flat parameter and not a buffer");
            }
            replace(tensor.path, as_output(*it->second));
          }
        } else {
          // From consolidated parts: flat parameters in metadata order, then buffers.
          std::vector<OutputTensor> model;
          for (const FlatShard& flat : flats)
            model.push_back({flat.state_key, flat.source.dtype, flat.source, std::nullopt});
          for (const std::string& buffer : first.fsdp->buffer_names) {
            auto it = by_name.find(buffer);
            if (it != by_name.end() && !it->second->alias_of) model.push_back(as_output(*it->second));
          }
          builder.set_top_level("model", builder.add_state_dict(model));
          written.insert(written.end(), model.begin(), model.end());
        }
        rewrite_metadata(builder, base, flats);
        for (const auto& [name, state] : optimizer) {
          std::vector<FlatShard> slices = flatten_fsdp(*first.fsdp, state[m], options.dp, d);
          for (std::size_t k = 0; k < slices.size(); ++k) {
            replace(fmt::format("last_optimizer_state/state/{}/{}", k, name),
                    {slices[k].state_key, slices[k].source.dtype, slices[k].source, std::nullopt});
          }
        }
      }
      if (!keep_optimizer) builder.drop_top_level("last_optimizer_state");
      builder.set_model_parallel_size(options.mp);
      std::string path = output_path(pattern, options.mp, options.dp, m, d);
      out.outputs.push_back(path);
      out.plan.files.push_back(builder.finish(path, sources, out.plan));
      out.tensors.push_back(std::move(written));
    }
  }
  std::set<std::string> unique(out.outputs.begin(), out.outputs.end());
  if (unique.size() != out.outputs.size()) throw Error("-o names two outputs with the same path");
  return out;
}

}  // namespace ckpt
