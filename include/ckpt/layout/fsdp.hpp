// fairscale's FSDP flattening, as a pure function of the layout metadata and
// TensorSources: each FSDP instance's parameters, flattened and concatenated,
// are its `flat_param_0`, split over the W ranks as torch.chunk(W) does (chunks of
// ceil(n/W) elements) and zero-padded to the first chunk's length. No file is read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/layout/metaseq.hpp"
#include "ckpt/layout/tensor_source.hpp"

namespace ckpt {

// FSDP flattening: the flat parameters rank `rank` of `world_size` holds for one
// model part. `layout` gives the instances, their flat parameters and the names
// in each (relative to fsdp_path); `params` the full-named tensors. Each flat
// tensor is the concatenation of its parameters, chunked by fairscale's rule and
// zero-padded to the chunk length.
struct FlatShard {
  std::size_t instance = 0;    // index in layout.instances
  std::size_t flat_param = 0;  // index in that instance's flat_params
  std::string state_key;
  TensorSource source;
  std::int64_t padding = 0;
  std::vector<std::vector<std::int64_t>> shapes;  // of the named parameters, in order
  std::vector<std::int64_t> numels;
};
std::vector<FlatShard> flatten_fsdp(const FsdpMetadata& layout, const std::vector<NamedTensor>& params, int world_size,
                                    int rank);

// flatten_fsdp in two steps, for a planner that writes every rank of a part:
// each flat parameter whole (its parameters concatenated, not chunked), then
// rank `rank`'s chunk of each, zero-padded (a no_broadcast_optim_state
// instance's stays whole). flatten_fsdp(l, p, w, r) == chunk_flat(l, flatten_whole(l, p), w, r).
std::vector<FlatShard> flatten_whole(const FsdpMetadata& layout, const std::vector<NamedTensor>& params);
std::vector<FlatShard> chunk_flat(const FsdpMetadata& layout, const std::vector<FlatShard>& whole, int world_size,
                                  int rank);

}  // namespace ckpt
