// The input layouts ckpt-tool reads: one row each, chosen in one place.
//
// A layout is a kind of input set: how its files are recognized and described,
// what the set check asks of them, how the set reads as one state dict, and how
// its model is counted. Commands ask the row (input_layout) instead of testing
// which kind of file they hold.
//
// Rows:
// - torch: torch.save files. metaseq's raw FSDP x Megatron shards, consolidated
//   model-parallel parts and one plain or consolidated file are one row: a
//   consolidated part is an FSDP world of one and a plain file a grid of one,
//   and the one set check (grid.cpp) and consolidation (consolidate.cpp) cover
//   the three.
// - safetensors: a file, a sharded set with its index, or a folder of them: one
//   state dict spread over files, no training layout, no checksums.
// - dcp: a PyTorch Distributed Checkpoint directory (`.metadata` and the data
//   files it names): each tensor a set of boxes, each box a torch.save item in
//   a data file (src/manifest/dcp_layout.cpp).
// - deepspeed: a DeepSpeed ZeRO checkpoint's step folder (the folder holding
//   `latest`, or the tag folder it names): the fp32 masters in every rank's
//   optimizer file, read as zero_to_fp32 reads them
//   (src/manifest/deepspeed_layout.cpp, layout/zero.hpp).
//
// Adding a layout (docs/design.md, "Adding an input layout"): a FileFormat
// value, one source file with the row's functions, and the row in
// input_layouts.cpp.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "ckpt/layout/megatron.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/manifest/optimizer_state.hpp"

namespace ckpt {

// Where a key of a nested state dict goes: dict keys (str) and list indices
// (int), from the top level down.
using KeyPath = std::vector<std::variant<std::string, std::int64_t>>;
// The path as an object path, its elements as labels joined by '/'
// ("model/layers/0/attn": what a torch file nested so names the value).
std::string object_path(const KeyPath& path);
// The path's elements joined by '.' ("model.layers.0.attn": what torch's
// flatten_state_dict names the value).
std::string flat_key(const KeyPath& path);

// An item of a set whose state dict is nested (DCP's planner_data): its key,
// where torch's loader puts it, and what it is: a tensor of the state dict or
// an object item, a torch.save archive at bytes [offset, offset + length) of
// a file of the set.
struct NestedItem {
  std::string key;                    // the flat key
  KeyPath path;                       // {key} when the set records no nesting
  std::optional<std::size_t> tensor;  // its index in StateDict::tensors, or an object item:
  std::uint32_t file = 0;             // the manifest file holding it
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};

// A set read as one state dict: what diff compares, and what verify checks the
// parts' agreement with.
struct StateDict {
  // Names are object paths: "model/<key>" for a training set's model, every
  // tensor's own path for one file read as it is.
  std::vector<NamedTensor> tensors;
  // What part 0's copy stands for: compare them (compare_replicated) before
  // trusting the glued tensors.
  std::vector<ReplicatedCheck> checks;
  bool consolidated = false;  // glued from FSDP shards or model parts
  // A set of object items and nesting (a DCP directory): every item, tensors
  // and objects, in the set's order; a torch output writes them so. Empty for
  // the other layouts.
  std::vector<NestedItem> items;
  std::string items_from;  // the file that orders and nests them (.metadata), for messages
  // The last this many of `tensors` lie inside object items (at "model/<key>/<path
  // in the item>"): compared, but no item of their own.
  std::size_t object_tensors = 0;
};

struct StateDictOptions {
  // One FSDP-flattened file is consolidated like a set of shards, and a tie
  // pickled as two tensor objects over one view is a tie (against a state
  // dict of another layout or naming).
  bool state_dict_only = false;
  // DeepSpeed ZeRO-1/2: the trainable weights from the 16-bit module, not the
  // fp32 masters (--weights-from module).
  bool weights_from_module = false;
};

struct InputLayout {
  FileFormat format = FileFormat::Torch;
  std::string_view name;  // "torch", "safetensors": in messages and inspect --json
  // Whether `path` names a file of this layout. The fallback row (torch)
  // takes every path no other row claims.
  bool (*claims)(std::string_view path) = nullptr;
  bool fallback = false;
  // The files of this layout that `input` names when it is a folder of them or
  // an index file naming them, in reading order; nullopt when it is neither.
  // Rows are asked in table order (a folder of *.pt files is torch's even when
  // it holds safetensors too). Throws Error naming `input` when it is this
  // layout's but cannot be read as a whole set.
  std::optional<std::vector<std::string>> (*files_in)(const std::string& input) = nullptr;
  // What is wrong between `input` (an index: files_in) and the files it named,
  // described: one line each; none when `input` is no index of this layout.
  std::vector<std::string> (*index_problems)(const std::string& input,
                                             const std::vector<ManifestFile>& files) = nullptr;
  // `path` described; the describer shares what files of one pickle share.
  ManifestFile (*describe)(FileDescriber& describer, const std::string& path) = nullptr;
  // The set check of files all of this layout (detect_grid's).
  Grid (*check_set)(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts) = nullptr;
  // The set as one state dict; throws Error naming the file and tensor when it
  // does not read as one (an incomplete set, parts that do not glue).
  StateDict (*state_dict)(const Manifest& manifest, const StateDictOptions& options) = nullptr;
  ModelCounts (*count_model)(const Manifest& manifest) = nullptr;
  bool has_crcs = false;  // every record has a CRC-32: verify reads them all, the executor checks what it copies
  bool training = false;  // a training layout (grid, cfg, optimizer state): stitch, reshard and manifests read it
  // The records of `file` (of this layout) whose CRC-32 verify checks, at
  // absolute offsets; set when has_crcs. The describer is there for a layout
  // that finds them by describing the file.
  std::vector<ZipRecord> (*crc_records)(const MappedFile& file, FileDescriber& describer) = nullptr;
  // What inspect says of a set of this layout beyond its files and tensors
  // (a DCP directory's writer, ranks and chunks), a line each; none if null.
  std::vector<std::string> (*summary)(const Manifest& manifest) = nullptr;
  // The set's non-tensor items (a DCP directory's object items) as one object
  // tree, key -> value, for diff to compare; null when the layout has none.
  nlohmann::ordered_json (*object_items)(const Manifest& manifest) = nullptr;
  // A tie (two keys of one tensor) is held as two items with the same values
  // (DCP saves model.state_dict() so), not as one tensor under one of the keys
  // (safetensors).
  bool ties_as_copies = false;
  // The set holds its weights twice, the second copy in the 16-bit module
  // (DeepSpeed): state_dict takes StateDictOptions::weights_from_module.
  bool module_weights = false;
  // The set's optimizer state per parameter (--optimizer-state of a layout
  // that is no training checkpoint); null when it holds none to give.
  ParameterStates (*parameter_states)(const Manifest& manifest) = nullptr;
};

// What is wrong with files of several layouts given as one set ("safetensors
// files mixed with torch files (PATH): give one kind"), or nullopt.
std::optional<std::string> mixed_layouts(const std::vector<ManifestFile>& files);

// Every row, in table order.
std::span<const InputLayout> input_layouts();
// The row of `format`.
const InputLayout& input_layout(FileFormat format);
// The row whose files `path` names.
const InputLayout& input_layout_of_path(std::string_view path);
// The row of a set's files (its first file's: the set check refuses a mix);
// the torch row for an empty set.
const InputLayout& input_layout(const Manifest& manifest);

// Manifest indices of a training set's files, [part][shard]; throws Error
// naming a file of a layout stitch and reshard do not read, or listing the
// grid's problems when it is incomplete.
std::vector<std::vector<int>> complete_grid(const Manifest& manifest);
// Each model part of `grid` consolidated (consolidate_part), the state dict at
// object path `state_dict`.
std::vector<std::vector<NamedTensor>> consolidate_grid(const Manifest& manifest,
                                                       const std::vector<std::vector<int>>& grid,
                                                       const std::string& state_dict = "model");

// The files the inputs name, each input a file, a glob, a folder or an index
// (files_in of the first row that takes it), sorted by (part, shard, path),
// each once. Throws Error naming an input that names no file.
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs);
// The problems of every index among `inputs` against the files described
// (index_problems of each row).
std::vector<std::string> index_problems(const std::vector<std::string>& inputs, const std::vector<ManifestFile>& files);

