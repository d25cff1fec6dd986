// The zip container of torch.save (PyTorch >= 1.6): read without touching record
// data, and laid out for writing before any byte of data exists.
//
// Only what torch needs is supported: STORED records (method 0), no encryption,
// one disk. ZIP64 is read wherever a field says 0xFFFFFFFF and written wherever a
// size or offset needs it. Byte layout (all integers little-endian):
//
//   local file header   sig 0x04034b50 | version u16 | flags u16 | method u16 |
//   (30 bytes + name    time u16 | date u16 | crc32 u32 | csize u32 | usize u32 |
//    + extra)           name_len u16 | extra_len u16 | name | extra
//   record data         at a multiple of 64 in torch files: the writer pads the
//                       extra field with a 'FB' block of 'Z' bytes to get there
//   data descriptor     optional (flag 0x08): [sig 0x08074b50] crc32 | csize | usize
//                       (4 or 8 bytes each); torch 1.13 writes one after every record
//   central directory   sig 0x02014b50 | made_by u16 | version u16 | flags u16 |
//   entry (46 bytes +   method u16 | time u16 | date u16 | crc32 u32 | csize u32 |
//    name+extra+comment) usize u32 | name_len u16 | extra_len u16 | comment_len u16 |
//                       disk u16 | int_attr u16 | ext_attr u32 | header_offset u32
//   ZIP64 extra (0x0001) in an extra field: usize, csize, header_offset, disk, each
//                       present only when its 32-bit field is 0xFFFFFFFF (0xFFFF)
//   ZIP64 end record    sig 0x06064b50 | size u64 | made_by u16 | version u16 |
//                       disk u32 | cd_disk u32 | entries_here u64 | entries u64 |
//                       cd_size u64 | cd_offset u64
//   ZIP64 locator       sig 0x07064b50 | disk u32 | zip64_end_offset u64 | disks u32
//   end record          sig 0x06054b50 | disk u16 | cd_disk u16 | entries_here u16 |
//                       entries u16 | cd_size u32 | cd_offset u32 | comment_len u16
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "ckpt/io/byte_reader.hpp"
#include "ckpt/io/mapped_file.hpp"

namespace ckpt {

struct ZipRecord {
  std::string name;
  std::uint64_t header_offset = 0;  // local file header
  std::uint64_t data_offset = 0;    // first byte of the record's data
  std::uint64_t nbytes = 0;         // uncompressed == compressed (STORED)
  std::uint32_t crc32 = 0;          // from the central directory
};

class ZipArchive {
 public:
  // Copies `nbytes` bytes at `byte_offset` of the file into `out`.
  using ReadAt = std::function<void(std::uint64_t byte_offset, std::byte* out, std::uint64_t nbytes)>;

  // Parses the central directory and every local header of `file_bytes`. Throws an
  // Error naming `path`, the record and the byte offset of anything malformed:
  // a record's data must lie inside the file, before the central directory.
  // With `read_local_headers`, the local headers (scattered over the file, read
  // in batches of nearby ones) are read through it instead of `file_bytes`: for
  // a mapped file, touching them would map a page-cache folio of up to 2 MiB per
  // record into the resident set.
  ZipArchive(Bytes file_bytes, std::string path, const ReadAt& read_local_headers = {});
  // A mapped input file, its local headers read with pread (as above).
  explicit ZipArchive(const MappedFile& file);
  // The index holds views of the records' names: a copy indexes its own.
  ZipArchive(const ZipArchive& other);
  ZipArchive& operator=(const ZipArchive& other);
  ZipArchive(ZipArchive&&) noexcept = default;
  ZipArchive& operator=(ZipArchive&&) noexcept = default;
  ~ZipArchive() = default;

  const std::vector<ZipRecord>& records() const { return records_; }
  const ZipRecord* find(std::string_view name) const;
  const std::string& path() const { return path_; }
  Bytes data(const ZipRecord& record) const { return file_bytes_.subspan(record.data_offset, record.nbytes); }

 private:
  void read_central_directory(const ReadAt& read_local_headers);
  // Reads every record's local header; the records' indices in file order.
  std::vector<std::size_t> read_local_headers_of_records(const ReadAt& read_at);
  void read_local_header(ZipRecord& record, Bytes window, std::uint64_t window_offset) const;
  // Indexes records_ by name; the first name met twice, if any.
  const ZipRecord* build_index();

  Bytes file_bytes_;
  std::string path_;
  std::vector<ZipRecord> records_;
  std::unordered_map<std::string_view, std::size_t> index_;  // views of records_' names, made once they are all read
};

// Writing: the layout is computed first from names and sizes alone, so the output
// file can be created at its final size and data copied in parallel; headers are
// rendered last, once the CRCs are known.
struct ZipEntrySpec {
  std::string name;
  std::uint64_t nbytes = 0;
};

struct ZipLayout {
  std::vector<ZipRecord> records;  // crc32 left 0: filled by the caller
  std::uint64_t central_directory_offset = 0;
  std::uint64_t file_size = 0;
};

inline constexpr std::uint64_t kTorchAlignment = 64;

ZipLayout layout_zip(std::span<const ZipEntrySpec> entries, std::uint64_t alignment = kTorchAlignment);

// The bytes from `record.header_offset` up to `record.data_offset`.
std::vector<std::byte> render_local_header(const ZipRecord& record);
// Everything from `layout.central_directory_offset` to the end of the file;
// `layout.records[i].crc32` must be filled.
std::vector<std::byte> render_central_directory(const ZipLayout& layout);

}  // namespace ckpt
