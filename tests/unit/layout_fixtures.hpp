// Shared helpers of the layout unit tests (test_fsdp_layout.cpp,
// test_megatron.cpp, test_tensor_record.cpp): manifests built in memory, tensor
// sources written by hand, a reference model of a source's bytes and a
// simulator of copies.
//
// The reference model: a fake file's byte at offset o of file f "holds" the
// identity byte_id(f, o), so expanding a source's pieces row by row gives, for
// every logical byte of the tensor, exactly where it comes from. Expected
// identities are computed with plain loops (ids_* below) and compared whole.
// Where real bytes matter (dtype conversion, int32 matrices), files are byte
// vectors and copies run in the simulator; the only files on disk are
// a few temporary sources for ckpt::validate (it needs MappedFiles).
#pragma once

#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/io/error.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/fsdp.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/layout/metaseq.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/manifest/optimizer_state.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/plan.hpp"
#include "error_kind.hpp"
#include "plan_sources.hpp"
#include "temp_files.hpp"

namespace layout_fixtures {

using test_files::TempFile;

using ckpt::DType;
using ckpt::NamedTensor;
using ckpt::Piece;
using ckpt::PlannedRecord;
using ckpt::TensorSource;
using Shape = std::vector<std::int64_t>;
using Buffer = std::vector<std::byte>;
using Ids = std::vector<std::uint64_t>;

// a + b, by append (GCC 12 at -O3 warns falsely on "literal" + std::string).
inline std::string cat(std::string a, const std::string& b) {
  a.append(b);
  return a;
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// The ckpt::Error thrown by `action`, if any.
template <typename F>
std::optional<ckpt::Error> error_of(F&& action) {
  try {
    action();
  } catch (const ckpt::Error& e) {
    return e;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------- printing

// "[offset]file@source_offset+nbytes", "*rows(ss=source_stride,st=stride)" when
// strided; "zeros" for kZeroFile. Pieces in their order, space separated.
inline std::string describe(const Piece& piece) {
  std::string out = "[";
  out.append(std::to_string(piece.offset));
  out.append("]");
  if (piece.source == Piece::kZeros) {
    out.append("zeros");
  } else {
    out.append(std::to_string(piece.source));
    out.append("@");
    out.append(std::to_string(piece.source_offset));
  }
  out.append("+");
  out.append(std::to_string(piece.nbytes));
  if (piece.rows != 1) {
    out.append("*");
    out.append(std::to_string(piece.rows));
    out.append("(ss");
    out.append(std::to_string(piece.source_stride));
    out.append(",st");
    out.append(std::to_string(piece.stride));
    out.append(")");
  }
  return out;
}
inline std::string describe(const TensorSource& source) {
  std::string out;
  for (const Piece& piece : source.pieces) {
    if (!out.empty()) out.append(" ");
    out.append(describe(piece));
  }
  return out;
}

inline std::string shape_of(const Shape& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out.append(", ");
    out.append(std::to_string(shape[i]));
  }
  out.append("]");
  return out;
}

inline std::vector<std::string> names_of(const std::vector<NamedTensor>& tensors) {
  std::vector<std::string> out;
  for (const NamedTensor& tensor : tensors) out.push_back(tensor.name);
  return out;
}

inline const NamedTensor& find(const std::vector<NamedTensor>& tensors, const std::string& name) {
  for (const NamedTensor& tensor : tensors) {
    if (tensor.name == name) return tensor;
  }
  FAIL("no tensor named " << name);
  throw 0;  // unreachable
}

inline std::int64_t product(const Shape& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------- manifests

// A contiguous tensor of a manifest file, and where it is.
struct PlacedTensor {
  ckpt::StoredTensor tensor;
  ckpt::TensorPlace place;
};
inline PlacedTensor contiguous(const std::string& path, DType dtype, const Shape& shape, std::uint64_t offset) {
  ckpt::StoredTensor tensor;
  tensor.path = path;
  tensor.dtype = dtype;
  tensor.shape = shape;
  tensor.stride.assign(shape.size(), 1);
  for (std::size_t d = shape.size(); d > 1; --d) tensor.stride[d - 2] = tensor.stride[d - 1] * shape[d - 1];
  tensor.storage_key = std::to_string(offset);
  tensor.nbytes = static_cast<std::uint64_t>(product(shape)) * ckpt::dtype_info(dtype).itemsize;
  return {tensor, {offset, 0}};
}
inline void add(ckpt::ManifestFile& file, const PlacedTensor& placed) {
  file.add_tensor(placed.tensor, placed.place);
}

// One FSDP instance as metaseq writes it, before sharding.
struct InstanceSpec {
  std::string fsdp_path;
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  bool no_broadcast = false;
  std::vector<std::pair<std::string, std::string>> shared;
};

inline std::int64_t total_numel(const InstanceSpec& spec) {
  std::int64_t n = 0;
  for (const Shape& shape : spec.shapes) n += product(shape);
  return n;
}

inline std::string flat_key(const InstanceSpec& spec) {
  return spec.fsdp_path.empty() ? std::string("flat_param_0") : cat(spec.fsdp_path, ".flat_param_0");
}

// What rank `rank` of `world` ranks holds of an instance's flat parameter
// (no_broadcast instances: everything, on every rank).
inline ckpt::FsdpChunk chunk_of(const InstanceSpec& spec, int world, int rank) {
  return spec.no_broadcast ? ckpt::fsdp_chunk(total_numel(spec), 1, 0)
                           : ckpt::fsdp_chunk(total_numel(spec), world, rank);
}

// The metadata of one instance on rank `rank` of `world`.
inline ckpt::FsdpInstanceMeta instance_meta(const InstanceSpec& spec, int world, int rank) {
  ckpt::FsdpInstanceMeta instance;
  instance.fsdp_path = spec.fsdp_path;
  instance.no_broadcast_optim_state = spec.no_broadcast;
  instance.shared_param_info = spec.shared;
  ckpt::FlatParamMeta flat;
  flat.state_key = flat_key(spec);
  flat.name = "flat_param_0";
  flat.names = spec.names;
  flat.shapes = spec.shapes;
  for (const Shape& shape : spec.shapes) flat.numels.push_back(product(shape));
  flat.padding = chunk_of(spec, world, rank).padding;
  instance.flat_params.push_back(flat);
  return instance;
}

// Shard `rank` of `world`: one flat tensor per instance at `offsets[i]` (chunk
// length, padding included), this rank's metadata, and one-element buffers.
inline ckpt::ManifestFile shard_file(const std::string& path, const std::vector<InstanceSpec>& instances, int world,
                                     int rank, const std::vector<std::uint64_t>& offsets, DType dtype,
                                     const std::vector<std::pair<std::string, std::uint64_t>>& buffers,
                                     const std::string& state_dict = "model") {
  ckpt::ManifestFile file;
  file.path = path;
  file.role.dp_shard = rank;
  file.role.mp_part = 0;
  ckpt::FsdpMetadata metadata;
  for (std::size_t i = 0; i < instances.size(); ++i) {
    const InstanceSpec& spec = instances[i];
    metadata.instances.push_back(instance_meta(spec, world, rank));
    ckpt::FsdpChunk chunk = chunk_of(spec, world, rank);
    std::string tensor_path = state_dict;
    tensor_path.append("/");
    tensor_path.append(flat_key(spec));
    add(file, contiguous(tensor_path, dtype, {chunk.numel + chunk.padding}, offsets.at(i)));
  }
  for (const auto& [name, offset] : buffers) {
    metadata.buffer_names.push_back(name);
    add(file, contiguous(cat("model/", name), dtype, {1}, offset));
  }
  // Optimizer state is not part of the model and must never be picked up.
  add(file, contiguous("last_optimizer_state/state/0/exp_avg", dtype, {4}, 60000));
  file.fsdp = metadata;
  return file;
}

inline std::string shard_path(int rank) {
  std::string out = "/ckpt/checkpoint_last-shard";
  out.append(std::to_string(rank));
  out.append(".pt");
  return out;
}

// The part of FSDP tests 1: two instances (a decoder layer first, then the root)
// on 3 ranks with padding, stored in the manifest out of order.
//   layer: fc1.weight [2,2], fc1.bias [2], fc2.bias [2]: 8 elements, chunk 3,
//          ranks hold 3, 3, 2 (+1 padding)
//   root:  embed_tokens [4,2], final_layer_norm [2]: 10 elements, chunk 4,
//          ranks hold 4, 4, 2 (+2 padding); output_projection tied to embed_tokens
// Rank d's flat tensors sit at layer 64 + 256d and root 1024 + 512d; the manifest
// holds ranks 2, 0, 1 at indices 0, 1, 2, so shard_files is {1, 2, 0}.
struct ThreeRankPart {
  std::vector<InstanceSpec> instances{
      {"decoder.layers.0", {"fc1.weight", "fc1.bias", "fc2.bias"}, {{2, 2}, {2}, {2}}, false, {}},
      {"",
       {"decoder.embed_tokens.weight", "decoder.final_layer_norm.weight"},
       {{4, 2}, {2}},
       false,
       {{"decoder.embed_tokens.weight", "decoder.output_projection.weight"}}},
  };
  ckpt::Manifest manifest;
  std::vector<int> shard_files{1, 2, 0};

  ThreeRankPart() {
    for (int rank : {2, 0, 1}) {
      std::uint64_t layer = 64 + 256 * static_cast<std::uint64_t>(rank);
      std::uint64_t root = 1024 + 512 * static_cast<std::uint64_t>(rank);
      manifest.files.push_back(shard_file(shard_path(rank), instances, 3, rank, {layer, root}, DType::Float32,
                                          {{"decoder.version", 4000 + 8 * static_cast<std::uint64_t>(rank)}}));
    }
  }
  ckpt::ManifestFile& rank_file(int rank) { return manifest.files.at(static_cast<std::size_t>(shard_files.at(rank))); }
  ckpt::StoredTensor& flat_tensor(int rank, const std::string& key) {
    for (ckpt::StoredTensor& tensor : rank_file(rank).tensors.edit()) {
      if (tensor.path == cat("model/", key)) return tensor;
    }
    FAIL("no flat tensor " << key);
    throw 0;
  }
};

// ---------------------------------------------------------------- sources by hand

inline Piece plain(std::uint32_t file, std::uint64_t source_offset, std::uint64_t offset, std::uint64_t nbytes) {
  Piece piece;
  piece.source = file;
  piece.source_offset = source_offset;
  piece.offset = offset;
  piece.nbytes = nbytes;
  return piece;
}
inline Piece strided(std::uint32_t file, std::uint64_t source_offset, std::uint64_t offset, std::uint64_t nbytes,
                     std::uint64_t rows, std::uint64_t source_stride, std::uint64_t stride) {
  Piece piece = plain(file, source_offset, offset, nbytes);
  piece.rows = rows;
  piece.source_stride = source_stride;
  piece.stride = stride;
  return piece;
}
inline Piece zeros(std::uint64_t offset, std::uint64_t nbytes, std::uint64_t rows = 1, std::uint64_t stride = 0) {
  return strided(Piece::kZeros, 0, offset, nbytes, rows, 0, rows > 1 ? stride : 0);
}

inline TensorSource source(DType dtype, const Shape& shape, std::vector<Piece> pieces) {
  TensorSource out;
  out.dtype = dtype;
  out.shape = shape;
  out.pieces = std::move(pieces);
  return out;
}

// A run of a file: which file, where, how many bytes.
struct Run {
  std::uint32_t file;
  std::uint64_t source_offset;
  std::uint64_t nbytes;
};
// A source whose bytes are the runs one after the other.
inline TensorSource runs_source(DType dtype, const Shape& shape, const std::vector<Run>& runs) {
  std::vector<Piece> pieces;
  std::uint64_t at = 0;
  for (const Run& run : runs) {
    pieces.push_back(plain(run.file, run.source_offset, at, run.nbytes));
    at += run.nbytes;
  }
  return source(dtype, shape, std::move(pieces));
}

// A state-dict entry whose bytes are one run of `file` at `offset`.
inline NamedTensor named(const std::string& name, const Shape& shape, std::uint32_t file, std::uint64_t offset,
                         DType dtype = DType::Float32) {
  NamedTensor tensor;
  tensor.name = name;
  tensor.source.dtype = dtype;
  tensor.source.shape = shape;
  std::uint64_t nbytes = tensor.source.nbytes();
  if (nbytes > 0) tensor.source.pieces.push_back(plain(file, offset, 0, nbytes));
  return tensor;
}

inline NamedTensor alias(const std::string& name, const std::string& of) {
  NamedTensor tensor;
  tensor.name = name;
  tensor.alias_of = of;
  return tensor;
}

// ---------------------------------------------------------------- the reference model

inline constexpr std::uint64_t kZeroId = ~std::uint64_t{0};
inline constexpr std::uint64_t kUnsetId = ~std::uint64_t{0} - 1;

// The identity of byte `offset` of fake file `file`.
inline std::uint64_t byte_id(std::uint32_t file, std::uint64_t offset) {
  return (std::uint64_t{file} << 40) | offset;
}

inline std::string id_text(std::uint64_t id) {
  if (id == kZeroId) return "zero";
  if (id == kUnsetId) return "unset";
  std::string out = std::to_string(id >> 40);
  out.append("@");
  out.append(std::to_string(id & ((std::uint64_t{1} << 40) - 1)));
  return out;
}

// Expands the pieces row by row: where every logical byte comes from. `problem`
// says what breaks the tiling (a byte written twice or never, a piece past the
// end, an empty piece, overlapping rows), "" when the pieces tile exactly.
struct Expansion {
  Ids ids;
  std::string problem;
};
inline Expansion expand(const TensorSource& source) {
  Expansion out;
  out.ids.assign(source.nbytes(), kUnsetId);
  auto fail = [&](std::string what, std::uint64_t at) {
    if (!out.problem.empty()) return;
    what.append(" at ");
    what.append(std::to_string(at));
    out.problem = what;
  };
  for (const Piece& piece : source.pieces) {
    if (piece.rows == 0 || piece.nbytes == 0) fail("empty piece", piece.offset);
    if (piece.rows > 1 && piece.stride < piece.nbytes) fail("rows of a piece overlap", piece.offset);
    for (std::uint64_t r = 0; r < piece.rows; ++r) {
      for (std::uint64_t b = 0; b < piece.nbytes; ++b) {
        std::uint64_t at = piece.offset + r * piece.stride + b;
        if (at >= out.ids.size()) {
          fail("piece past the end", at);
          break;
        }
        if (out.ids[at] != kUnsetId) fail("byte written twice", at);
        out.ids[at] = piece.source == Piece::kZeros
                          ? kZeroId
                          : byte_id(piece.source, piece.source_offset + r * piece.source_stride + b);
      }
    }
  }
  for (std::uint64_t at = 0; at < out.ids.size(); ++at) {
    if (out.ids[at] == kUnsetId) {
      fail("byte not covered", at);
      break;
    }
  }
  return out;
}

// The identities of a source's bytes, checking that its pieces tile it.
inline Ids ids_of(const TensorSource& source) {
  Expansion expansion = expand(source);
  CHECK_MESSAGE(expansion.problem.empty(), "pieces do not tile: " << expansion.problem << " in " << describe(source));
  return expansion.ids;
}

// "" when equal, else the first difference.
inline std::string difference(const Ids& got, const Ids& want) {
  std::size_t n = std::min(got.size(), want.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (got[i] != want[i]) {
      std::string out = "byte ";
      out.append(std::to_string(i));
      out.append(": got ");
      out.append(id_text(got[i]));
      out.append(", want ");
      out.append(id_text(want[i]));
      return out;
    }
  }
  if (got.size() != want.size()) {
    std::string out = "got ";
    out.append(std::to_string(got.size()));
    out.append(" bytes, want ");
    out.append(std::to_string(want.size()));
    return out;
  }
  return "";
}

// Reference tensors, with plain loops.
inline Ids ids_run(std::uint32_t file, std::uint64_t source_offset, std::uint64_t nbytes) {
  Ids out;
  for (std::uint64_t i = 0; i < nbytes; ++i) out.push_back(byte_id(file, source_offset + i));
  return out;
}
// `rows` rows of `row_bytes`, row r at source_offset + r * pitch.
inline Ids ids_matrix(std::uint32_t file, std::uint64_t source_offset, std::uint64_t rows, std::uint64_t row_bytes,
                      std::uint64_t pitch) {
  Ids out;
  for (std::uint64_t r = 0; r < rows; ++r) {
    for (std::uint64_t c = 0; c < row_bytes; ++c) out.push_back(byte_id(file, source_offset + r * pitch + c));
  }
  return out;
}
inline Ids ids_zeros(std::uint64_t nbytes) {
  return Ids(nbytes, kZeroId);
}
inline Ids ids_join(const std::vector<Ids>& parts) {
  Ids out;
  for (const Ids& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}
inline Ids ids_slice(const Ids& ids, std::uint64_t begin, std::uint64_t count) {
  Ids out;
  for (std::uint64_t i = begin; i < begin + count; ++i) out.push_back(ids.at(i));
  return out;
}
// Bytes [begin, begin + count) of every row of `rows` equal rows.
inline Ids ids_columns(const Ids& ids, std::uint64_t rows, std::uint64_t begin, std::uint64_t count) {
  Ids out;
  std::uint64_t row_bytes = ids.size() / rows;
  for (std::uint64_t r = 0; r < rows; ++r) {
    for (std::uint64_t c = begin; c < begin + count; ++c) out.push_back(ids.at(r * row_bytes + c));
  }
  return out;
}
// Row r of every part in turn, for every r.
inline Ids ids_interleave(const std::vector<Ids>& parts, std::uint64_t rows) {
  Ids out;
  for (std::uint64_t r = 0; r < rows; ++r) {
    for (const Ids& part : parts) {
      std::uint64_t row_bytes = part.size() / rows;
      for (std::uint64_t c = 0; c < row_bytes; ++c) out.push_back(part.at(r * row_bytes + c));
    }
  }
  return out;
}

// ---------------------------------------------------------------- plans and bytes

// A record's piece in the plan notation: "SOURCE src=S dst=D n=N[ rows=R ss= ds=][ from->to]".
inline std::string describe_copy(const Piece& piece) {
  std::string out = piece.source == Piece::kZeros ? std::string("zeros") : std::to_string(piece.source);
  out.append(" src=");
  out.append(std::to_string(piece.source_offset));
  out.append(" dst=");
  out.append(std::to_string(piece.offset));
  out.append(" n=");
  out.append(std::to_string(piece.nbytes));
  if (piece.rows != 1) {
    out.append(" rows=");
    out.append(std::to_string(piece.rows));
    out.append(" ss=");
    out.append(std::to_string(piece.source_stride));
    out.append(" ds=");
    out.append(std::to_string(piece.stride));
  }
  if (piece.converts()) {
    out.append(" ");
    out.append(ckpt::dtype_info(piece.source_dtype).name);
    out.append("->");
    out.append(ckpt::dtype_info(piece.dest_dtype).name);
  }
  return out;
}
inline std::vector<std::string> describe_copies(const std::vector<Piece>& pieces) {
  std::vector<std::string> out;
  for (const Piece& piece : pieces) out.push_back(describe_copy(piece));
  return out;
}

// "" when the copies' destination ranges tile [0, record.nbytes) exactly (no gap,
// no overlap, every copy non-empty), else what is wrong.
inline std::string tiling_problem(const PlannedRecord& record) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;  // [begin, end)
  for (const Piece& piece : record.copies) {
    if (piece.nbytes == 0 || piece.rows == 0) return "empty copy";
    for (std::uint64_t r = 0; r < piece.rows; ++r) {
      std::uint64_t begin = piece.offset + r * piece.stride;
      ranges.emplace_back(begin, begin + piece.nbytes);
    }
  }
  std::sort(ranges.begin(), ranges.end());
  std::uint64_t expected = 0;
  for (const auto& [begin, end] : ranges) {
    if (begin != expected) {
      std::string out = begin < expected ? std::string("overlap at ") : std::string("gap at ");
      out.append(std::to_string(std::min(begin, expected)));
      return out;
    }
    expected = end;
  }
  if (expected != record.nbytes) {
    std::string out = "copies end at ";
    out.append(std::to_string(expected));
    out.append(" of ");
    out.append(std::to_string(record.nbytes));
    return out;
  }
  return "";
}

// float32 -> float16 for values float16 holds exactly (the test data are small
// integers and halves); anything else fails the test rather than rounding.
inline std::uint16_t half_of(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, 4);
  auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000);
  std::uint32_t exponent = (bits >> 23) & 0xFF;
  std::uint32_t mantissa = bits & 0x7FFFFF;
  if (exponent == 0 && mantissa == 0) return sign;
  int half_exponent = static_cast<int>(exponent) - 127 + 15;
  REQUIRE(half_exponent > 0);
  REQUIRE(half_exponent < 31);
  REQUIRE((mantissa & 0x1FFF) == 0);
  return static_cast<std::uint16_t>(sign | (half_exponent << 10) | (mantissa >> 13));
}

inline void convert_f32_to_f16(const std::byte* from, std::byte* to, std::uint64_t elements) {
  for (std::uint64_t i = 0; i < elements; ++i) {
    float value = 0;
    std::memcpy(&value, from + 4 * i, 4);
    std::uint16_t half = half_of(value);
    std::memcpy(to + 2 * i, &half, 2);
  }
}

// Runs a record's copies as the executor would, `sources[piece.source]` being the
// bytes of plan source piece.source. Bytes no copy writes keep the 0xEE poison.
inline Buffer execute(const PlannedRecord& record, const std::vector<const Buffer*>& sources) {
  Buffer out(record.nbytes, std::byte{0xEE});
  for (const Piece& piece : record.copies) {
    for (std::uint64_t r = 0; r < piece.rows; ++r) {
      std::uint64_t dest = piece.offset + r * piece.stride;
      REQUIRE(dest + piece.nbytes <= out.size());
      if (piece.source == Piece::kZeros) {
        std::fill(out.begin() + static_cast<std::ptrdiff_t>(dest),
                  out.begin() + static_cast<std::ptrdiff_t>(dest + piece.nbytes), std::byte{0});
        continue;
      }
      REQUIRE(piece.source < sources.size());
      const Buffer& file = *sources[piece.source];
      std::uint64_t from = piece.source_offset + r * piece.source_stride;
      REQUIRE(from + piece.source_nbytes() <= file.size());
      if (!piece.converts()) {
        std::memcpy(out.data() + dest, file.data() + from, piece.nbytes);
      } else {
        REQUIRE(piece.source_dtype == DType::Float32);
        REQUIRE(piece.dest_dtype == DType::Float16);
        convert_f32_to_f16(file.data() + from, out.data() + dest, piece.nbytes / 2);
      }
    }
  }
  return out;
}

// The bytes the identities name, read from the fake files.
inline Buffer bytes_of(const Ids& ids, const std::vector<const Buffer*>& files) {
  Buffer out;
  for (std::uint64_t id : ids) {
    if (id == kZeroId) {
      out.push_back(std::byte{0});
      continue;
    }
    REQUIRE(id != kUnsetId);
    const Buffer& file = *files.at(id >> 40);
    std::uint64_t offset = id & ((std::uint64_t{1} << 40) - 1);
    REQUIRE(offset < file.size());
    out.push_back(file[offset]);
  }
  return out;
}
// A source's bytes, read piece by piece (independent of the planner).
inline Buffer materialize(const TensorSource& source, const std::vector<const Buffer*>& files) {
  return bytes_of(ids_of(source), files);
}

// A fake file of `nbytes` whose bytes differ from their neighbours and from
// other files' (so a wrong offset or file shows).
inline Buffer patterned(std::size_t nbytes, unsigned salt) {
  Buffer out(nbytes);
  for (std::size_t i = 0; i < nbytes; ++i) out[i] = static_cast<std::byte>((i * 7 + salt * 31 + i / 256) & 0xFF);
  return out;
}

template <typename T>
void put(Buffer& file, std::uint64_t offset, const std::vector<T>& values) {
  REQUIRE(offset + values.size() * sizeof(T) <= file.size());
  std::memcpy(file.data() + offset, values.data(), values.size() * sizeof(T));
}

template <typename T>
std::vector<T> values_of(const Buffer& bytes) {
  REQUIRE(bytes.size() % sizeof(T) == 0);
  std::vector<T> out(bytes.size() / sizeof(T));
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

inline std::vector<const Buffer*> pointers(const std::vector<Buffer>& files) {
  std::vector<const Buffer*> out;
  for (const Buffer& file : files) out.push_back(&file);
  return out;
}

// The identity sources 0, 1, ..., n-1 (manifest file i is plan source i).
inline std::vector<std::uint32_t> identity_sources(std::size_t n) {
  std::vector<std::uint32_t> out;
  for (std::size_t i = 0; i < n; ++i) out.push_back(static_cast<std::uint32_t>(i));
  return out;
}

// A plan with one output record whose sources are real (small) temp files, for
// ckpt::validate; plan source i is temp file i.
struct ValidationPlan {
  std::vector<std::unique_ptr<TempFile>> temp;
  std::vector<std::unique_ptr<ckpt::MappedFile>> mapped;
  ckpt::Plan plan;

  ValidationPlan(const std::vector<std::size_t>& sizes, PlannedRecord record) {
    for (std::size_t size : sizes) {
      temp.push_back(std::make_unique<TempFile>(size));
      mapped.push_back(std::make_unique<ckpt::MappedFile>(temp.back()->path()));
      plan.add_source(test_files::whole_file_source(*mapped.back()));
    }
    record.name = "archive/data/0";
    plan.files.push_back(test_files::planned_file("/tmp/never-written-layout.pt", {std::move(record)}));
  }
};

}  // namespace layout_fixtures
