// Planning outputs in other formats than torch.save, from the same NamedTensors
// and the same copies: safetensors files (one, or a sharded set with its index)
// and a Hugging Face OPT folder (safetensors under transformers' names plus
// config.json). Plans only; the executor writes them as it writes torch files.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

// Where a safetensors output goes: `path` ("dir/model.safetensors"), or with
// max_shard_bytes, when the tensors do not fit in one file of that size,
// "dir/model-00001-of-0000N.safetensors"... and "dir/model.safetensors.index.json".
struct SafetensorsTarget {
  std::string path;
  std::uint64_t max_shard_bytes = 0;  // 0: one file whatever its size
};

// Files of an earlier safetensors export beside `plan`'s (Plan::stale_files):
// the set's single file, index and shards (`<stem>-NNNNN-of-NNNNN.safetensors`)
// that `plan` does not write, beside each of `outputs` (files, or with
// `folder` folders holding model.safetensors). Left there, a reader would mix
// the two sets (transformers loads model.safetensors before an index).
std::vector<std::string> stale_set_files(const Plan& plan, const std::vector<std::string>& outputs, bool folder);

// Plans the safetensors file(s) of the state dict `tensors` into `plan`
// (`sources[i]` is the plan source of manifest file i). A tie is written once,
// under the name it ties to (the one met first); files are filled in state-dict
// order, a new one begun when the next tensor would take the file past
// max_shard_bytes (a larger tensor has a file of its own); in each file tensors
// are laid out largest element size first. Returns the tensors of each planned
// file in their data order (none for the index). Throws Error naming a tensor
// whose dtype safetensors cannot hold.
std::vector<std::vector<NamedTensor>> plan_safetensors(const std::vector<NamedTensor>& tensors,
                                                       const SafetensorsTarget& target,
                                                       const std::vector<std::uint32_t>& sources, Plan& plan);

// A small file written whole from `text` (config.json, an index).
PlannedFile plan_text_file(std::string path, std::string_view text);

// The index of a sharded set written for `path`: "dir/model.safetensors.index.json".
std::string safetensors_index_path(const std::string& path);

}  // namespace ckpt
