// The layout rules, as pure functions of shapes, metadata and byte ranges:
// fairscale's FSDP unflattening and Megatron's model-parallel gluing
// (../shared/FORMATS.md sections 3 and 4). No file is read here.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "ckpt/manifest.hpp"
#include "ckpt/tensor_source.hpp"

namespace ckpt {

// The consolidated state dict ("model") of one model part from its DP shards
// (`shard_files[d]` indexes manifest.files): every flat parameter unpadded,
// concatenated over the shards and split into its named parameters; tied
// parameters (shared_param_info) as aliases; buffers from shard 0. Files
// without flat parameters (already consolidated) give their model tensors as
// they are. `state_dict` is the object path of the state dict in each file:
// "model", or an EMA copy such as "extra_state/ema" (buffers it lacks are taken
// from "model"). Throws Error naming the file and tensor when shards disagree.
std::vector<NamedTensor> consolidate_part(const Manifest& manifest, const std::vector<int>& shard_files,
                                          const std::string& state_dict = "model");

// How one key of a Megatron part is glued; the whole rule table lives in
// megatron_rule().
enum class MpRule {
  FusedQkv,      // [k_m; v_m; q_m] per part
  ConcatDim0,    // column-parallel: rows of part 0, then part 1, ...
  ConcatDim1,    // row-parallel: each row is part 0's row, part 1's row, ...
  Replicated,    // identical in every part: take part 0 (compare the others)
  Copied,        // identical by construction (version): take part 0, no comparison
  Placeholder,   // sinusoidal positions' _float_tensor: becomes zeros([1])
};
MpRule megatron_rule(std::string_view key);

struct GlueOptions {
  bool fused_qkv = false;  // keep one qkv_proj as [k_all; v_all; q_all]
};

// Glues the consolidated parts into one state dict, in part 0's key order.
// `replicated` receives the keys whose parts should be compared. Throws Error
// naming the key when parts are missing keys or have mismatched shapes.
std::vector<OutputTensor> glue_megatron(const std::vector<std::vector<NamedTensor>>& parts, const GlueOptions& options,
                                        std::vector<std::string>* replicated);

}  // namespace ckpt
