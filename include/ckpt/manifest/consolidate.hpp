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
// contiguous, otherwise one per innermost contiguous run; `file` is the
// pieces' source index.
TensorSource source_of(const ManifestTensor& tensor, std::uint64_t file_byte_offset, std::uint32_t file);

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

// The same for per-parameter optimizer state (`state_name` is exp_avg, ...):
// - FSDP shards: the flat tensors at `last_optimizer_state/state/<k>/<state_name>`
//   (k counting flat parameters in metadata order) unpadded like their weights
//   and split into the parameters' names and shapes;
// - a consolidated file: torch's own per-parameter state, as `stitch
//   --optimizer-state` writes it: state <i> belongs to the i-th parameter (the
//   state dict's tensors in order, ties and `buffers` left out) and has its shape.
// Throws Error naming the file and tensor when a state is missing, is shaped
// unlike its parameter, or there are more states than parameters.
std::vector<NamedTensor> consolidate_optimizer_state(const Manifest& manifest, const std::vector<int>& shard_files,
                                                     const std::string& state_name,
                                                     const std::vector<std::string>& buffers = {});

// The per-parameter optimizer states (exp_avg, exp_avg_sq, ...) a checkpoint
// holds, checked: `last_optimizer_state.state` maps 0..K-1, one per flat
// parameter in metadata order (FSDP) or per parameter (as above), to dicts
// holding the same tensors, each shaped like what it belongs to, beside other
// entries (`step`, a tensor or not); param_groups list 0..K-1 in order. The
// names of those tensors (path labels, state 0's order); empty when the file
// holds no optimizer state tensor. Throws Error naming the file and the entry
// otherwise: such state cannot be cut with its weights.
std::vector<std::string> optimizer_state_names(const ManifestFile& file, const std::vector<std::string>& buffers = {});

// Every file of `grid` (indices in manifest.files) holds the optimizer states
// `names`, checked as above (an extra state in one shard would be carried, a
// missing one lost), and the states of every file agree on their other
// entries (step, ...) and param_groups but params: shards of one save. Throws
// Error naming the first file or state that does not.
void check_optimizer_states(const Manifest& manifest, const std::vector<std::vector<int>>& grid,
                            const std::vector<std::string>& names, const std::vector<std::string>& buffers);

// A file's optimizer hyperparameters: last_optimizer_state's param_groups
// without their params (null when there are none).
nlohmann::ordered_json optimizer_hyperparameters(const ManifestFile& file);

// How a parameter's optimizer state `name` is told apart from the parameter in
// messages: "last_optimizer_state exp_avg of " + key.
inline std::string optimizer_state_label(const std::string& name) {
  return "last_optimizer_state " + name + " of ";
}

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
