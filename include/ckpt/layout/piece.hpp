// The one byte-range model: a Piece copies bytes of a source into a destination,
// optionally converting their dtype on the way.
//
// A piece moves `rows` runs of `nbytes` destination bytes; run r starts at
// `source_offset + r * source_stride` in the source and at `offset + r * stride`
// in the destination (rows == 1: a plain range). The destination is a tensor's
// row-major bytes (in a TensorSource, layout rules and diff) or a zip record's
// data (in a PlannedRecord, the executor). Offsets, strides and `nbytes` count
// destination bytes; when a piece converts, its source bytes per row are
// `source_nbytes()`. Sources are indices (manifest files for a TensorSource, plan
// sources for a record), or one of two generated sources below.
#pragma once

#include <cstdint>
#include <vector>

#include "ckpt/format/dtype.hpp"

namespace ckpt {

struct Piece {
  static constexpr std::uint32_t kZeros = 0xFFFFFFFF;  // reads as zero bytes (FSDP padding, placeholders)
  // Deterministic pseudo-random values of dest_dtype (`ckpt-tool synth`): element
  // i of an endless stream sits at byte i * itemsize; source_offset is where the
  // copy starts in that stream.
  static constexpr std::uint32_t kSynthetic = 0xFFFFFFFE;
  std::uint32_t source = kZeros;    // a file index, kZeros or kSynthetic
  std::uint64_t source_offset = 0;  // absolute byte offset of row 0 in the source
  std::uint64_t offset = 0;         // destination offset of row 0
  std::uint64_t nbytes = 0;         // destination bytes per row
  std::uint64_t rows = 1;
  std::uint64_t source_stride = 0;  // source bytes between rows; used when rows > 1
  std::uint64_t stride = 0;         // destination bytes between rows
  // Elements are converted when these differ. A TensorSource's pieces leave
  // both at UInt8: its dtype is the tensor's.
  DType source_dtype = DType::UInt8;
  DType dest_dtype = DType::UInt8;

  bool converts() const { return source_dtype != dest_dtype; }
  bool mapped() const { return source < kSynthetic; }
  bool plain() const { return rows == 1 && !converts(); }
  // The source bytes behind `dest_bytes` destination bytes (whole elements).
  std::uint64_t source_bytes(std::uint64_t dest_bytes) const;
  std::uint64_t source_nbytes() const { return source_bytes(nbytes); }  // source bytes per row
  std::uint64_t end() const { return offset + (rows - 1) * stride + nbytes; }
  bool operator==(const Piece&) const = default;
};

// Appends `piece` to `pieces`, merged into the last one when it continues it
// (both plain, the same source and dtype, adjacent in the destination and, but
// for zeros, in the source); empty pieces are dropped. The one merge of byte
// ranges, for TensorSources and planned records alike.
void append_piece(std::vector<Piece>& pieces, const Piece& piece);

}  // namespace ckpt
