// What metaseq and fairscale store about sharding: the MP part and DP shard in a
// file's name (`checkpoint_last-model_part-{m}-shard{d}.pt` and its variants), and
// FSDP's `shard_metadata` (per FSDP instance: its path and its flat parameters'
// names, shapes, numels and padding; the buffer names; tied parameters).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckpt/format/checkpoint.hpp"

namespace ckpt {

// `checkpoint_last-model_part-3-shard7.pt` -> part 3, shard 7; `...-shard2.pt`
// -> shard 2 only; `reshard-model_part-1.pt` -> part 1 only.
struct FileRole {
  std::optional<int> mp_part;
  std::optional<int> dp_shard;
};
FileRole parse_file_role(std::string_view path);

struct FlatParamMeta {
  std::string state_key;           // key in the model state dict: "decoder.layers.0.flat_param_0"
  std::string name;                // "flat_param_0"
  std::vector<std::string> names;  // relative to fsdp_path
  std::vector<std::vector<std::int64_t>> shapes;
  std::vector<std::int64_t> numels;
  std::int64_t padding = 0;  // pad elements on this rank

  std::int64_t total_numel() const;
  bool operator==(const FlatParamMeta&) const = default;
};

// The first inconsistency in a flat parameter's metadata, checked by both of its
// readers (the pickle's shard_metadata, a manifest's "fsdp"): names, shapes and
// numels of different lengths, a negative numel, an invalid shape, a shape whose
// elements differ from its numel, numels summing past 64 bits, negative padding.
// `field` is relative to the flat parameter ("numels"), `index` the element.
struct FlatParamProblem {
  std::string field;
  std::optional<std::size_t> index;
  std::string message;
};
std::optional<FlatParamProblem> flat_param_problem(const FlatParamMeta& flat);

// A name inside FSDP instance `fsdp_path` as a key of the model state dict:
// "decoder.layers.0" + "flat_param_0"; the root instance ("") adds nothing.
std::string fsdp_key(const std::string& fsdp_path, const std::string& name);

struct FsdpInstanceMeta {
  std::string fsdp_path;  // "" for the root instance
  std::vector<FlatParamMeta> flat_params;
  bool no_broadcast_optim_state = false;
  std::vector<std::pair<std::string, std::string>> shared_param_info;  // (src, dst)
  bool operator==(const FsdpInstanceMeta&) const = default;
};

struct FsdpMetadata {
  std::vector<FsdpInstanceMeta> instances;
  std::vector<std::string> buffer_names;
  bool operator==(const FsdpMetadata&) const = default;
};

// Decodes `shard_metadata` of a checkpoint; nullopt when it has none. Throws an
// Error naming the file and the field when it is malformed.
std::optional<FsdpMetadata> read_fsdp_metadata(const Checkpoint& checkpoint);

// Where a training checkpoint says how many model-parallel parts it was saved
// with: metaseq's `cfg.model.model_parallel_size` (a dict, Namespace or
// OmegaConf config; fairseq-style configs also in `cfg.common`) and the legacy
// top-level `args` Namespace. The one table, read here and rewritten by
// CheckpointBuilder::set_model_parallel_size.
inline const std::vector<std::vector<std::string_view>> kModelParallelSizeKeys = {
    {"cfg", "model", "model_parallel_size"},
    {"cfg", "common", "model_parallel_size"},
    {"args", "model_parallel_size"},
};
struct DeclaredParts {
  std::int64_t parts = 1;
  std::string from;  // "cfg.model.model_parallel_size"
};
// The first of kModelParallelSizeKeys the checkpoint holds as an int; nullopt
// when it holds none.
std::optional<DeclaredParts> declared_model_parallel_size(const Checkpoint& checkpoint);

// fairscale's chunk-and-pad rule: a flat parameter of `numel` elements on
// `world_size` ranks. Chunk length ceil(numel / world_size); rank d holds
// [d*chunk, min((d+1)*chunk, numel)) followed by padding up to the chunk length.
struct FsdpChunk {
  std::int64_t begin = 0;    // first element held
  std::int64_t numel = 0;    // real elements held
  std::int64_t padding = 0;  // zeros after them
};
FsdpChunk fsdp_chunk(std::int64_t numel, int world_size, int rank);

}  // namespace ckpt
