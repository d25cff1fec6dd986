// What each fuzz target does with one input, shared by the libFuzzer targets
// (fuzz_*.cpp) and by the unit test that replays tests/fuzz/regressions/
// (tests/unit/test_fuzz_regressions.cpp), so that a regression file runs exactly
// the code that found it.
//
// A ckpt::Error is the expected outcome for bad input and ends the run quietly.
// Everything else is a finding: a sanitizer report, a crash, a timeout, a leak,
// another exception escaping, or one of the invariants below (checked with
// `require`, which aborts so that libFuzzer saves the input):
//   zip         every record's data lies inside the input; find(name) returns the
//               record; the archive rewritten by our own writer (layout_zip and
//               the header renderers) parses back to the same names and bytes,
//               with data 64-byte aligned
//   pickle      a decoded graph that encodes decodes again, and encoding that
//               again gives the same bytes (the writer's output is always
//               readable, and stable)
//   checkpoint  every tensor's byte range lies inside its storage record; the
//               manifest of the file (describe_file) survives its JSON rendering
//               and reading back
//   manifest    a manifest that reads (parse_manifest, as read_manifest does)
//               has a grid whose cells index its files, every tensor's bytes
//               inside its file (as a range, and piece by piece as source_of
//               and consolidate_part cut them for a plan), object-tree tensor
//               indices inside the tensor list, and it renders to JSON that
//               reads back to the same JSON
//   safetensors a header that reads has tensors that tile the data exactly,
//               each inside the input; rendered again by our writer (in data
//               order) it reads back to the same names, dtypes, shapes and offsets
// None of this touches the disk: the checkpoint target maps the input from a
// memfd, as MappedFile would map a file.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/format/pyobject.hpp"
#include "ckpt/format/safetensors.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/manifest/manifest_json.hpp"

namespace ckpt::fuzz {

[[noreturn]] inline void violated(const char* invariant, const std::string& detail) {
  std::fprintf(stderr, "fuzz invariant violated: %s%s%s\n", invariant, detail.empty() ? "" : ": ", detail.c_str());
  std::abort();
}

inline void require(bool holds, const char* invariant, const std::string& detail = "") {
  if (!holds) violated(invariant, detail);
}

// Reads every byte of `bytes` in C++ (not through isa-l's assembly, which
// AddressSanitizer cannot see), so an out-of-bounds span is reported.
inline volatile unsigned touch_sink = 0;
inline void touch(Bytes bytes) {
  unsigned sum = 0;
  for (std::byte b : bytes) sum += static_cast<unsigned>(b);
  touch_sink = sum;
}

// ---------------------------------------------------------------- zip

// Our own writer's rendering of `zip`'s records (same names and data), or
// nothing when it would be much larger than the input (records may overlap).
inline std::optional<std::vector<std::byte>> rewrite_zip(const ZipArchive& zip, const std::vector<Bytes>& record_data) {
  std::vector<ZipEntrySpec> specs;
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < zip.records().size(); ++i) {
    specs.push_back({zip.records()[i].name, record_data[i].size()});
    total += record_data[i].size() + zip.records()[i].name.size();
  }
  if (total > (std::uint64_t{16} << 20)) return std::nullopt;
  ZipLayout layout = layout_zip(specs);
  for (std::size_t i = 0; i < layout.records.size(); ++i) layout.records[i].crc32 = zip.records()[i].crc32;
  std::vector<std::byte> out(layout.file_size);
  for (std::size_t i = 0; i < layout.records.size(); ++i) {
    const ZipRecord& record = layout.records[i];
    std::vector<std::byte> header = render_local_header(record);
    require(record.header_offset + header.size() == record.data_offset, "zip writer: local header size", record.name);
    std::memcpy(out.data() + record.header_offset, header.data(), header.size());
    if (!record_data[i].empty())
      std::memcpy(out.data() + record.data_offset, record_data[i].data(), record_data[i].size());
  }
  std::vector<std::byte> directory = render_central_directory(layout);
  require(layout.central_directory_offset + directory.size() == layout.file_size, "zip writer: file size");
  std::memcpy(out.data() + layout.central_directory_offset, directory.data(), directory.size());
  return out;
}

// What parsing `input` gives: the records' names and data offsets, or the error.
inline std::string zip_outcome(Bytes input, const ZipArchive::ReadAt& reader) {
  try {
    ZipArchive zip(input, "fuzz.pt", reader);
    std::string outcome;
    for (const ZipRecord& record : zip.records())
      outcome += record.name + "@" + std::to_string(record.data_offset) + ";";
    return outcome;
  } catch (const Error& e) {
    return std::string("error: ") + e.what();
  }
}

