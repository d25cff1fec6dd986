// DeepSpeed ZeRO's partitioning of fp32 master weights, as pure functions of
// shapes: which bytes of the ranks' flat partitions make each parameter
// (what deepspeed/utils/zero_to_fp32.py computes with torch.cat and narrow).
//
// ZeRO-1/2: each param group is flattened in `param_shapes` order, padded at its
// tail to a multiple of 2 x world and cut into `world` equal partitions; a
// checkpoint stores each rank's partition, usually with that padding cut off
// (single_partition_of_fp32_groups). The group is the partitions one after the
// other; parameter i is the next numel(i) elements.
//
// ZeRO-3: each parameter of n elements is cut into ceil(n / world) elements per
// rank, zero-padded at the last rank's end; rank r's flat groups, one after the
// other, are its slices in `param_shapes` order (groups merged), so parameter i
// is the concatenation over ranks of [offset_i, offset_i + ceil(n_i / world)) of
// each rank's groups, cut to n_i.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/layout/tensor_source.hpp"

namespace ckpt {

struct ZeroParam {
  std::string name;
  std::vector<std::int64_t> shape;
};

// The parameters of one rule, or what keeps the partitions from holding them
// (a phrase naming the numbers: "consumed 1404 of 1400 elements").
struct ZeroUnflattened {
  std::vector<TensorSource> params;  // one per parameter given, of its shape
  std::optional<std::string> problem;
};

// ZeRO-1/2: one group's parameters from its ranks' partitions (1-D, in rank
// order). zero_to_fp32's check: the elements the parameters take and the
// partitions' total, each rounded up to a multiple of 2 x world, are equal.
ZeroUnflattened zero12_group(const std::vector<TensorSource>& partitions, const std::vector<ZeroParam>& params,
                             std::int64_t world);

// ZeRO-3: every parameter (groups merged, in order) from each rank's flat
// groups (ranks[r][g]: rank r's group g, 1-D). Every rank must hold exactly
// sum(ceil(numel / world)) elements.
ZeroUnflattened zero3_params(const std::vector<std::vector<TensorSource>>& ranks, const std::vector<ZeroParam>& params,
                             std::int64_t world);

// ZeRO-3's frozen parameter: the ranks' fragments (each ceil(numel / world)
// elements) concatenated and cut to the shape's numel.
ZeroUnflattened zero3_frozen(const std::vector<TensorSource>& fragments, const ZeroParam& param);

// Elements of a shape (1 for a scalar), nullopt when negative or past 2^56
// (the cap of every sum here too: no byte count made from them wraps).
std::optional<std::uint64_t> shape_numel(const std::vector<std::int64_t>& shape);

}  // namespace ckpt
