// Zip reading and layout. See include/ckpt/format/zip.hpp for the byte layout.
//
// Hand-written rather than libzip/minizip: those open records as streams and
// cannot tell where a record's data lies in the file, which is the one thing
// ckpt-tool needs (a tensor is a byte range of the mapped file).
#include "ckpt/format/zip.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>

#include "ckpt/io/byte_writer.hpp"

namespace ckpt {

namespace {

constexpr std::uint32_t kLocalHeaderSig = 0x04034b50;
constexpr std::uint32_t kCentralSig = 0x02014b50;
constexpr std::uint32_t kEndSig = 0x06054b50;
constexpr std::uint32_t kZip64EndSig = 0x06064b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint16_t kZip64ExtraId = 0x0001;
constexpr std::uint16_t kTorchPadExtraId = 0x4246;  // "FB"
constexpr std::uint32_t k32 = 0xFFFFFFFF;
constexpr std::uint16_t k16 = 0xFFFF;
constexpr std::size_t kEndSize = 22;
constexpr std::size_t kLocatorSize = 20;
constexpr std::size_t kZip64EndSize = 56;
constexpr std::size_t kCentralSize = 46;
constexpr std::size_t kLocalSize = 30;
constexpr std::uint16_t kFlagEncrypted = 0x0001;
constexpr std::uint16_t kFlagUtf8 = 0x0800;

// The legacy (pre-1.6) torch.save format is a bare pickle stream starting with
// PROTO 2 and LONG1 of the magic number 0x1950a86a20f9469cfc6c.
bool looks_like_legacy_torch(Bytes bytes) {
  static constexpr unsigned char kMagic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8};
  return bytes.size() >= sizeof(kMagic) && std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) == 0;
}

}  // namespace

ZipArchive::ZipArchive(Bytes file_bytes, std::string path, const ReadAt& read_local_headers)
    : file_bytes_(file_bytes), path_(std::move(path)) {
  if (looks_like_legacy_torch(file_bytes_)) {
    throw Error(Location{path_, "", 0},
                "legacy torch.save format (PyTorch < 1.6) is not supported; load it and save it again with "
                "a newer torch");
  }
  read_central_directory(read_local_headers);
}

ZipArchive::ZipArchive(const MappedFile& file)
    : ZipArchive(file.bytes(), file.path(), [&file](std::uint64_t offset, std::byte* out, std::uint64_t nbytes) {
        file.read_at(offset, out, nbytes);
      }) {}

ZipArchive::ZipArchive(const ZipArchive& other)
    : file_bytes_(other.file_bytes_), path_(other.path_), records_(other.records_) {
  build_index();
}

ZipArchive& ZipArchive::operator=(const ZipArchive& other) {
  if (this != &other) {
    file_bytes_ = other.file_bytes_;
    path_ = other.path_;
    records_ = other.records_;
    build_index();
  }
  return *this;
}

const ZipRecord* ZipArchive::build_index() {
  index_.clear();
  index_.reserve(records_.size());
  const ZipRecord* duplicate = nullptr;
  for (std::size_t i = 0; i < records_.size(); ++i) {
    if (!index_.emplace(records_[i].name, i).second && duplicate == nullptr) duplicate = &records_[i];
  }
  return duplicate;
}

const ZipRecord* ZipArchive::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &records_[it->second];
}

