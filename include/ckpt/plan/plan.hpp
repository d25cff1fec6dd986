// A plan: every output file, its zip records and where each byte of each record
// comes from, decided before any output exists.
//
// Commands never copy bytes themselves: they build a Plan and hand it to the one
// executor (exec.hpp). A record's data is either small inline bytes (the pickle,
// `version`) or copies from the inputs that tile the record exactly:
// Pieces (piece.hpp) whose sources are Plan::sources indices and whose
// destination is the record's data. Plans are plain data, inputs included
// (PlanSource): unit tests assert on them without any I/O, `--dry-run` prints
// them, and plan_file.hpp writes them down for another process to run.
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
  // merging; `piece.offset` is ignored.
  void append_plain(Piece piece);
  void append_zeros(std::uint64_t nbytes) { append_copy(Piece::kZeros, 0, nbytes); }
  // True when every copy is plain and they follow each other in order.
  bool sequential() const;
  bool operator==(const PlannedRecord&) const = default;
};

// How a file's records lie in it: as the records of a torch.save zip (headers
// around each, 64-byte aligned data), or back to back with nothing else
// (a safetensors file: its header is the first record; a JSON side file), or
// as several torch.save zips back to back, each a zip of its own from its
// first byte, which starts at a multiple of kTorchAlignment (a DCP data file,
// each zip an item).
enum class Container : std::uint8_t { Zip, Concatenated, Archives };

struct PlannedFile {
  std::string path;
  std::vector<PlannedRecord> records;
  Container container = Container::Zip;
  // Archives: the index in `records` of each archive's first record, the
  // first 0, ascending (an archive holds the records up to the next one's).
  std::vector<std::uint64_t> archives;
  // A file planned and put away (pack, plan_file.hpp): its archives and
  // records as a plan file encodes them, in one zstd frame, and `archives` and
  // `records` empty. A reshard output's records take about 130 KB of memory,
  // 2 KB packed: the 2,048 outputs of 992 shards resharded to 8 x 256 held
  // 265 MB of plan until the last was written, 4 MB packed.
  std::vector<std::byte> packed;
  std::uint64_t packed_file_size = 0;     // of the records packed: layout_file(...).file_size
  std::uint64_t packed_record_bytes = 0;  // and the sum of their nbytes
  bool is_packed() const { return !packed.empty(); }
  bool operator==(const PlannedFile&) const = default;
};

// Archives: each archive's first byte in the file, its records' first index,
// and its layout as a zip of its own (offsets relative to its first byte).
struct ArchiveLayout {
  std::uint64_t start = 0;
  std::size_t first_record = 0;
  ZipLayout zip;
};
std::vector<ArchiveLayout> archive_layouts(const PlannedFile& file);

// Where each record's data lies in the file and the file's size: the zip
// layout, or for a concatenated file the records one after the other (each
// header_offset == data_offset, central_directory_offset == file_size), or for
// archives their records at absolute offsets (central_directory_offset ==
// file_size: each archive's own is in archive_layouts).
ZipLayout layout_file(const PlannedFile& file);
// The size of the file: layout_file(file).file_size, for a packed file too.
std::uint64_t planned_file_size(const PlannedFile& file);
// `file` itself, or when it is packed a copy unpacked into `holder` (unpack:
// `origin` names where a packed file read as input came from).
const PlannedFile& unpacked(const PlannedFile& file, std::optional<PlannedFile>& holder,
                            const std::string& origin = "a packed plan");
// The largest element any copy of `record` converts to or generates: its data
// must start at a multiple of it in the file, so that the executor's cuts at
// aligned file offsets fall between elements (1 when every copy is plain).
std::uint64_t record_alignment(const PlannedRecord& record);

// Compresses `record`'s inline bytes (inline_zstd) when they are large enough to matter.
void compress_inline(PlannedRecord& record);
// An inline record made from bytes given in pieces: kept as they are while
// small, else compressed as they come (a zstd frame per MiB, inline_zstd), so
// that a large pickle is never held whole.
class InlineRecordWriter {
 public:
  explicit InlineRecordWriter(std::string name);
  void append(Bytes piece);
  PlannedRecord finish();

 private:
  static constexpr std::size_t kFrameBytes = 1 << 20;
  void compress_pending();
  PlannedRecord record_;
  std::vector<std::byte> pending_;  // not compressed yet
};
// A copy of `file` unpacked and with every compressed inline record
// expanded: what the executor writes; nullopt when `file` is that already.
// Throws InternalError for a frame that does not expand to the record's size.
std::optional<PlannedFile> expand_inline(const PlannedFile& file);

// A byte range of an input whose CRC-32 is known: a zip record's data.
struct CheckedRange {
  std::uint64_t offset = 0;
  std::uint64_t nbytes = 0;
  std::uint32_t crc32 = 0;
  std::uint64_t end() const { return offset + nbytes; }
  bool operator==(const CheckedRange&) const = default;
};

// An input of a plan, by value: the plan names its inputs and does not hold
// them open, so it can be written down and run by another process. The
// executor maps each one and refuses it when it is no longer the file planned
// from (size, mtime, ctime, inode: the device number differs between the nodes
// that mount one shared file system; the ctime moves with any write, even one
// whose mtime was set back, and with a chmod or a new link).
struct PlanSource {
  std::string path;
  std::uint64_t size_bytes = 0;
  std::int64_t mtime_ns = 0;
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
  // Where copies may read: the storage records, sorted and disjoint. A copy
  // reaching bytes outside them is refused (a manifest that does not describe
  // the file), and the bytes copied from each are checked against its CRC-32.
  std::vector<CheckedRange> records;
  bool has_crcs = true;  // false for a format without CRCs (safetensors): records only bound the copies
  std::int64_t ctime_ns = 0;
  bool operator==(const PlanSource&) const = default;
};

// The index in `source.records` of the record holding file byte `offset`, or
// nullopt when no record does.
std::optional<std::size_t> record_index(const PlanSource& source, std::uint64_t offset);

// `file`'s identity with `records` (sorted here; any order).
PlanSource plan_source(const MappedFile& file, std::vector<CheckedRange> records);

struct Plan {
  std::vector<PlanSource> sources;
  std::vector<PlannedFile> files;
  // Steps of the commit protocol around the files (exec.hpp): folders made
  // before the first output is written (removed again, while empty, when
  // nothing is committed), and files of another set (a safetensors export
  // written before into the same place) removed once every output is in place.
  std::vector<std::string> directories;
  std::vector<std::string> stale_files;
  // Other files the plan was made from (a manifest, the plan file itself):
  // never an output, like the sources.
  std::vector<std::string> read_only;

  // The index of `source`, added unless a source of that path is there
  // already, whose records then gain `source`'s.
  std::uint32_t add_source(PlanSource source);
  std::uint64_t bytes_to_copy() const;
  bool operator==(const Plan&) const = default;
};

// Checks the invariants the executor relies on: copies tile each record exactly
// (no gap, no overlap) and read inside one record of their source; sources'
// records are sorted, disjoint and inside the file. Throws InternalError: a
// plan built by the code is checked here.
void validate(const Plan& plan);
// The same for a plan read from a file (plan_file.hpp), untrusted: every check
// runs whatever its cost, and a failure is an Error naming `origin`.
void validate_untrusted(const Plan& plan, const std::string& origin);

}  // namespace ckpt
