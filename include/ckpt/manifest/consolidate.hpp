// A model part's state dicts from its indexed FSDP shards: fairscale's
// consolidate_shard_weights as byte ranges: each FSDP instance's flat parameter
// glued from the DP shards' slices (padding dropped), cut into its named
// parameters by the `shard_metadata` shapes (layout/fsdp.hpp, layout/metaseq.hpp).
// Reads the manifest only; no tensor byte is read here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/manifest.hpp"

namespace ckpt {

// The bytes of a manifest tensor in row-major order: one piece when it is
// contiguous, otherwise one strided piece (a row per index of the innermost
// dimension that is not contiguous) per index of the dimensions before it;
// `in` is the file holding it (where it is, and its path for messages), `file`
// the pieces' source index.
TensorSource source_of(const StoredTensor& tensor, const ManifestFile& in, std::uint32_t file);
// The same at `file_byte_offset` of the file at `path`.
TensorSource source_of(const StoredTensor& tensor, std::uint64_t file_byte_offset, std::uint32_t file,
                       const std::string& path = {});

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

// The state-dict helpers consolidation and the optimizer state (optimizer_state.hpp) share.
// Tensors of a state dict in order, by key: "model/x" -> "x", "model/a~1b" -> "a/b".
std::vector<std::pair<std::string, const StoredTensor*>> state_dict_tensors(const ManifestFile& file,
                                                                            const std::string& prefix);
// Whether a state dict's tensor is a buffer, not a parameter: not floating,
// metaseq's `version` and sinusoidal positions' `_float_tensor`, or one of the
// FSDP layout's buffer names.
bool is_buffer(const std::string& key, const StoredTensor& tensor, const FsdpMetadata* fsdp);
// Whether the state dict at `prefix` holds FSDP flat parameters.
bool is_flattened(const ManifestFile& file, const std::string& prefix);
// Every flat parameter of the part, unpadded, concatenated over the shards and
// split into its named parameters. `path_of(flat, index)` is the object path of
// a flat parameter's tensor in each shard (index counts flat parameters in
// metadata order).
using FlatPath = std::function<std::string(const FlatParamMeta&, std::size_t)>;
std::vector<NamedTensor> unflatten(const Manifest& manifest, const std::vector<int>& shard_files,
                                   const FlatPath& path_of);

// The model's size as torch sees it after stitching: elements of its
// parameters (sum(p.numel() for p in model.parameters())) and of its buffers.
// - FSDP shards: each parameter from shard_metadata (unpadded), buffers from
//   its buffer_names.
// - A model state dict (consolidated parts): its tensors; buffers are the
//   shard_metadata buffer names when known, `*.version` and sinusoidal
//   positions' `_float_tensor` (metaseq's), and every non-floating tensor.
// - No `model` (a plain state dict, or another layout): every tensor outside
//   the optimizer state, by the same rule.
// With several model parts, a tensor the Megatron rules replicate (layer norms,
// row-parallel biases, positions) counts once, a split one in every part; a tie
// counts once. Optimizer state is counted apart: its elements as stored.
struct ModelCounts {
  std::uint64_t parameters = 0;
  std::uint64_t buffers = 0;
  std::uint64_t optimizer_state = 0;
  std::string counted_from;  // "FSDP shard_metadata", "the model state dict", "every tensor"
};
ModelCounts count_model(const Manifest& manifest);

}  // namespace ckpt