namespace {

// Where the central directory lies and how many entries it holds: the end
// record's figures, or the ZIP64 end record's when there is one.
struct DirectoryEnd {
  std::size_t end_offset = 0;  // of the end of central directory record
  std::uint64_t entries_here = 0;
  std::uint64_t entries = 0;
  std::uint64_t cd_size = 0;
  std::uint64_t cd_offset = 0;
};

// The end of central directory record, found by searching backwards from the
// end of the file.
DirectoryEnd read_end_record(Bytes file_bytes, ByteReader& file) {
  if (file_bytes.size() < kEndSize) file.fail(0, "not a zip archive (torch.save file): too short");
  // The end record sits at the very end unless the archive has a comment (up to
  // 64 KiB); search backwards for its signature.
  std::size_t lowest = file_bytes.size() >= kEndSize + 0xFFFF ? file_bytes.size() - kEndSize - 0xFFFF : 0;
  std::size_t end_offset = file_bytes.size() - kEndSize;
  for (;; --end_offset) {
    file.seek(end_offset);
    if (file.u32() == kEndSig) {
      file.skip(16);
      if (end_offset + kEndSize + file.u16() == file_bytes.size()) break;
    }
    if (end_offset == lowest) {
      bool zip_start = file_bytes.size() >= 4 && std::memcmp(file_bytes.data(), "PK\x03\x04", 4) == 0;
      file.fail(file_bytes.size(), zip_start ? "zip archive has no end of central directory at its end: a "
                                               "truncated file, or bytes appended after the archive?"
                                             : "not a zip archive (torch.save file)");
    }
  }
  DirectoryEnd end;
  end.end_offset = end_offset;
  file.seek(end_offset + 4);
  std::uint16_t disk = file.u16();
  std::uint16_t cd_disk = file.u16();
  end.entries_here = file.u16();
  end.entries = file.u16();
  end.cd_size = file.u32();
  end.cd_offset = file.u32();
  if (disk != 0 || cd_disk != 0) file.fail(end_offset, "multi-disk zip archives are not supported");
  return end;
}

// A ZIP64 locator directly before the end record points at the ZIP64 end
// record, which gives the real counts, size and offset.
void read_zip64_end(ByteReader& file, DirectoryEnd& end) {
  const std::size_t end_offset = end.end_offset;
  if (end_offset < kLocatorSize) return;
  file.seek(end_offset - kLocatorSize);
  if (file.u32() != kZip64LocatorSig) return;
  file.skip(4);
  std::uint64_t zip64_end = file.u64();
  if (zip64_end > end_offset - kLocatorSize || end_offset - kLocatorSize - zip64_end < kZip64EndSize) {
    file.fail(end_offset - kLocatorSize, "ZIP64 locator points outside the archive");
  }
  file.seek(zip64_end);
  if (file.u32() != kZip64EndSig) file.fail(zip64_end, "bad ZIP64 end of central directory signature");
  file.skip(8 + 2 + 2 + 4 + 4);
  end.entries_here = file.u64();
  end.entries = file.u64();
  end.cd_size = file.u64();
  end.cd_offset = file.u64();
}

// The central directory must lie inside the file and have room for its entries.
void check_directory_extent(const ByteReader& file, const DirectoryEnd& end, std::uint64_t file_size) {
  if (end.entries_here != end.entries) file.fail(end.end_offset, "multi-disk zip archives are not supported");
  if (end.cd_offset > file_size || end.cd_size > file_size - end.cd_offset) {
    file.fail(end.end_offset, fmt::format("central directory (offset {}, {} bytes) lies outside the file of {} bytes",
                                          end.cd_offset, end.cd_size, file_size));
  }
  if (end.entries > end.cd_size / kCentralSize) {
    file.fail(end.end_offset,
              fmt::format("{} entries cannot fit a central directory of {} bytes", end.entries, end.cd_size));
  }
}

// The fields of a central directory entry that matter here, with the ZIP64
// extra field's values in place of the 0xFFFF(FFFF) markers.
struct CentralEntry {
  std::size_t entry_start = 0;  // position in the central directory
  ZipRecord record;             // name, crc32 and header_offset so far
  std::uint16_t flags = 0;
  std::uint16_t method = 0;
  std::uint64_t compressed = 0;
  std::uint64_t uncompressed = 0;
  std::uint64_t disk = 0;
};

// The ZIP64 extra field holds, in this order, each field marked 0xFFFF(FFFF).
void apply_zip64_extra(ByteReader& extra, const std::string& path, CentralEntry& entry) {
  while (extra.remaining() >= 4) {
    std::uint16_t id = extra.u16();
    std::uint16_t size = extra.u16();
    ByteReader field(extra.take(size), path, entry.record.name, extra.absolute_offset() - size);
    if (id != kZip64ExtraId) continue;
    if (entry.uncompressed == k32) entry.uncompressed = field.u64();
    if (entry.compressed == k32) entry.compressed = field.u64();
    if (entry.record.header_offset == k32) entry.record.header_offset = field.u64();
    if (entry.disk == k16) entry.disk = field.u32();
  }
}

// Parses the central directory entry at `cd`'s position, leaving `cd` after it.
CentralEntry parse_central_entry(ByteReader& cd, const std::string& path) {
  CentralEntry entry;
  entry.entry_start = cd.position();
  if (cd.u32() != kCentralSig) cd.fail(entry.entry_start, "bad central directory entry signature");
  cd.skip(2 + 2);
  entry.flags = cd.u16();
  entry.method = cd.u16();
  cd.skip(2 + 2);
  entry.record.crc32 = cd.u32();
  entry.compressed = cd.u32();
  entry.uncompressed = cd.u32();
  std::uint16_t name_len = cd.u16();
  std::uint16_t extra_len = cd.u16();
  std::uint16_t comment_len = cd.u16();
  entry.disk = cd.u16();
  cd.skip(2 + 4);
  entry.record.header_offset = cd.u32();
  entry.record.name = std::string(cd.text(name_len));
  ByteReader extra(cd.take(extra_len), path, entry.record.name, cd.absolute_offset() - extra_len);
  cd.skip(comment_len);
  apply_zip64_extra(extra, path, entry);
  return entry;
}

// The entry's record, once it is known to be one stored (uncompressed,
// unencrypted) record on this disk: a byte range of the file.
ZipRecord stored_record(const ByteReader& cd, CentralEntry entry) {
  const std::string& name = entry.record.name;
  if (entry.disk != 0) cd.fail(entry.entry_start, "record on another disk: multi-disk archives are not supported");
  if (entry.flags & kFlagEncrypted) cd.fail(entry.entry_start, "record '" + name + "' is encrypted");
  if (entry.method != 0) {
    // torch.jit.save compresses its code/ records: name the file for what it is.
    bool torchscript = name.find("/code/") != std::string::npos;
    cd.fail(entry.entry_start, torchscript ? fmt::format("a TorchScript archive (torch.jit.save: record '{}'), not a "
                                                         "torch.save checkpoint; ckpt-tool reads torch.save files",
                                                         name)
                                           : fmt::format("record '{}' is compressed (method {}); torch.save stores "
                                                         "records uncompressed",
                                                         name, entry.method));
  }
  if (entry.compressed != entry.uncompressed)
    cd.fail(entry.entry_start, "record '" + name + "': stored sizes disagree");
  entry.record.nbytes = entry.uncompressed;
  return std::move(entry.record);
}

}  // namespace

