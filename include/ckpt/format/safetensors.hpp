// The safetensors format (huggingface/safetensors), read and laid out for
// writing. Byte layout:
//
//   header length   u64 little-endian: N
//   header          N bytes of UTF-8 JSON, one object:
//                     {"__metadata__": {str: str, ...},            (optional)
//                      "<name>": {"dtype": "F16", "shape": [2, 3],
//                                 "data_offsets": [begin, end]}, ...}
//                   padded with spaces so that 8 + N is a multiple of 8
//   data            the tensors' row-major little-endian bytes: offsets are
//                   relative to the first byte after the header, and the
//                   tensors tile [0, file size - 8 - N) with no gap and no
//                   overlap; end - begin == numel x element size
//
// There is no shared storage (a tied weight is written once, under one name),
// no checksum and no alignment rule; the writer orders tensors by element size,
// largest first, so that every tensor starts at a multiple of its element size
// (what the project's own writer does: readers may view the bytes in place).
// Sharded sets (transformers) add `<stem>.safetensors.index.json`:
// {"metadata": {"total_size": N}, "weight_map": {"<name>": "<file>", ...}}.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/dtype.hpp"
#include "ckpt/io/byte_reader.hpp"

namespace ckpt {

// Headers beyond this are refused (the project's reader has the same limit).
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;
// An index file beyond this is refused.
inline constexpr std::uint64_t kMaxSafetensorsIndexBytes = 256ull << 20;

// "F16" for float16, ...; nullopt for a dtype safetensors has no name for (complex).
std::optional<std::string_view> safetensors_dtype_name(DType dtype);
std::optional<DType> dtype_from_safetensors(std::string_view name);

struct SafetensorsTensor {
  std::string name;
  DType dtype = DType::Float32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // data offsets, relative to the end of the header
  std::uint64_t end = 0;
};

struct SafetensorsHeader {
  std::uint64_t data_offset = 0;                                       // absolute offset of the data: 8 + header length
  std::vector<SafetensorsTensor> tensors;                              // in data order (not the header's own order)
  nlohmann::ordered_json metadata = nlohmann::ordered_json::object();  // __metadata__ (str -> str)
};

// Reads and checks the header of a safetensors file's bytes: the length
// bounded and inside the file, UTF-8 JSON, no duplicate name, every dtype known,
// shape and offsets agreeing, the data tiled exactly. Throws Error naming
// `path`, the tensor and the byte offset.
SafetensorsHeader read_safetensors_header(Bytes file, const std::string& path);

// The 8-byte length and the padded JSON header of `tensors`, whose offsets the
// caller has laid out back to back from 0 (checked: InternalError otherwise).
std::vector<std::byte> render_safetensors_header(const std::vector<SafetensorsTensor>& tensors,
                                                 const nlohmann::ordered_json& metadata);

// A sharded set's index: its files (in the order the weight map's names,
// sorted when read, first name them), and which file holds each name.
struct SafetensorsIndex {
  std::vector<std::string> files;  // names relative to the index's directory
  std::vector<std::pair<std::string, std::string>> weight_map;
  std::optional<std::uint64_t> total_size;
};

// Parses an index file's text (bounded, each file name a plain name in the
// same directory). Throws Error naming `path`.
SafetensorsIndex parse_safetensors_index(std::string_view text, const std::string& path);
std::string render_safetensors_index(const SafetensorsIndex& index);

// The names transformers gives a sharded set: "model-00001-of-00003.safetensors"
// for stem "model".
std::string safetensors_shard_name(std::string_view stem, std::size_t shard, std::size_t shards);
// The stem of a file named as safetensors_shard_name names shards ("model" for
// "model-00001-of-00003.safetensors"); nullopt for any other name.
std::optional<std::string_view> safetensors_shard_stem(std::string_view file_name);

}  // namespace ckpt
