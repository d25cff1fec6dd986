// A plan: every output file, its zip records and where each byte of each record
// comes from, decided before any output exists.
//
// Commands never copy bytes themselves: they build a Plan and hand it to the one
// executor (exec.hpp). A record's data is either small inline bytes (the pickle,
// `version`) or copy operations from the mapped inputs that tile the record
// exactly. A copy operation moves `rows` rows of `nbytes` each, from a source
// stride to a destination stride (rows == 1: a plain range), and may convert
// the dtype on the way. Plans are plain data: unit tests assert on them without
// any I/O, and `--dry-run` prints them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/io/byte_reader.hpp"
#include "ckpt/io/mapped_file.hpp"

namespace ckpt {

struct CopyOp {
  static constexpr std::uint32_t kZeros = 0xFFFFFFFF;  // source that reads as zero bytes
  // Deterministic pseudo-random values of dest_dtype (`ckpt-tool synth`): element
  // i of an endless stream sits at byte i * itemsize; source_offset is where the
  // copy starts in that stream.
  static constexpr std::uint32_t kSynthetic = 0xFFFFFFFE;
  std::uint32_t source = kZeros;    // index into Plan::sources, kZeros or kSynthetic
  std::uint64_t source_offset = 0;  // absolute byte offset in the source file
  std::uint64_t dest_offset = 0;    // offset inside the record's data
  std::uint64_t nbytes = 0;         // destination bytes per row
  std::uint64_t rows = 1;
  std::uint64_t source_stride = 0;  // bytes between rows; used when rows > 1
  std::uint64_t dest_stride = 0;
  DType source_dtype = DType::UInt8;  // when they differ, elements are converted
  DType dest_dtype = DType::UInt8;

  bool converts() const { return source_dtype != dest_dtype; }
  bool mapped() const { return source < kSynthetic; }
  bool plain() const { return rows == 1 && !converts(); }
  std::uint64_t source_nbytes() const;  // source bytes per row
  std::uint64_t dest_end() const { return dest_offset + (rows - 1) * dest_stride + nbytes; }
};

struct PlannedRecord {
  std::string name;  // full zip name, "archive/data/3"
  std::uint64_t nbytes = 0;
  std::vector<std::byte> inline_bytes;  // used when `copies` is empty
  std::vector<CopyOp> copies;

  // Appends a plain copy at the end of the record, merging it with the previous
  // one when both source and destination continue it.
  void append_copy(std::uint32_t source, std::uint64_t source_offset, std::uint64_t nbytes);
  // Appends a plain copy (of any dtype) at the end of the record, with the same
  // merging; `op.dest_offset` is ignored.
  void append_plain(CopyOp op);
  void append_zeros(std::uint64_t nbytes) { append_copy(CopyOp::kZeros, 0, nbytes); }
  // True when every copy is plain and they follow each other in order.
  bool sequential() const;
};

struct PlannedFile {
  std::string path;
  std::vector<PlannedRecord> records;
};

struct Plan {
  std::vector<const MappedFile*> sources;
  std::vector<PlannedFile> files;

  std::uint32_t add_source(const MappedFile& file);
  std::uint64_t bytes_to_copy() const;
};

// Checks the invariants the executor relies on: copies tile each record exactly
// (no gap, no overlap) and read inside their source. Throws InternalError: a plan is built by the code, never read from
// input.
void validate(const Plan& plan);

}  // namespace ckpt