void ZipArchive::read_central_directory(const ReadAt& read_local_headers) {
  ByteReader file(file_bytes_, path_, "zip directory");
  DirectoryEnd end = read_end_record(file_bytes_, file);
  read_zip64_end(file, end);
  check_directory_extent(file, end, file_bytes_.size());

  ByteReader cd(file_bytes_.subspan(end.cd_offset, end.cd_size), path_, "zip directory", end.cd_offset);
  std::vector<std::size_t> entry_starts;                 // to name a bad entry
  const std::uint64_t fit = end.cd_size / kCentralSize;  // `entries` is untrusted; this many fit the directory
  records_.reserve(std::min(end.entries, fit));
  entry_starts.reserve(std::min(end.entries, fit));
  for (std::uint64_t i = 0; i < end.entries; ++i) {
    entry_starts.push_back(cd.position());
    records_.push_back(stored_record(cd, parse_central_entry(cd, path_)));
  }
  // A directory that holds more entries than the end record counts would
  // hide the rest (torch's reader refuses it too).
  if (!cd.at_end() && cd.remaining() >= 4 && cd.u32() == kCentralSig) {
    cd.fail(cd.position() - 4,
            fmt::format("the central directory holds more entries than the {} its end record counts", end.entries));
  }
  const std::vector<std::size_t> order = read_local_headers_of_records(read_local_headers);
  for (std::size_t i = 0; i < records_.size(); ++i) {
    const ZipRecord& record = records_[i];
    if (record.data_offset + record.nbytes > end.cd_offset) {
      cd.fail(entry_starts[i], fmt::format("record '{}' ({} bytes at offset {}) overlaps the central directory",
                                           record.name, record.nbytes, record.data_offset));
    }
  }
  // Records in file order: each one's header and data end before the next one's
  // header begins (a crafted directory could make two records share bytes).
  for (std::size_t k = 1; k < order.size(); ++k) {
    const ZipRecord& before = records_[order[k - 1]];
    const ZipRecord& after = records_[order[k]];
    if (before.data_offset + before.nbytes > after.header_offset) {
      cd.fail(entry_starts[order[k]],
              fmt::format("record '{}' (its header at offset {}) overlaps record '{}' (bytes {} to {})", after.name,
                          after.header_offset, before.name, before.header_offset, before.data_offset + before.nbytes));
    }
  }
  if (const ZipRecord* duplicate = build_index()) {
    cd.fail(entry_starts[static_cast<std::size_t>(duplicate - records_.data())],
            "duplicate record name '" + duplicate->name + "'");
  }
}

