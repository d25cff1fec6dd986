// A plan: every output file, its zip records and where each byte of each record
// comes from, decided before any output exists.
//
// Commands never copy bytes themselves: they build a Plan and hand it to the one
// executor (exec.hpp). A record's data is either small inline bytes (the pickle,
// `version`) or copy operations from the mapped inputs that tile the record
// exactly: Pieces (piece.hpp) whose sources are Plan::sources indices and whose
// destination is the record's data. Plans are plain data: unit tests assert on them without
// any I/O, and `--dry-run` prints them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/byte_reader.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/piece.hpp"

namespace ckpt {

struct PlannedRecord {
  std::string name;  // full zip name, "archive/data/3"
  std::uint64_t nbytes = 0;
  std::vector<std::byte> inline_bytes;  // used when `copies` is empty
  std::vector<Piece> copies;
  // inline_bytes hold one zstd frame of the record's nbytes bytes: the pickles of a
  // plan of hundreds of outputs (170 KB each at OPT-175B's shape, 15 KB compressed),
  // expanded when their file is written (expand_inline).
  bool inline_zstd = false;

  // Appends a plain copy at the end of the record, merging it with the previous
  // one when both source and destination continue it.
  void append_copy(std::uint32_t source, std::uint64_t source_offset, std::uint64_t nbytes);
  // Appends a plain copy (of any dtype) at the end of the record, with the same
  // merging; `op.offset` is ignored.
  void append_plain(Piece op);
  void append_zeros(std::uint64_t nbytes) { append_copy(Piece::kZeros, 0, nbytes); }
  // True when every copy is plain and they follow each other in order.
  bool sequential() const;
};

// How a file's records lie in it: as the records of a torch.save zip (headers
// around each, 64-byte aligned data), or back to back with nothing else
// (a safetensors file: its header is the first record; a JSON side file).
enum class Container : std::uint8_t { Zip, Concatenated };

struct PlannedFile {
  std::string path;
  std::vector<PlannedRecord> records;
  Container container = Container::Zip;
};

// Where each record's data lies in the file and the file's size: the zip
// layout, or for a concatenated file the records one after the other (each
// header_offset == data_offset, central_directory_offset == file_size).
ZipLayout layout_file(const PlannedFile& file);
// The largest element any copy of `record` converts to or generates: its data
// must start at a multiple of it in the file, so that the executor's cuts at
// aligned file offsets fall between elements (1 when every copy is plain).
std::uint64_t record_alignment(const PlannedRecord& record);

// Compresses `record`'s inline bytes (inline_zstd) when they are large enough to matter.
void compress_inline(PlannedRecord& record);
// A copy of `file` with every compressed inline record expanded, or nullopt
// when it has none. Throws InternalError for a frame that does not expand to
// the record's size.
std::optional<PlannedFile> expand_inline(const PlannedFile& file);

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