inline void run_zip(Bytes input) {
  // Local headers read through a callback (as for mapped files): reads stay inside
  // the input, and the outcome is the same as reading the bytes.
  ZipArchive::ReadAt reader = [input](std::uint64_t at, std::byte* out, std::uint64_t nbytes) {
    require(at <= input.size() && nbytes <= input.size() - at, "zip: local header read inside the input", "");
    std::memcpy(out, input.data() + at, nbytes);
  };
  require(zip_outcome(input, {}) == zip_outcome(input, reader), "zip: parsing through a reader agrees", "");

  std::optional<ZipArchive> zip;
  try {
    zip.emplace(input, "fuzz.pt");
  } catch (const Error&) {
    return;
  }
  std::vector<Bytes> record_data;
  for (const ZipRecord& record : zip->records()) {
    require(record.data_offset <= input.size() && record.nbytes <= input.size() - record.data_offset,
            "zip: record data inside the input", record.name);
    require(zip->find(record.name) == &record, "zip: find(name) returns the record", record.name);
    Bytes data = zip->data(record);
    touch(data);
    record_data.push_back(data);
  }

  std::optional<std::vector<std::byte>> rewritten = rewrite_zip(*zip, record_data);
  if (!rewritten) return;
  try {
    ZipArchive again(*rewritten, "rewritten.pt");
    require(again.records().size() == zip->records().size(), "zip writer: record count");
    for (std::size_t i = 0; i < again.records().size(); ++i) {
      const ZipRecord& record = again.records()[i];
      require(record.name == zip->records()[i].name, "zip writer: record name", record.name);
      require(record.data_offset % kTorchAlignment == 0, "zip writer: data aligned", record.name);
      Bytes data = again.data(record);
      require(data.size() == record_data[i].size() &&
                  (data.empty() || std::memcmp(data.data(), record_data[i].data(), data.size()) == 0),
              "zip writer: record data", record.name);
    }
  } catch (const Error& e) {
    violated("zip writer output does not parse", e.what());
  }
}

// ---------------------------------------------------------------- pickle

// What ckpt-tool does with a decoded graph besides reading tensors: walk its
// paths, render it as JSON, look up config keys, and encode it again.
inline void exercise_graph(const pickle::Graph& graph) {
  std::size_t visits = 0;
  try {
    walk_paths(
        graph, graph.root, "", [&](pickle::NodeId, const std::string& path) { visits += path.size() > 0; },
        [&](pickle::NodeId, const std::string&) { ++visits; });
  } catch (const Error&) {
  }
  try {
    nlohmann::ordered_json rendered = to_json(graph, graph.root, nullptr);
    (void)rendered.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  } catch (const Error&) {
  }
  (void)reachable(graph, graph.root);
  (void)config_get_path(graph, graph.root, {"cfg", "model", "model_parallel_size"});
  (void)as_int_list(graph, graph.root);
  (void)class_name(graph, graph.root);

  std::vector<std::byte> encoded;
  try {
    encoded = pickle::encode(graph);
  } catch (const Error&) {
    return;  // deeper than kMaxDepth, or a global whose name holds a newline
  }
  pickle::Graph again;
  try {
    again = pickle::decode(encoded, "encoded.pkl", "data.pkl", 0);
  } catch (const Error& e) {
    violated("pickle encoder output does not decode", e.what());
  }
  std::vector<std::byte> encoded_again;
  try {
    encoded_again = pickle::encode(again);
  } catch (const Error& e) {
    violated("re-decoded pickle does not encode", e.what());
  }
  require(encoded_again == encoded, "pickle encoding is stable (encode(decode(encode(g))) == encode(g))");
}

inline void run_pickle(Bytes input) {
  pickle::Graph graph;
  try {
    graph = pickle::decode(input, "fuzz.pt", "archive/data.pkl", 0);
  } catch (const Error&) {
    return;
  }
  exercise_graph(graph);
}

// ---------------------------------------------------------------- checkpoint

