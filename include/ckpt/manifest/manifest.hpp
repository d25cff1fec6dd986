// The manifest: every input file, every tensor as a byte range, and the decoded
// FSDP x MP layout, as versioned JSON (schema in README.md, "Manifest schema").
//
// Building one reads zip directories and pickles only, never tensor data. Every
// command that takes checkpoint files also takes a manifest (`.json` or
// `.json.zst`); `check_fresh` refuses a manifest whose files have changed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/dtype.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/layout/metaseq.hpp"

namespace ckpt {

inline constexpr int kManifestVersion = 2;
inline constexpr const char* kManifestFormat = "ckpt-tool-manifest";

// Limits on what a manifest may claim. A manifest is input like any other
// (edited by hand, truncated, crafted): manifest_from_json checks every field
// against these and against the other fields before anything uses it.
inline constexpr int kMaxGridSide = 1 << 20;                    // part and shard numbers in a grid are below this
inline constexpr std::uint64_t kMaxGridCells = 1 << 20;         // parts x shards that detect_grid allocates
inline constexpr std::uint64_t kMaxManifestBytes = 4ull << 30;  // JSON text, after zstd decompression
// Arrays and objects nested in the JSON: the object tree renders at most two
// levels per pickle level (pickle::kMaxDepth), under a few of the manifest's own.
inline constexpr std::size_t kMaxManifestDepth = 2 * pickle::kMaxDepth + 16;

struct ManifestTensor {
  std::string path;  // object path: "model/decoder.layers.0.flat_param_0"
  DType dtype = DType::Float32;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::string storage_key;
  std::int64_t storage_offset = 0;
  std::string record_name;
  std::uint32_t record_crc32 = 0;
  std::uint64_t file_byte_offset = 0;
  std::uint64_t nbytes = 0;
  bool requires_grad = false;
  std::string alias_of;  // another path holding this very tensor (tied); "" if none

  std::uint64_t numel() const;
  // "model", "optimizer_state" or "other", from the top-level key of `path`.
  std::string section() const;
};

struct ManifestFile {
  std::string path;  // absolute
  std::uint64_t size_bytes = 0;
  std::int64_t mtime_ns = 0;
  std::string archive_name;
  FileRole role;
  int pickle_protocol = 2;
  std::vector<std::string> top_level_keys;
  std::vector<ManifestTensor> tensors;
  std::optional<FsdpMetadata> fsdp;
  std::optional<DeclaredParts> declared_parts;  // model_parallel_size in cfg or args
  nlohmann::json objects;                       // the object tree, tensors as {"$tensor": index}
};

// The MP x DP grid of a set of files, and everything that makes it unfit for
// stitch, reshard or diff. The one set check: inspect and verify report the
// same problems that those commands refuse.
struct Grid {
  int mp = 0;                           // model parts: the highest found + 1, or what cfg declares if more
  int dp = 0;                           // FSDP shards per part: the highest found + 1, or what the flat
                                        // parameters' chunk rule implies if more
  std::vector<std::vector<int>> cells;  // [part][shard] -> file index, -1 when missing
  std::vector<std::string> problems;    // one line each: what is missing, duplicated or inconsistent
};

// The tensor at object path `path` ("model/decoder.layers.0.flat_param_0"), or null.
const ManifestTensor* find_tensor(const ManifestFile& file, std::string_view path);
// What a file holds, for a person, when it is not what a command needs: "a
// TorchScript archive (torch.jit.save)", "a pickled Python object of class
// __main__.Net (torch.save(model))", "a plain state dict of 12 tensors
// (torch.save(model.state_dict()))", "no 'model' state dict (top-level keys:
// ...)".
std::string describe_contents(const ManifestFile& file);
// Where a checkpoint's weights are: object paths under `model`.
inline constexpr std::string_view kModelPrefix = "model/";

struct Manifest {
  std::vector<ManifestFile> files;
  Grid grid;
};

// Indexes `paths` (files, already expanded). Throws Error on unreadable input.
Manifest build_manifest(const std::vector<std::string>& paths);
ManifestFile describe_file(const Checkpoint& checkpoint);
// Complete when every model part that cfg's model_parallel_size names is
// there, every FSDP rank that the flat parameters' chunk rule (numel, chunk
// length) implies is there, and the files agree with each other: the same
// shard_metadata within a part, each rank's padding by the chunk rule, the same
// dtype for a tensor everywhere, the same tensors on every shard of a part,
// optimizer state in all files or none, one declared part count.
// `model_parts` (--model-parts) replaces the part count cfg declares, for files
// whose cfg is stale (metaseq's reshard_model_parallel copies it unchanged).
Grid detect_grid(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts = std::nullopt);

nlohmann::json manifest_to_json(const Manifest& manifest);
// Checks every field (types, ranges, the roles against the file names, each
// tensor's bytes against its dtype, shape and stride and against the file size,
// aliases, object-tree tensor indices, FSDP metadata) and recomputes the grid;
// the stored grid is not read. Throws Error naming `source` and the field as a
// JSON path: `files[3].tensors[12].shape[1]`.
Manifest manifest_from_json(const nlohmann::json& json, const std::string& source);

// A manifest from the bytes of a manifest file (zstd-compressed when
// `compressed`): at most `max_text_bytes` of JSON, nested at most
// kMaxManifestDepth deep, then manifest_from_json. Throws Error naming `source`.
Manifest parse_manifest(Bytes bytes, const std::string& source, bool compressed,
                        std::uint64_t max_text_bytes = kMaxManifestBytes);
// Reads a manifest file (zstd-compressed when it ends in .zst): parse_manifest
// on its mapped bytes.
Manifest read_manifest(const std::string& path);
// Writes it atomically (temp file, fsync, rename); zstd when `path` ends in .zst.
void write_manifest(const Manifest& manifest, const std::string& path, bool overwrite);
bool looks_like_manifest(const std::string& path);

// Throws Error naming the first file whose size or mtime no longer match.
void check_fresh(const Manifest& manifest);

}  // namespace ckpt
