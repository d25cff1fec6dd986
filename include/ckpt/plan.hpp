// A plan: every output file, its zip records and where each byte of each record
// comes from, decided before any output exists.
//
// Commands never copy bytes themselves: they build a Plan and hand it to the one
// executor (exec.hpp). A record's data is either small inline bytes (the pickle,
// `version`) or a list of copy operations from the mapped inputs that covers the
// record exactly, in order of destination offset. Plans are plain data: unit tests
// assert on them without any I/O, and `--dry-run` prints them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/byte_reader.hpp"
#include "ckpt/mapped_file.hpp"

namespace ckpt {

struct CopyOp {
  static constexpr std::uint32_t kZeros = 0xFFFFFFFF;  // source that reads as zero bytes
  std::uint32_t source = kZeros;   // index into Plan::sources, or kZeros
  std::uint64_t source_offset = 0;  // absolute byte offset in the source file
  std::uint64_t dest_offset = 0;    // offset inside the record's data
  std::uint64_t nbytes = 0;
};

struct PlannedRecord {
  std::string name;                  // full zip name, "archive/data/3"
  std::uint64_t nbytes = 0;
  std::vector<std::byte> inline_bytes;  // used when `copies` is empty
  std::vector<CopyOp> copies;

  // Appends a copy at the end of the record, merging it with the previous one
  // when both source and destination continue it.
  void append_copy(std::uint32_t source, std::uint64_t source_offset, std::uint64_t nbytes);
  void append_zeros(std::uint64_t nbytes) { append_copy(CopyOp::kZeros, 0, nbytes); }
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

// Checks the invariants the executor relies on: copies sorted, disjoint, covering
// each record exactly, and reading inside their source. Throws Error (a bug).
void validate(const Plan& plan);

}  // namespace ckpt