std::vector<std::size_t> ZipArchive::read_local_headers_of_records(const ReadAt& read_at) {
  // Taken in file order, the headers within kHeaderBatch bytes of each other
  // are read at once: one read for the headers of many small records, while
  // the data of a large record between two headers is not read.
  constexpr std::uint64_t kHeaderBatch = 64 << 10;
  const std::uint64_t size = file_bytes_.size();
  auto header_end = [&](const ZipRecord& record) {  // as far as the header and the name it should hold reach
    return std::min(size, std::min(record.header_offset, size) + kLocalSize + record.name.size());
  };
  std::vector<std::size_t> order(records_.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return records_[a].header_offset < records_[b].header_offset; });
  std::vector<std::byte> window;
  for (std::size_t i = 0; i < order.size();) {
    const std::uint64_t begin = std::min(records_[order[i]].header_offset, size);
    std::uint64_t end = header_end(records_[order[i]]);
    std::size_t j = i + 1;
    for (; j < order.size() && header_end(records_[order[j]]) - begin <= kHeaderBatch; ++j)
      end = std::max(end, header_end(records_[order[j]]));
    Bytes bytes = file_bytes_.subspan(begin, end - begin);
    if (read_at && !bytes.empty()) {
      window.resize(bytes.size());
      read_at(begin, window.data(), window.size());
      bytes = window;
    }
    for (; i < j; ++i) read_local_header(records_[order[i]], bytes, begin);
  }
  return order;
}

void ZipArchive::read_local_header(ZipRecord& record, Bytes window, std::uint64_t window_offset) const {
  // `file` gives positions and bounds; the header's bytes are `window`'s, a copy
  // of the file from `window_offset` that holds the header and the name.
  ByteReader file(file_bytes_, path_, record.name);
  if (record.header_offset > file_bytes_.size()) {
    file.fail(file_bytes_.size(),
              fmt::format("local header offset {} lies past the end of the file", record.header_offset));
  }
  file.seek(record.header_offset);
  if (file.remaining() < kLocalSize) file.fail_here("truncated local header");
  ByteReader header(window.subspan(record.header_offset - window_offset), path_, record.name, record.header_offset);
  if (header.u32() != kLocalHeaderSig) header.fail(0, "local header: bad signature");
  header.skip(2 + 2 + 2 + 2 + 2 + 4 + 4 + 4);
  std::uint16_t name_len = header.u16();
  std::uint16_t extra_len = header.u16();
  if (name_len != record.name.size() || header.text(name_len) != record.name) {
    file.fail(record.header_offset, "local header names another record than the central directory");
  }
  file.skip(kLocalSize);
  file.skip(name_len);
  file.skip(extra_len);
  record.data_offset = file.absolute_offset();
  if (record.nbytes > file.remaining()) {
    file.fail(record.data_offset, fmt::format("record data of {} bytes runs past the end of the file ({} left): "
                                              "truncated file?",
                                              record.nbytes, file.remaining()));
  }
}

// ---------------------------------------------------------------- writing

namespace {

bool needs_zip64_sizes(std::uint64_t nbytes) {
  return nbytes >= k32;
}

std::uint64_t local_header_size(const std::string& name, std::uint64_t nbytes, std::uint64_t header_offset,
                                std::uint64_t alignment) {
  std::uint64_t fixed = kLocalSize + name.size() + (needs_zip64_sizes(nbytes) ? 20 : 0) + 4;  // +4: 'FB' block header
  std::uint64_t pad = (alignment - (header_offset + fixed) % alignment) % alignment;
  return fixed + pad;
}

}  // namespace

