// fairscale's FSDP flattening (flatten_params with its chunk-and-pad rule) as
// byte ranges.
#include "ckpt/layout/fsdp.hpp"

#include <fmt/format.h>

#include <string_view>
#include <unordered_map>

namespace ckpt {

std::vector<FlatShard> flatten_whole(const FsdpMetadata& layout, const std::vector<NamedTensor>& params) {
  std::unordered_map<std::string_view, const NamedTensor*> by_name;
  for (const NamedTensor& param : params) by_name.emplace(param.name, &param);
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
        std::string key = fsdp_key(instance.fsdp_path, name);
        auto it = by_name.find(key);
        if (it == by_name.end() || it->second->alias_of) {
          throw Error(Location{"", key, std::nullopt},
                      fmt::format("parameter of FSDP flat parameter {} is missing", flat.state_key));
        }
        const TensorSource& source = it->second->source;
        if (!flattened.empty() && source.dtype != flattened.front().dtype) {
          throw Error(Location{"", key, std::nullopt},
                      fmt::format("dtype differs from the other parameters of {}", flat.state_key));
        }
        auto numel = static_cast<std::int64_t>(source.numel());
        flattened.push_back(source.slice(0, source.nbytes(), {numel}));
        shard.shapes.push_back(source.shape);
        shard.numels.push_back(numel);
        total += numel;
      }
      if (flattened.empty())
        throw Error(Location{"", flat.state_key, std::nullopt}, "an FSDP flat parameter without parameters");
      shard.source = concat(flattened, {total});
      out.push_back(std::move(shard));
    }
  }
  return out;
}

std::vector<FlatShard> chunk_flat(const FsdpMetadata& layout, const std::vector<FlatShard>& whole, int world_size,
                                  int rank) {
  std::vector<FlatShard> out;
  out.reserve(whole.size());
  for (const FlatShard& flat : whole) {
    FlatShard shard = flat;
    if (layout.instances.at(flat.instance).no_broadcast_optim_state) {  // kept whole on every rank, unpadded
      out.push_back(std::move(shard));
      continue;
    }
    const TensorSource& full = flat.source;
    const std::int64_t total = full.shape.at(0);
    FsdpChunk chunk = fsdp_chunk(total, world_size, rank);
    std::uint64_t itemsize = dtype_info(full.dtype).itemsize;
    TensorSource held = full.slice(static_cast<std::uint64_t>(chunk.begin) * itemsize,
                                   static_cast<std::uint64_t>(chunk.numel) * itemsize, {chunk.numel});
    shard.source = concat({held, zeros_source(full.dtype, {chunk.padding})}, {chunk.numel + chunk.padding});
    shard.padding = chunk.padding;
    out.push_back(std::move(shard));
  }
  return out;
}

std::vector<FlatShard> flatten_fsdp(const FsdpMetadata& layout, const std::vector<NamedTensor>& params, int world_size,
                                    int rank) {
  return chunk_flat(layout, flatten_whole(layout, params), world_size, rank);
}

}  // namespace ckpt
