// fairscale's consolidate_shard_weights as byte ranges: no tensor is loaded.
#include <fmt/format.h>

#include <map>
#include <set>

#include "ckpt/layout.hpp"

namespace ckpt {

namespace {

const ManifestTensor* find_tensor(const ManifestFile& file, const std::string& path) {
  for (const ManifestTensor& tensor : file.tensors) {
    if (tensor.path == path) return &tensor;
  }
  return nullptr;
}


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

std::vector<NamedTensor> consolidate_part(const Manifest& manifest, const std::vector<int>& shard_files,
                                          const std::string& state_dict) {
  if (shard_files.empty()) throw Error("no shard files for a model part (a bug)");
  const ManifestFile& first = manifest.files.at(shard_files[0]);
  const std::string prefix = state_dict + "/";
  auto model_path = [&](const std::string& key) { return prefix + key; };
  std::vector<NamedTensor> out;
  std::set<std::string> taken;

  if (!is_flattened(first, prefix)) {
    // Already consolidated (or never sharded): the model's tensors as they are;
    // ties (one tensor under two keys) stay ties.
    for (const auto& [key, tensor] : state_dict_tensors(first, prefix)) {
      if (!tensor->alias_of.empty() && tensor->alias_of.rfind(prefix, 0) == 0) {
        out.push_back({key, {}, tensor->alias_of.substr(prefix.size())});
      } else {
        out.push_back({key, source_of(*tensor, static_cast<std::uint32_t>(shard_files[0])), std::nullopt});
      }
    }
    return out;
  }

  const FsdpMetadata& metadata = *first.fsdp;
  for (std::size_t i = 0; i < metadata.instances.size(); ++i) {
    const FsdpInstanceMeta& instance = metadata.instances[i];
    for (std::size_t j = 0; j < instance.flat_params.size(); ++j) {
      const FlatParamMeta& flat = instance.flat_params[j];
      std::vector<TensorSource> real_parts;
      std::optional<DType> flat_dtype;
      for (std::size_t d = 0; d < shard_files.size(); ++d) {
        const ManifestFile& shard = manifest.files.at(shard_files[d]);
        auto fail = [&](const std::string& message) {
          return Error(Location{shard.path, model_path(flat.state_key), std::nullopt}, message);
        };
        if (!shard.fsdp || shard.fsdp->instances.size() != metadata.instances.size() ||
            shard.fsdp->instances[i].flat_params.size() != instance.flat_params.size() ||
            shard.fsdp->instances[i].flat_params[j].names != flat.names) {
          throw fail(fmt::format("shard_metadata differs from {} (shards of different checkpoints?)", first.path));
        }
        const ManifestTensor* tensor = find_tensor(shard, model_path(flat.state_key));
        if (tensor == nullptr) throw fail("flat parameter missing from this shard");
        if (flat_dtype && tensor->dtype != *flat_dtype) throw fail("dtype differs between shards");
        flat_dtype = tensor->dtype;
        if (tensor->shape.size() != 1) throw fail("flat parameter is not one-dimensional");
        std::int64_t padding = shard.fsdp->instances[i].flat_params[j].padding;
        auto held = static_cast<std::int64_t>(tensor->numel());
        if (padding > held) {
          throw Error(Location{shard.path, model_path(flat.state_key), tensor->file_byte_offset},
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
        throw Error(Location{first.path, model_path(flat.state_key), std::nullopt},
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
  // Tied parameters: every instance's pairs (fairscale itself reads only the last
  // instance's, and so loses the tie when the root comes first).
  for (const FsdpInstanceMeta& instance : metadata.instances) {
    for (const auto& [src, dst] : instance.shared_param_info) {
      std::string from = join_path(instance.fsdp_path, src);
      std::string to = join_path(instance.fsdp_path, dst);
      if (taken.count(from) == 0 || !taken.insert(to).second) continue;
      out.push_back({to, {}, from});
    }
  }
  for (const std::string& buffer : metadata.buffer_names) {
    const ManifestTensor* tensor = find_tensor(first, model_path(buffer));
    if (tensor == nullptr) tensor = find_tensor(first, "model/" + buffer);  // an EMA copy may hold parameters only
    if (tensor == nullptr || !taken.insert(buffer).second) continue;
    out.push_back({buffer, source_of(*tensor, static_cast<std::uint32_t>(shard_files[0])), std::nullopt});
  }
  return out;
}

}  // namespace ckpt