ZipLayout layout_zip(std::span<const ZipEntrySpec> entries, std::uint64_t alignment) {
  ZipLayout layout;
  std::uint64_t offset = 0;
  for (const ZipEntrySpec& entry : entries) {
    if (entry.name.size() > 0xFFFF) throw Error("zip record name longer than 65535 bytes: " + entry.name);
    ZipRecord record;
    record.name = entry.name;
    record.nbytes = entry.nbytes;
    record.header_offset = offset;
    record.data_offset =
        checked_add(offset, local_header_size(entry.name, entry.nbytes, offset, alignment), "zip layout");
    offset = checked_add(record.data_offset, entry.nbytes, "zip layout");
    layout.records.push_back(std::move(record));
  }
  layout.central_directory_offset = offset;
  std::uint64_t cd_size = 0;
  for (const ZipRecord& record : layout.records) {
    bool zip64 = needs_zip64_sizes(record.nbytes) || record.header_offset >= k32;
    cd_size += kCentralSize + record.name.size() + (zip64 ? 28 : 0);
  }
  layout.file_size = offset + cd_size + kZip64EndSize + kLocatorSize + kEndSize;
  return layout;
}

std::vector<std::byte> render_local_header(const ZipRecord& record) {
  ByteWriter w;
  bool zip64 = needs_zip64_sizes(record.nbytes);
  w.u32(kLocalHeaderSig);
  w.u16(zip64 ? 45 : 20);
  w.u16(kFlagUtf8);
  w.u16(0);  // STORED
  w.u16(0);  // time and date zero, as torch writes them: output is reproducible
  w.u16(0);
  w.u32(record.crc32);
  w.u32(zip64 ? k32 : record.nbytes);
  w.u32(zip64 ? k32 : record.nbytes);
  w.u16(record.name.size());
  std::uint64_t extra_len = record.data_offset - record.header_offset - kLocalSize - record.name.size();
  w.u16(extra_len);
  w.text(record.name);
  if (zip64) {
    w.u16(kZip64ExtraId);
    w.u16(16);
    w.u64(record.nbytes);
    w.u64(record.nbytes);
    extra_len -= 20;
  }
  w.u16(kTorchPadExtraId);
  w.u16(extra_len - 4);
  for (std::uint64_t i = 4; i < extra_len; ++i) w.u8('Z');
  return w.take();
}

std::vector<std::byte> render_central_directory(const ZipLayout& layout) {
  ByteWriter w;
  for (const ZipRecord& record : layout.records) {
    bool big_size = needs_zip64_sizes(record.nbytes);
    bool big_offset = record.header_offset >= k32;
    bool zip64 = big_size || big_offset;
    w.u32(kCentralSig);
    w.u16(zip64 ? 45 : 20);  // made by: MS-DOS attributes, spec version
    w.u16(zip64 ? 45 : 20);
    w.u16(kFlagUtf8);
    w.u16(0);
    w.u16(0);
    w.u16(0);
    w.u32(record.crc32);
    w.u32(zip64 ? k32 : record.nbytes);
    w.u32(zip64 ? k32 : record.nbytes);
    w.u16(record.name.size());
    w.u16(zip64 ? 28 : 0);
    w.u16(0);  // comment
    w.u16(0);  // disk
    w.u16(0);  // internal attributes
    w.u32(0);  // external attributes
    w.u32(zip64 ? k32 : record.header_offset);
    w.text(record.name);
    if (zip64) {  // all three fields, matching the 0xFFFFFFFF markers above
      w.u16(kZip64ExtraId);
      w.u16(24);
      w.u64(record.nbytes);
      w.u64(record.nbytes);
      w.u64(record.header_offset);
    }
  }
  std::uint64_t cd_size = w.size();
  std::uint64_t zip64_end_offset = layout.central_directory_offset + cd_size;
  std::uint64_t entries = layout.records.size();
  w.u32(kZip64EndSig);
  w.u64(kZip64EndSize - 12);
  w.u16(45);
  w.u16(45);
  w.u32(0);
  w.u32(0);
  w.u64(entries);
  w.u64(entries);
  w.u64(cd_size);
  w.u64(layout.central_directory_offset);
  w.u32(kZip64LocatorSig);
  w.u32(0);
  w.u64(zip64_end_offset);
  w.u32(1);
  w.u32(kEndSig);
  w.u16(0);
  w.u16(0);
  w.u16(std::min<std::uint64_t>(entries, k16));
  w.u16(std::min<std::uint64_t>(entries, k16));
  w.u32(std::min<std::uint64_t>(cd_size, k32));
  w.u32(std::min<std::uint64_t>(layout.central_directory_offset, k32));
  w.u16(0);
  return w.take();
}

}  // namespace ckpt
