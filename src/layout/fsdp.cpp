// fairscale's consolidate_shard_weights as byte ranges: no tensor is loaded.
#include <fmt/format.h>

#include <functional>
#include <map>
#include <set>

#include "ckpt/layout.hpp"

namespace ckpt {

namespace {

std::string join_path(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// Tensors of a state dict in order: "model/x" -> "x".
std::vector<std::pair<std::string, const ManifestTensor*>> state_dict_tensors(const ManifestFile& file,
                                                                              const std::string& prefix) {
  std::vector<std::pair<std::string, const ManifestTensor*>> out;
  for (const ManifestTensor& tensor : file.tensors) {
    if (tensor.path.rfind(prefix, 0) == 0) out.emplace_back(tensor.path.substr(prefix.size()), &tensor);
  }
  return out;
}

bool is_flattened(const ManifestFile& file, const std::string& prefix) {
  if (!file.fsdp) return false;
  for (const FsdpInstanceMeta& instance : file.fsdp->instances) {
    for (const FlatParamMeta& flat : instance.flat_params) {
      if (find_tensor(file, prefix + flat.state_key) != nullptr) return true;
    }
  }
  return false;
}

}  // namespace

namespace {

// Every flat parameter of the part, unpadded, concatenated over the shards and
// split into its named parameters. `path_of(flat, index)` is the object path of
// a flat parameter's tensor in each shard (index counts flat parameters in
// metadata order).
using FlatPath = std::function<std::string(const FlatParamMeta&, std::size_t)>;

std::vector<NamedTensor> unflatten(const Manifest& manifest, const std::vector<int>& shard_files,
                                   const FlatPath& path_of) {
  const ManifestFile& first = manifest.files.at(shard_files[0]);
  const FsdpMetadata& metadata = *first.fsdp;
  std::vector<NamedTensor> out;
  std::set<std::string> taken;
  std::size_t flat_index = 0;
  for (std::size_t i = 0; i < metadata.instances.size(); ++i) {
    const FsdpInstanceMeta& instance = metadata.instances[i];
    for (std::size_t j = 0; j < instance.flat_params.size(); ++j, ++flat_index) {
      const FlatParamMeta& flat = instance.flat_params[j];
      const std::string path = path_of(flat, flat_index);
      if (flat.numels.size() != flat.names.size() || flat.shapes.size() != flat.names.size()) {
        throw Error(Location{first.path, path, std::nullopt},
                    "shard_metadata: names, shapes and numels have different lengths");
      }
      std::vector<TensorSource> real_parts;
      std::optional<DType> flat_dtype;
      for (std::size_t d = 0; d < shard_files.size(); ++d) {
        const ManifestFile& shard = manifest.files.at(shard_files[d]);
        auto fail = [&](const std::string& message) { return Error(Location{shard.path, path, std::nullopt}, message); };
        if (!shard.fsdp || shard.fsdp->instances.size() != metadata.instances.size() ||
            shard.fsdp->instances[i].flat_params.size() != instance.flat_params.size() ||
            shard.fsdp->instances[i].flat_params[j].names != flat.names) {
          throw fail(fmt::format("shard_metadata differs from {} (shards of different checkpoints?)", first.path));
        }
        const ManifestTensor* tensor = find_tensor(shard, path);
        if (tensor == nullptr) throw fail("flat parameter missing from this shard");
        if (flat_dtype && tensor->dtype != *flat_dtype) throw fail("dtype differs between shards");
        flat_dtype = tensor->dtype;
        if (tensor->shape.size() != 1) throw fail("flat parameter is not one-dimensional");
        std::int64_t padding = shard.fsdp->instances[i].flat_params[j].padding;
        auto held = static_cast<std::int64_t>(tensor->numel());
        if (padding > held) {
          throw Error(Location{shard.path, path, tensor->file_byte_offset},
                      fmt::format("padding {} exceeds the {} elements held", padding, held));
        }
        TensorSource whole = source_of(*tensor, static_cast<std::uint32_t>(shard_files[d]));
        std::uint64_t real_bytes = static_cast<std::uint64_t>(held - padding) * dtype_info(tensor->dtype).itemsize;
        real_parts.push_back(whole.slice(0, real_bytes, {held - padding}));
        if (instance.no_broadcast_optim_state) break;  // kept whole on every rank
      }
      std::int64_t real_numel = 0;
      for (const TensorSource& part : real_parts) real_numel += part.shape[0];
      if (real_numel != flat.total_numel()) {
        throw Error(Location{first.path, path, std::nullopt},
                    fmt::format("the shards hold {} unpadded elements, shard_metadata names {}", real_numel,
                                flat.total_numel()));
      }
      TensorSource full = concat(real_parts, {real_numel});
      std::uint64_t itemsize = dtype_info(full.dtype).itemsize;
      std::uint64_t offset = 0;
      for (std::size_t k = 0; k < flat.names.size(); ++k) {
        std::string key = join_path(instance.fsdp_path, flat.names[k]);
        std::uint64_t nbytes = static_cast<std::uint64_t>(flat.numels[k]) * itemsize;
        if (!taken.insert(key).second) {
          throw Error(Location{first.path, "shard_metadata", std::nullopt}, "parameter named twice: " + key);
        }
        out.push_back({key, full.slice(offset, nbytes, flat.shapes[k]), std::nullopt});
        offset += nbytes;
      }
    }
  }
  return out;
}

}  // namespace

bool is_training_checkpoint(const ManifestFile& file, const std::string& state_dict) {
  const std::string prefix = state_dict + "/";
  return is_flattened(file, prefix) || !state_dict_tensors(file, prefix).empty();
}

void check_training_checkpoint(const ManifestFile& file, const std::string& state_dict) {
  if (is_training_checkpoint(file, state_dict)) return;
  throw Error(Location{file.path, "", std::nullopt},
              fmt::format("{}: stitch, reshard and diff of shard sets need a training checkpoint whose weights are a "
                          "'{}' state dict (metaseq/fairscale files)",
                          describe_contents(file), state_dict));
}

std::vector<NamedTensor> consolidate_part(const Manifest& manifest, const std::vector<int>& shard_files,
                                          const std::string& state_dict) {
  if (shard_files.empty()) throw Error("no shard files for a model part (a bug)");
  const ManifestFile& first = manifest.files.at(shard_files[0]);
  const std::string prefix = state_dict + "/";
  std::vector<NamedTensor> out;
  std::set<std::string> taken;
  auto add_buffers = [&](const std::vector<std::string>& names) {
    for (const std::string& buffer : names) {
      const ManifestTensor* tensor = find_tensor(first, prefix + buffer);
      if (tensor == nullptr) tensor = find_tensor(first, "model/" + buffer);  // an EMA copy may hold parameters only
      if (tensor == nullptr || !taken.insert(buffer).second) continue;
      out.push_back({buffer, source_of(*tensor, static_cast<std::uint32_t>(shard_files[0])), std::nullopt});
    }
  };

  check_training_checkpoint(first, state_dict);
  if (!is_flattened(first, prefix)) {
    // Already consolidated (or never sharded): the tensors as they are; ties
    // (one tensor under two keys) stay ties.
    for (const auto& [key, tensor] : state_dict_tensors(first, prefix)) {
      taken.insert(key);
      if (!tensor->alias_of.empty() && tensor->alias_of.rfind(prefix, 0) == 0) {
        out.push_back({key, {}, tensor->alias_of.substr(prefix.size())});
      } else {
        out.push_back({key, source_of(*tensor, static_cast<std::uint32_t>(shard_files[0])), std::nullopt});
      }
    }
    if (prefix != "model/") {
      // Buffers an EMA copy lacks: those shard_metadata names, else whatever the
      // model has that the copy does not.
      std::vector<std::string> buffers;
      if (first.fsdp) {
        buffers = first.fsdp->buffer_names;
      } else {
        for (const auto& [key, tensor] : state_dict_tensors(first, "model/")) buffers.push_back(key);
      }
      add_buffers(buffers);
    }
    return out;
  }

  out = unflatten(manifest, shard_files,
                  [&](const FlatParamMeta& flat, std::size_t) { return prefix + flat.state_key; });
  for (const NamedTensor& tensor : out) taken.insert(tensor.name);
  // Tied parameters: every instance's pairs (fairscale itself reads only the last
  // instance's, and so loses the tie when the root comes first).
  const FsdpMetadata& metadata = *first.fsdp;
  for (const FsdpInstanceMeta& instance : metadata.instances) {
    for (const auto& [src, dst] : instance.shared_param_info) {
      std::string from = join_path(instance.fsdp_path, src);
      std::string to = join_path(instance.fsdp_path, dst);
      if (taken.count(from) == 0 || !taken.insert(to).second) continue;
      out.push_back({to, {}, from});
    }
  }
  add_buffers(metadata.buffer_names);
  return out;
}

std::vector<NamedTensor> consolidate_optimizer_state(const Manifest& manifest, const std::vector<int>& shard_files,
                                                     const std::string& state_name) {
  const ManifestFile& first = manifest.files.at(shard_files.at(0));
  if (!is_flattened(first, "model/")) {
    throw Error(Location{first.path, "last_optimizer_state", std::nullopt},
                "optimizer state of unflattened (consolidated) weights cannot be resharded; use --drop-optimizer-state");
  }
  return unflatten(manifest, shard_files, [&](const FlatParamMeta&, std::size_t index) {
    return fmt::format("last_optimizer_state/state/{}/{}", index, state_name);
  });
}

std::vector<FlatShard> flatten_fsdp(const FsdpMetadata& layout, const std::vector<NamedTensor>& params,
                                    int world_size, int rank) {
  std::map<std::string, const NamedTensor*> by_name;
  for (const NamedTensor& param : params) by_name[param.name] = &param;
  std::vector<FlatShard> out;
  for (std::size_t i = 0; i < layout.instances.size(); ++i) {
    const FsdpInstanceMeta& instance = layout.instances[i];
    for (std::size_t j = 0; j < instance.flat_params.size(); ++j) {
      const FlatParamMeta& flat = instance.flat_params[j];
      FlatShard shard;
      shard.instance = i;
      shard.flat_param = j;
      shard.state_key = flat.state_key;
      std::vector<TensorSource> flattened;
      std::int64_t total = 0;
      for (const std::string& name : flat.names) {
        std::string key = join_path(instance.fsdp_path, name);
        auto it = by_name.find(key);
        if (it == by_name.end() || it->second->alias_of) {
          throw Error(fmt::format("{}: parameter of FSDP flat parameter {} is missing", key, flat.state_key));
        }
        const TensorSource& source = it->second->source;
        if (!flattened.empty() && source.dtype != flattened.front().dtype) {
          throw Error(fmt::format("{}: dtype differs from the other parameters of {}", key, flat.state_key));
        }
        auto numel = static_cast<std::int64_t>(source.numel());
        flattened.push_back(source.slice(0, source.nbytes(), {numel}));
        shard.shapes.push_back(source.shape);
        shard.numels.push_back(numel);
        total += numel;
      }
      if (flattened.empty()) throw Error(fmt::format("{}: an FSDP flat parameter without parameters", flat.state_key));
      TensorSource full = concat(flattened, {total});
      if (instance.no_broadcast_optim_state) {  // kept whole on every rank, unpadded
        shard.source = full;
        out.push_back(std::move(shard));
        continue;
      }
      FsdpChunk chunk = fsdp_chunk(total, world_size, rank);
      std::uint64_t itemsize = dtype_info(full.dtype).itemsize;
      TensorSource held = full.slice(static_cast<std::uint64_t>(chunk.begin) * itemsize,
                                     static_cast<std::uint64_t>(chunk.numel) * itemsize, {chunk.numel});
      shard.source = concat({held, zeros_source(full.dtype, {chunk.padding})}, {chunk.numel + chunk.padding});
      shard.padding = chunk.padding;
      out.push_back(std::move(shard));
    }
  }
  return out;
}

}  // namespace ckpt