// The checks that the data-parallel shards of each model part of `grid` that
// hold whole copies of the state dict at `state_dict` (not FSDP-flattened: the
// planners read shard 0's) hold the same values; none for FSDP shards, whose
// slices are glued.
std::vector<ReplicatedCheck> data_parallel_checks(const Manifest& manifest, const std::vector<std::vector<int>>& grid,
                                                  const std::string& state_dict = "model");

// The rows' functions, for the table (input_layouts.cpp) and their tests.
ManifestFile describe_safetensors_file(FileDescriber& describer, const std::string& path);
Grid check_torch_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts);
Grid check_safetensors_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts);
StateDict torch_state_dict(const Manifest& manifest, const StateDictOptions& options);
StateDict safetensors_state_dict(const Manifest& manifest, const StateDictOptions& options);
ModelCounts count_torch_model(const Manifest& manifest);
ModelCounts count_safetensors_model(const Manifest& manifest);
bool claims_dcp(std::string_view path);
std::optional<std::vector<std::string>> dcp_files_in(const std::string& input);
ManifestFile describe_dcp_file(FileDescriber& describer, const std::string& path);
Grid check_dcp_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts);
StateDict dcp_state_dict(const Manifest& manifest, const StateDictOptions& options);
ModelCounts count_dcp_model(const Manifest& manifest);
std::vector<ZipRecord> dcp_crc_records(const MappedFile& file, FileDescriber& describer);
std::vector<std::string> dcp_summary(const Manifest& manifest);
nlohmann::ordered_json dcp_object_items(const Manifest& manifest);
bool claims_deepspeed(std::string_view path);
std::optional<std::vector<std::string>> deepspeed_files_in(const std::string& input);
ManifestFile describe_deepspeed_file(FileDescriber& describer, const std::string& path);
Grid check_deepspeed_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts);
StateDict deepspeed_state_dict(const Manifest& manifest, const StateDictOptions& options);
ModelCounts count_deepspeed_model(const Manifest& manifest);
std::vector<std::string> deepspeed_summary(const Manifest& manifest);
ParameterStates deepspeed_parameter_states(const Manifest& manifest);

}  // namespace ckpt
