// The manifest as versioned JSON (schema in README.md, "Manifest schema"):
// every command that takes checkpoint files also takes a manifest (`.json` or
// `.json.zst`), read as untrusted input; `check_fresh` refuses a manifest whose
// files have changed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/pickle.hpp"
#include "ckpt/io/byte_reader.hpp"
#include "ckpt/manifest/manifest.hpp"

namespace ckpt {

// Version 3 stores what files share once (tensor lists, shard_metadata, object
// trees) and refers to it by index. Version 4: paths escaped ('/' in a key is
// "~1", checkpoint.hpp), object trees in file order. Older versions are refused
// in one line.
inline constexpr int kManifestVersion = 4;
inline constexpr const char* kManifestFormat = "ckpt-tool-manifest";

// Limits on the JSON text a manifest file may hold.
inline constexpr std::uint64_t kMaxManifestBytes = 256ull << 20;  // JSON text, after zstd: 40x OPT-175B's
// Arrays and objects nested in the JSON: the object tree renders at most two
// levels per pickle level (pickle::kMaxDepth), under a few of the manifest's own.
inline constexpr std::size_t kMaxManifestDepth = 2 * pickle::kMaxDepth + 16;

nlohmann::ordered_json manifest_to_json(const Manifest& manifest);
// Checks every field (types, ranges, the roles against the file names, each
// tensor's bytes against its dtype, shape and stride and against the file size,
// aliases, object-tree tensor indices, FSDP metadata) and recomputes the grid;
// the stored grid is not read. Throws Error naming `source` and the field as a
// JSON path: `files[3].tensors[12].shape[1]`.
Manifest manifest_from_json(const nlohmann::ordered_json& json, const std::string& source);

// A manifest from the bytes of a manifest file (zstd-compressed when
// `compressed`): at most `max_text_bytes` of JSON, nested at most
// kMaxManifestDepth deep, then manifest_from_json. Throws Error naming `source`.
// `on_file` is given each files[i].path as the parser meets it, before anything
// is checked (an untrusted path): to start reading the files meanwhile.
Manifest parse_manifest(Bytes bytes, const std::string& source, bool compressed,
                        std::uint64_t max_text_bytes = kMaxManifestBytes,
                        const std::function<void(const std::string&)>& on_file = {});
// Reads a manifest file (zstd-compressed when it ends in .zst): parse_manifest
// on its mapped bytes.
Manifest read_manifest(const std::string& path, const std::function<void(const std::string&)>& on_file = {});
// Writes it atomically (temp file, fsync, rename); zstd when `path` ends in .zst.
void write_manifest(const Manifest& manifest, const std::string& path, bool overwrite);
bool looks_like_manifest(const std::string& path);

// Throws Error naming the first file whose size or mtime no longer match.
void check_fresh(const Manifest& manifest);

}  // namespace ckpt
