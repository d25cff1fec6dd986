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

// Throws Error naming the file and what it holds (describe_contents) when it
// has no state dict of tensors at object path `state_dict`, flattened or not:
// a plain state dict, a pickled module, a TorchScript archive are not training
// checkpoints, and stitching one would give an empty model.
bool is_training_checkpoint(const ManifestFile& file, const std::string& state_dict = "model");
void check_training_checkpoint(const ManifestFile& file, const std::string& state_dict = "model");

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

// The same for per-parameter optimizer state: the flat tensors at
// `last_optimizer_state/state/<k>/<state_name>` (k counting flat parameters in
// metadata order) unpadded like their weights and split into the parameters'
// names and shapes. Only flattened (FSDP) inputs carry such state.
std::vector<NamedTensor> consolidate_optimizer_state(const Manifest& manifest, const std::vector<int>& shard_files,
                                                     const std::string& state_name);

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

// Re-cuts the consolidated parts into `new_parts` parts, in part 0's key order:
// sharded tensors are glued and split evenly on their dimension (qkv per part
// as [k_i; v_i; q_i]), replicated ones copied to every part. `replicated`
// receives the keys whose parts should be compared. Throws Error naming the key
// when parts miss keys, shapes do not glue, or `new_parts` does not divide a
// sharded dimension.
std::vector<std::vector<NamedTensor>> reshard_megatron(const std::vector<std::vector<NamedTensor>>& parts,
                                                       int new_parts, std::vector<std::string>* replicated);

// Glues the consolidated parts into one state dict (reshard_megatron to one
// part), splitting each fused qkv_proj into k_proj, v_proj and q_proj unless
// `options.fused_qkv`.
std::vector<NamedTensor> glue_megatron(const std::vector<std::vector<NamedTensor>>& parts, const GlueOptions& options,
                                       std::vector<std::string>* replicated);

// FSDP flattening: the flat parameters rank `rank` of `world_size` holds for one
// model part. `layout` gives the instances, their flat parameters and the names
// in each (relative to fsdp_path); `params` the full-named tensors. Each flat
// tensor is the concatenation of its parameters, chunked by fairscale's rule and
// zero-padded to the chunk length.
struct FlatShard {
  std::size_t instance = 0;     // index in layout.instances
  std::size_t flat_param = 0;   // index in that instance's flat_params
  std::string state_key;
  TensorSource source;
  std::int64_t padding = 0;
  std::vector<std::vector<std::int64_t>> shapes;  // of the named parameters, in order
  std::vector<std::int64_t> numels;
};
std::vector<FlatShard> flatten_fsdp(const FsdpMetadata& layout, const std::vector<NamedTensor>& params,
                                    int world_size, int rank);

}  // namespace ckpt
