// Optimizer state: where a metaseq checkpoint keeps it and how it is read.
//
// torch's optimizer saves `{"state": {0: {"step", "exp_avg", ...}, 1: ...},
// "param_groups": [{"params": [0, 1, ...], "lr", ...}]}`; metaseq stores that
// dict under the top-level key `last_optimizer_state`. In FSDP shards state k
// belongs to the k-th flat parameter (metadata order) and is flat and padded
// like it; in a consolidated file state i belongs to the i-th parameter. This
// module names those paths and reads the states as byte ranges, like the
// weights (consolidate.hpp); writing them is the planners' (stitch, reshard).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/manifest.hpp"

namespace ckpt {

// The top-level key of the optimizer state, and its entries.
inline constexpr std::string_view kOptimizerStateKey = "last_optimizer_state";
inline constexpr std::string_view kOptimizerStates = "state";
inline constexpr std::string_view kParamGroups = "param_groups";

// The object path of state `index`'s tensor `state_name`:
// "last_optimizer_state/state/<index>/<state_name>" (`index` a label: "3").
std::string optimizer_state_path(std::string_view index, std::string_view state_name);
std::string optimizer_state_path(std::size_t index, std::string_view state_name);

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

// Per-parameter optimizer state that a layout reads out of its own form
// (DeepSpeed's flat partitions), for an output in torch's optimizer form:
// state i belongs to params[i] and is laid out as the dict at
// state_paths[state_of[i]] (its group's state, in manifest file `file`): its
// entries in order, each name of `tensors` taking the parameter's own tensor,
// each scalar tensor of shared[state_of[i]] (step) a copy of it, the other
// values as they are. Param group g holds group_params[g] and the other
// entries of the dict at group_paths[g].
struct ParameterStates {
  std::vector<std::string> params;  // the parameters' state-dict names ("model/<escaped key>")
  std::vector<std::pair<std::string, std::vector<TensorSource>>> tensors;  // "exp_avg" -> one per parameter
  std::uint32_t file = 0;
  std::vector<std::string> state_paths;
  std::vector<std::vector<std::pair<std::string, TensorSource>>> shared;  // per state
  std::vector<std::size_t> state_of;                                      // per parameter
  std::vector<std::string> group_paths;
  std::vector<std::vector<std::size_t>> group_params;
};

// How a parameter's optimizer state `name` is told apart from the parameter in
// messages: "last_optimizer_state exp_avg of " + key.
inline std::string optimizer_state_label(const std::string& name) {
  return std::string(kOptimizerStateKey) + " " + name + " of ";
}

}  // namespace ckpt