// One memfd reused for every input: MappedFile maps it through /proc/self/fd.
class MemoryFile {
 public:
  MemoryFile() : fd_(::memfd_create("ckpt-fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) violated("memfd_create", std::strerror(errno));
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemoryFile() { ::close(fd_); }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;

  const std::string& fill(Bytes bytes) {
    if (::ftruncate(fd_, 0) != 0) violated("ftruncate", std::strerror(errno));
    std::size_t written = 0;
    while (written < bytes.size()) {
      ssize_t n = ::pwrite(fd_, bytes.data() + written, bytes.size() - written, static_cast<off_t>(written));
      if (n <= 0) violated("pwrite", std::strerror(errno));
      written += static_cast<std::size_t>(n);
    }
    return path_;
  }

 private:
  int fd_;
  std::string path_;
};

inline void check_checkpoint(const Checkpoint& checkpoint) {
  std::uint64_t file_size = checkpoint.file().size();
  for (std::size_t i = 0; i < checkpoint.tensors().size(); ++i) {
    const StoredTensor& tensor = checkpoint.tensors()[i];
    const std::uint64_t offset = checkpoint.places()[i].file_byte_offset;
    const StorageRef& storage = checkpoint.storages().at(tensor.storage_key);
    const ZipRecord& record = *storage.record;
    require(offset >= record.data_offset && offset - record.data_offset <= record.nbytes &&
                tensor.nbytes <= record.nbytes - (offset - record.data_offset),
            "checkpoint: tensor bytes inside its storage record", tensor.path);
    require(record.data_offset + record.nbytes <= file_size, "checkpoint: record inside the file", record.name);
    Bytes bytes = checkpoint.tensor_bytes(i);
    require(bytes.size() == tensor.nbytes, "checkpoint: tensor_bytes size", tensor.path);
    if (!bytes.empty()) {
      volatile std::byte first = bytes.front();
      volatile std::byte last = bytes.back();
      (void)first;
      (void)last;
    }
  }

  ManifestFile described;
  try {
    described = describe_file(checkpoint);
  } catch (const Error&) {
    return;  // malformed FSDP metadata, objects nested too deeply
  }
  require(described.tensors.size() == checkpoint.tensors().size(), "manifest: one entry per tensor");
  Manifest manifest;
  manifest.files.push_back(std::move(described));
  manifest.grid = detect_grid(manifest.files);
  std::string text = manifest_to_json(manifest).dump(1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  nlohmann::ordered_json parsed = nlohmann::ordered_json::parse(text, nullptr, false);
  require(!parsed.is_discarded(), "manifest: rendered JSON parses");
  try {
    Manifest again = manifest_from_json(parsed, "fuzz.json");
    require(again.files.size() == 1 && again.files[0].tensors.size() == checkpoint.tensors().size(),
            "manifest: read back with every tensor");
  } catch (const Error& e) {
    violated("manifest written for a checkpoint does not read back", e.what());
  }
}

inline void run_checkpoint(Bytes input) {
  static MemoryFile memory;
  std::optional<MappedFile> file;
  std::optional<Checkpoint> checkpoint;
  try {
    file.emplace(memory.fill(input));
    checkpoint.emplace(*file);
  } catch (const Error&) {
    return;
  }
  check_checkpoint(*checkpoint);
  exercise_graph(checkpoint->graph());
}

// ---------------------------------------------------------------- manifest

// Far below kMaxManifestBytes: libFuzzer runs with -rss_limit_mb=2048, and a few
// kilobytes of zstd can claim gigabytes.
inline constexpr std::uint64_t kFuzzManifestTextBytes = std::uint64_t{64} << 20;
// Plans are built only for tensors of at most this many elements: source_of cuts
// a strided view into one piece per contiguous run, which a crafted (or a real,
// broadcast) view with zero strides makes as many as its elements.
inline constexpr std::uint64_t kFuzzPlanElements = std::uint64_t{1} << 16;

// Every row of `piece` (a piece of manifest file `file`) inside [begin, end).
inline void require_piece_inside(const Piece& piece, std::uint64_t begin, std::uint64_t end, const std::string& what) {
  require(piece.rows >= 1, "manifest: a piece has rows", what);
  std::uint64_t last_row = 0;
  std::uint64_t piece_end = 0;
  bool fits = !__builtin_mul_overflow(piece.rows - 1, piece.source_stride, &last_row) &&
              !__builtin_add_overflow(piece.source_offset, last_row, &piece_end) &&
              !__builtin_add_overflow(piece_end, piece.nbytes, &piece_end);
  require(fits && piece.source_offset >= begin && piece_end <= end, "manifest: a piece reads inside its bytes", what);
}

// inspect's walk of the object tree: {"$tensor": i} is tensors[i].
inline void walk_objects(const nlohmann::ordered_json& node, const ManifestFile& file) {
  if (node.is_array()) {
    for (const nlohmann::ordered_json& item : node) walk_objects(item, file);
    return;
  }
  if (!node.is_object()) return;
  if (node.contains("$tensor")) {
    const nlohmann::ordered_json& index = node["$tensor"];
    require(index.is_number_unsigned() && index.get<std::uint64_t>() < file.tensors.size(),
            "manifest: $tensor indexes the file's tensors", file.path);
  }
  for (const char* key : {"$ref", "$class"}) {
    require(!node.contains(key) || node[key].is_string(), "manifest: $ref and $class are strings", file.path);
  }
  for (const nlohmann::ordered_json& item : node) walk_objects(item, file);
}

inline void check_manifest(const Manifest& manifest) {
  const Grid& grid = manifest.grid;
  require(grid.cells.size() == static_cast<std::size_t>(grid.mp), "manifest: grid rows", "");
  for (const std::vector<int>& row : grid.cells) {
    require(row.size() == static_cast<std::size_t>(grid.dp), "manifest: grid columns", "");
    for (int cell : row) {
      require(cell >= -1 && cell < static_cast<int>(manifest.files.size()), "manifest: grid cells index files", "");
    }
  }
  bool small = true;
  for (std::size_t f = 0; f < manifest.files.size(); ++f) {
    const ManifestFile& file = manifest.files[f];
    for (const StoredTensor& tensor : file.tensors) {
      const std::uint64_t offset = file.place(tensor).file_byte_offset;
      std::uint64_t end = 0;
      require(!__builtin_add_overflow(offset, tensor.nbytes, &end) && end <= file.size_bytes,
              "manifest: tensor bytes inside the file", tensor.path);
      ViewExtent extent = view_extent(tensor.shape, tensor.stride, dtype_info(tensor.dtype).itemsize);
      require(
          extent.numel == tensor.numel() && extent.span_elements * dtype_info(tensor.dtype).itemsize == tensor.nbytes,
          "manifest: nbytes is the span of the view", tensor.path);
      if (tensor.numel() > kFuzzPlanElements) {
        small = false;
        continue;
      }
      TensorSource source = source_of(tensor, offset, static_cast<std::uint32_t>(f));
      require(source.nbytes() == tensor.numel() * dtype_info(tensor.dtype).itemsize, "manifest: source size",
              tensor.path);
      for (const Piece& piece : source.pieces) {
        require_piece_inside(piece, offset, end, tensor.path);
        require(piece.end() <= source.nbytes(), "manifest: piece inside the tensor", tensor.path);
      }
    }
    walk_objects(*file.objects, file);
  }
  // What stitch and reshard do first: consolidate each part from its shards.
  if (small && grid.problems.empty()) {
    for (const std::vector<int>& shards : grid.cells) {
      std::vector<NamedTensor> tensors;
      try {
        tensors = consolidate_part(manifest, shards);
      } catch (const Error&) {
        continue;
      }
      for (const NamedTensor& tensor : tensors) {
        for (const Piece& piece : tensor.source.pieces) {
          if (piece.source == Piece::kZeros) continue;
          require(piece.source < manifest.files.size(), "manifest: consolidated piece names a file", tensor.name);
          require_piece_inside(piece, 0, manifest.files[piece.source].size_bytes, tensor.name);
        }
      }
    }
  }
  // Rendering what was read and reading it back gives the same JSON.
  nlohmann::ordered_json rendered = manifest_to_json(manifest);
  try {
    Manifest again = manifest_from_json(rendered, "rendered.json");
    require(manifest_to_json(again) == rendered, "manifest: JSON round trip");
  } catch (const Error& e) {
    violated("manifest: rendered manifest does not read back", e.what());
  }
}

inline void run_manifest(Bytes input) {
  // A zstd frame (magic 28 b5 2f fd) is read as a .json.zst file, anything else as .json.
  bool compressed = input.size() >= 4 && input[0] == std::byte{0x28} && input[1] == std::byte{0xb5} &&
                    input[2] == std::byte{0x2f} && input[3] == std::byte{0xfd};
  Manifest manifest;
  try {
    manifest = parse_manifest(input, compressed ? "fuzz.json.zst" : "fuzz.json", compressed, kFuzzManifestTextBytes);
  } catch (const Error&) {
    return;
  }
  check_manifest(manifest);
}

inline void run_safetensors(Bytes input) {
  SafetensorsHeader header;
  try {
    header = read_safetensors_header(input, "fuzz.safetensors");
  } catch (const Error&) {
    return;
  }
  require(header.data_offset >= 8 && header.data_offset <= input.size(), "safetensors: the data starts in the input");
  std::vector<SafetensorsTensor> by_offset = header.tensors;
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
  std::uint64_t at = 0;
  for (const SafetensorsTensor& tensor : by_offset) {
    require(tensor.begin == at && tensor.end >= tensor.begin, "safetensors: tensors tile the data", tensor.name);
    touch(input.subspan(header.data_offset + tensor.begin, tensor.end - tensor.begin));
    at = tensor.end;
  }
  require(header.data_offset + at == input.size(), "safetensors: the data ends at the end of the input");
  std::vector<std::byte> again = render_safetensors_header(by_offset, header.metadata);
  again.resize(again.size() + at);
  SafetensorsHeader back = read_safetensors_header(again, "again.safetensors");
  require(back.tensors.size() == by_offset.size(), "safetensors: rewritten header reads back", "tensor count");
  for (std::size_t i = 0; i < by_offset.size(); ++i) {
    const SafetensorsTensor& a = by_offset[i];
    const SafetensorsTensor& b = back.tensors[i];
    require(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.begin == b.begin && a.end == b.end,
            "safetensors: rewritten header reads back", a.name);
  }
}

}  // namespace ckpt::fuzz
