// A tensor saved as n-dimensional boxes of its shape (DCP chunks: Shard(0),
// Shard(1), 2-D meshes, uneven and empty boxes): whether the boxes tile the
// tensor, and the tensor's bytes assembled from the boxes' bytes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/layout/tensor_source.hpp"

namespace ckpt {

struct Box {
  std::vector<std::int64_t> offsets;
  std::vector<std::int64_t> sizes;
  bool operator==(const Box&) const = default;
};

// What keeps `boxes` from tiling a tensor of `shape` exactly, as a phrase
// naming the boxes by index ("box 2 [3:6, 0:4] overlaps box 0 [0:4, 0:4]"), or
// nullopt when they tile it: every box of the tensor's rank, inside it, no two
// overlapping, every element in one (empty boxes are allowed anywhere).
std::optional<std::string> tiling_problem(const std::vector<std::int64_t>& shape, const std::vector<Box>& boxes);

// "[3:6, 0:4]"
std::string box_text(const Box& box);

// The tensor of `shape` whose box i holds `parts[i]` (a tensor of the box's
// sizes: its row-major bytes): each part's bytes placed where its elements
// sit, as few pieces as the layout allows (one strided piece per box of a
// contiguous part and a dim-1 cut). The boxes must tile the tensor
// (tiling_problem); an InternalError otherwise.
TensorSource assemble_boxes(DType dtype, const std::vector<std::int64_t>& shape, const std::vector<Box>& boxes,
                            const std::vector<TensorSource>& parts);

}  // namespace ckpt
