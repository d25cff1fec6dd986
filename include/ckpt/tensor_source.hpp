// A tensor to be written, described by where its bytes are: row-major contiguous
// data assembled from byte segments of input files, never loaded.
//
// Layout rules (FSDP unflattening, Megatron gluing) are pure functions from
// TensorSources to TensorSources; only the planner turns them into copy
// operations. A segment's `file` indexes the manifest's files; kZeroFile reads
// as zero bytes (padding, sinusoidal placeholders).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/dtype.hpp"
#include "ckpt/manifest.hpp"

namespace ckpt {

struct ByteSegment {
  static constexpr std::uint32_t kZeroFile = 0xFFFFFFFF;
  std::uint32_t file = kZeroFile;
  std::uint64_t byte_offset = 0;
  std::uint64_t nbytes = 0;
};

struct TensorSource {
  DType dtype = DType::Float32;
  std::vector<std::int64_t> shape;
  std::vector<ByteSegment> segments;  // in order; their sizes add up to nbytes()

  std::uint64_t numel() const;
  std::uint64_t nbytes() const { return numel() * dtype_info(dtype).itemsize; }
  // Bytes [begin, begin + count) of the data, as a new source of `shape`.
  TensorSource slice(std::uint64_t begin, std::uint64_t count, std::vector<std::int64_t> new_shape) const;
};

// Concatenates sources of one dtype (their bytes one after the other).
TensorSource concat(const std::vector<TensorSource>& parts, std::vector<std::int64_t> shape);

// The bytes of a manifest tensor in row-major order: one segment when it is
// contiguous, otherwise one per innermost contiguous run.
TensorSource source_of(const ManifestTensor& tensor, std::uint32_t file);

// A source of `shape` that reads as zeros.
TensorSource zeros_source(DType dtype, std::vector<std::int64_t> shape);

// A named tensor of a state dict; `alias_of` names an earlier entry whose tensor
// this key shares (tied weights), in which case `source` is unused.
struct NamedTensor {
  std::string name;
  TensorSource source;
  std::optional<std::string> alias_of;
};

}  // namespace ckpt

namespace ckpt {

// A tensor of an output file: its parts interleaved by rows. For r in
// [0, rows), each part's r-th row (part.nbytes() / rows bytes) follows the
// previous part's; with rows == 1 the parts are simply concatenated. Megatron's
// dim-1 gluing is the one user of rows > 1.
struct OutputTensor {
  std::string name;
  DType dtype = DType::Float32;       // as written; may differ from the parts' (conversion)
  std::vector<std::int64_t> shape;
  std::vector<TensorSource> parts;
  std::uint64_t rows = 1;
  std::optional<std::string> alias_of;  // shares an earlier tensor's storage

  std::uint64_t numel() const;
  DType source_dtype() const { return parts.empty() ? dtype : parts.front().dtype; }
};

OutputTensor as_output(const NamedTensor& tensor);

}  // namespace ckpt
