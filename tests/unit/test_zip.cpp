// Unit tests for the zip container (src/format/zip.cpp) and CRC-32 (src/io/crc32.cpp).
//
// Archives are written into memory with the library's own layout and header
// renderers, checked byte by byte at the offsets the layout promises, parsed back
// with ZipArchive, and then corrupted one field at a time: one case per failure
// kind, each asserting the message and, where the reader knows it, the byte
// offset of the broken structure.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/format/zip.hpp"
#include "ckpt/io/byte_writer.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/error.hpp"
#include "error_kind.hpp"

namespace {

using ckpt::Bytes;
using ckpt::ZipArchive;
using ckpt::ZipEntrySpec;
using ckpt::ZipLayout;
using ckpt::ZipRecord;
using Buffer = std::vector<std::byte>;

constexpr std::uint32_t kLocalSig = 0x04034b50;
constexpr std::uint32_t kCentralSig = 0x02014b50;
constexpr std::uint32_t kEndSig = 0x06054b50;
constexpr std::uint32_t kZip64EndSig = 0x06064b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint32_t k32 = 0xFFFFFFFF;

std::uint64_t get_le(const Buffer& b, std::uint64_t offset, int nbytes) {
  REQUIRE(offset + static_cast<std::uint64_t>(nbytes) <= b.size());
  std::uint64_t value = 0;
  for (int i = nbytes; i-- > 0;) value = (value << 8) | static_cast<std::uint8_t>(b[offset + i]);
  return value;
}
std::uint16_t u16(const Buffer& b, std::uint64_t offset) {
  return static_cast<std::uint16_t>(get_le(b, offset, 2));
}
std::uint32_t u32(const Buffer& b, std::uint64_t offset) {
  return static_cast<std::uint32_t>(get_le(b, offset, 4));
}
std::uint64_t u64(const Buffer& b, std::uint64_t offset) {
  return get_le(b, offset, 8);
}

void put_le(Buffer& b, std::uint64_t offset, std::uint64_t value, int nbytes) {
  REQUIRE(offset + static_cast<std::uint64_t>(nbytes) <= b.size());
  for (int i = 0; i < nbytes; ++i) b[offset + i] = static_cast<std::byte>((value >> (8 * i)) & 0xFF);
}

std::string text_at(const Buffer& b, std::uint64_t offset, std::size_t length) {
  REQUIRE(offset + length <= b.size());
  return std::string(reinterpret_cast<const char*>(b.data() + offset), length);
}

// Deterministic payload for record `index` of `nbytes` bytes.
Buffer payload(std::size_t index, std::uint64_t nbytes) {
  Buffer data(nbytes);
  for (std::uint64_t i = 0; i < nbytes; ++i) data[i] = static_cast<std::byte>((i * 31 + index * 7 + 1) & 0xFF);
  return data;
}

struct Built {
  ZipLayout layout;
  Buffer file;
  std::vector<Buffer> data;  // payload of each record
};

// The whole write path in memory: layout, data, CRCs, local headers, directory.
Built build_archive(const std::vector<ZipEntrySpec>& specs, std::uint64_t alignment = ckpt::kTorchAlignment) {
  Built built;
  built.layout = ckpt::layout_zip(specs, alignment);
  built.file.assign(built.layout.file_size, std::byte{0xEE});  // poison: every byte must be written
  for (std::size_t i = 0; i < specs.size(); ++i) {
    ZipRecord& record = built.layout.records[i];
    Buffer data = payload(i, specs[i].nbytes);
    record.crc32 = ckpt::crc32(data);
    std::copy(data.begin(), data.end(), built.file.begin() + static_cast<std::ptrdiff_t>(record.data_offset));
    Buffer header = ckpt::render_local_header(record);
    REQUIRE(header.size() == record.data_offset - record.header_offset);
    std::copy(header.begin(), header.end(), built.file.begin() + static_cast<std::ptrdiff_t>(record.header_offset));
    built.data.push_back(std::move(data));
  }
  Buffer directory = ckpt::render_central_directory(built.layout);
  REQUIRE(built.layout.central_directory_offset + directory.size() == built.layout.file_size);
  std::copy(directory.begin(), directory.end(),
            built.file.begin() + static_cast<std::ptrdiff_t>(built.layout.central_directory_offset));
  return built;
}

// Bitwise reference CRC-32 (reflected, polynomial 0xEDB88320), as in the zip spec.
std::uint32_t reference_crc32(Bytes bytes) {
  std::uint32_t crc = 0xFFFFFFFF;
  for (std::byte byte : bytes) {
    crc ^= static_cast<std::uint8_t>(byte);
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

Bytes view(const Buffer& b) {
  return Bytes(b.data(), b.size());
}

// How Error::what() renders a byte offset.
std::string fmt_hex(std::uint64_t offset) {
  char text[40];
  std::snprintf(text, sizeof text, "at byte 0x%llx: ", static_cast<unsigned long long>(offset));
  return text;
}

// Offsets of the directory structures of an archive written by build_archive.
struct DirectoryOffsets {
  std::uint64_t end;        // end of central directory record
  std::uint64_t locator;    // ZIP64 locator
  std::uint64_t zip64_end;  // ZIP64 end record
  std::uint64_t cd;         // first central directory entry
};
DirectoryOffsets directory_offsets(const Built& built) {
  DirectoryOffsets d{};
  d.end = built.file.size() - 22;
  d.locator = d.end - 20;
  d.zip64_end = d.locator - 56;
  d.cd = built.layout.central_directory_offset;
  return d;
}
// Offset of central directory entry `index` (entries without ZIP64 extras).
std::uint64_t cd_entry(const Built& built, std::size_t index) {
  std::uint64_t offset = built.layout.central_directory_offset;
  for (std::size_t i = 0; i < index; ++i) {
    offset += 46 + u16(built.file, offset + 28) + u16(built.file, offset + 30) + u16(built.file, offset + 32);
  }
  return offset;
}

const std::vector<ZipEntrySpec> kSpecs = {
    {"archive/data.pkl", 1000}, {"archive/byteorder", 6},    {"archive/data/0", 0},  {"archive/data/1", 1}, {"a", 63},
    {"archive/data/123", 64},   {std::string(200, 'n'), 65}, {"archive/version", 2},
};

}  // namespace

TEST_CASE("printable: control characters and bytes that are not UTF-8 are escaped, UTF-8 text is kept") {
  using ckpt::printable;
  CHECK(printable("plain/name.pt") == "plain/name.pt");
  CHECK(printable("a\nb\x1b[31m") == "a\\nb\\x1b[31m");
  CHECK(printable("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") == "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  CHECK(printable("bad\xff\xfe/x") == "bad\\xff\\xfe/x");
  CHECK(printable("cut \xe2\x82") == "cut \\xe2\\x82");   // a truncated sequence
  CHECK(printable("\xc0\xaf") == "\\xc0\\xaf");           // an overlong '/'
  CHECK(printable("\xed\xa0\x80") == "\\xed\\xa0\\x80");  // a surrogate
  CHECK(printable("\xc2\x85") == "\\u0085");              // a C1 control
  CHECK(printable("\xc2") == "\\xc2");
}

TEST_SUITE("zip") {
  TEST_CASE("layout_zip aligns every record's data to 64 bytes and packs records back to back") {
    Built built = build_archive(kSpecs);
    const ZipLayout& layout = built.layout;
    REQUIRE(layout.records.size() == kSpecs.size());
    std::uint64_t expected_header = 0;
    for (std::size_t i = 0; i < kSpecs.size(); ++i) {
      const ZipRecord& record = layout.records[i];
      CAPTURE(i);
      CHECK(record.name == kSpecs[i].name);
      CHECK(record.nbytes == kSpecs[i].nbytes);
      CHECK(record.header_offset == expected_header);
      CHECK(record.data_offset % 64 == 0);
      // The shortest header that reaches alignment: 30 + name + 4 ('FB' block) + pad < 64.
      std::uint64_t header_bytes = record.data_offset - record.header_offset;
      CHECK(header_bytes >= 30 + record.name.size() + 4);
      CHECK(header_bytes < 30 + record.name.size() + 4 + 64);
      expected_header = record.data_offset + record.nbytes;
    }
    CHECK(layout.central_directory_offset == expected_header);
    // Directory: 46 + name per entry (no ZIP64 extras), ZIP64 end (56) + locator (20) + end (22).
    std::uint64_t cd_bytes = 0;
    for (const auto& spec : kSpecs) cd_bytes += 46 + spec.name.size();
    CHECK(layout.file_size == layout.central_directory_offset + cd_bytes + 56 + 20 + 22);
  }

  TEST_CASE("layout_zip honours another alignment") {
    std::vector<ZipEntrySpec> specs = {{"x", 3}, {"yy", 5}, {"zzz", 0}};
    ZipLayout layout = ckpt::layout_zip(specs, 4096);
    for (const ZipRecord& record : layout.records) CHECK(record.data_offset % 4096 == 0);
  }

  TEST_CASE("local headers hold signature, sizes, crc32, name and a 'FB' extra padded with 'Z'") {
    Built built = build_archive(kSpecs);
    const Buffer& f = built.file;
    for (std::size_t i = 0; i < kSpecs.size(); ++i) {
      const ZipRecord& r = built.layout.records[i];
      CAPTURE(i);
      std::uint64_t h = r.header_offset;
      CHECK(u32(f, h) == kLocalSig);
      CHECK(u16(f, h + 4) == 20);      // version needed: 2.0, no ZIP64
      CHECK(u16(f, h + 6) == 0x0800);  // UTF-8 names
      CHECK(u16(f, h + 8) == 0);       // STORED
      CHECK(u16(f, h + 10) == 0);      // time
      CHECK(u16(f, h + 12) == 0);      // date
      CHECK(u32(f, h + 14) == r.crc32);
      CHECK(u32(f, h + 14) == reference_crc32(view(built.data[i])));
      CHECK(u32(f, h + 18) == r.nbytes);  // compressed
      CHECK(u32(f, h + 22) == r.nbytes);  // uncompressed
      std::uint16_t name_len = u16(f, h + 26);
      std::uint16_t extra_len = u16(f, h + 28);
      CHECK(name_len == r.name.size());
      CHECK(h + 30 + name_len + extra_len == r.data_offset);
      CHECK(text_at(f, h + 30, name_len) == r.name);
      std::uint64_t extra = h + 30 + name_len;
      CHECK(text_at(f, extra, 2) == "FB");  // id 0x4246, little-endian
      CHECK(u16(f, extra + 2) == extra_len - 4);
      CHECK(text_at(f, extra + 4, extra_len - 4) == std::string(extra_len - 4, 'Z'));
      // The record data follows at data_offset.
      CHECK(text_at(f, r.data_offset, r.nbytes) ==
            std::string(reinterpret_cast<const char*>(built.data[i].data()), built.data[i].size()));
    }
  }

  TEST_CASE("central directory and end records: raw bytes") {
    Built built = build_archive(kSpecs);
    const Buffer& f = built.file;
    DirectoryOffsets d = directory_offsets(built);
    std::uint64_t entry = d.cd;
    for (std::size_t i = 0; i < kSpecs.size(); ++i) {
      const ZipRecord& r = built.layout.records[i];
      CAPTURE(i);
      CHECK(u32(f, entry) == kCentralSig);
      CHECK(u16(f, entry + 6) == 20);
      CHECK(u16(f, entry + 8) == 0x0800);
      CHECK(u16(f, entry + 10) == 0);
      CHECK(u32(f, entry + 16) == r.crc32);
      CHECK(u32(f, entry + 20) == r.nbytes);
      CHECK(u32(f, entry + 24) == r.nbytes);
      CHECK(u16(f, entry + 28) == r.name.size());
      CHECK(u16(f, entry + 30) == 0);  // no extra without ZIP64
      CHECK(u16(f, entry + 32) == 0);  // no comment
      CHECK(u16(f, entry + 34) == 0);  // disk
      CHECK(u32(f, entry + 42) == r.header_offset);
      CHECK(text_at(f, entry + 46, r.name.size()) == r.name);
      entry += 46 + r.name.size();
    }
    std::uint64_t cd_size = entry - d.cd;
    CHECK(entry == d.zip64_end);

    CHECK(u32(f, d.zip64_end) == kZip64EndSig);
    CHECK(u64(f, d.zip64_end + 4) == 44);  // size of the rest of the record
    CHECK(u32(f, d.zip64_end + 16) == 0);  // disk
    CHECK(u32(f, d.zip64_end + 20) == 0);  // directory disk
    CHECK(u64(f, d.zip64_end + 24) == kSpecs.size());
    CHECK(u64(f, d.zip64_end + 32) == kSpecs.size());
    CHECK(u64(f, d.zip64_end + 40) == cd_size);
    CHECK(u64(f, d.zip64_end + 48) == d.cd);

    CHECK(u32(f, d.locator) == kZip64LocatorSig);
    CHECK(u32(f, d.locator + 4) == 0);
    CHECK(u64(f, d.locator + 8) == d.zip64_end);
    CHECK(u32(f, d.locator + 16) == 1);  // total disks

    CHECK(u32(f, d.end) == kEndSig);
    CHECK(u16(f, d.end + 4) == 0);
    CHECK(u16(f, d.end + 6) == 0);
    CHECK(u16(f, d.end + 8) == kSpecs.size());
    CHECK(u16(f, d.end + 10) == kSpecs.size());
    CHECK(u32(f, d.end + 12) == cd_size);
    CHECK(u32(f, d.end + 16) == d.cd);
    CHECK(u16(f, d.end + 20) == 0);  // comment length
  }

  TEST_CASE("ZipArchive parses back what the writer laid out") {
    Built built = build_archive(kSpecs);
    ZipArchive zip(view(built.file), "mem.pt");
    CHECK(zip.path() == "mem.pt");
    REQUIRE(zip.records().size() == kSpecs.size());
    for (std::size_t i = 0; i < kSpecs.size(); ++i) {
      const ZipRecord& got = zip.records()[i];
      const ZipRecord& want = built.layout.records[i];
      CAPTURE(i);
      CHECK(got.name == want.name);
      CHECK(got.header_offset == want.header_offset);
      CHECK(got.data_offset == want.data_offset);
      CHECK(got.nbytes == want.nbytes);
      CHECK(got.crc32 == ckpt::crc32(view(built.data[i])));
      Bytes data = zip.data(got);
      CHECK(data.data() == built.file.data() + want.data_offset);  // a view, not a copy
      CHECK(data.size() == built.data[i].size());
      // (memcmp of an empty record would pass a null pointer: undefined, UBSan says so)
      CHECK((data.size() == 0 || std::memcmp(data.data(), built.data[i].data(), data.size()) == 0));
      CHECK(zip.find(want.name) == &got);
    }
    CHECK(zip.find("archive/data/2") == nullptr);
    CHECK(zip.find("") == nullptr);
  }

  TEST_CASE("an archive with no records parses as empty") {
    Built built = build_archive({});
    CHECK(built.file.size() == 56 + 20 + 22);
    ZipArchive zip(view(built.file), "empty.zip");
    CHECK(zip.records().empty());
  }

  TEST_CASE("an end record followed by an archive comment is found") {
    Built built = build_archive(kSpecs);
    std::string comment = "a comment PK\x05\x06 with a fake signature";
    DirectoryOffsets d = directory_offsets(built);
    put_le(built.file, d.end + 20, comment.size(), 2);
    for (char c : comment) built.file.push_back(static_cast<std::byte>(c));
    ZipArchive zip(view(built.file), "comment.zip");
    CHECK(zip.records().size() == kSpecs.size());
  }

  TEST_CASE("ZIP64: a record of 0xFFFFFFFF bytes or more gets markers and ZIP64 extras") {
    // Only headers are rendered: no 4 GiB buffer is needed.
    constexpr std::uint64_t kHuge = 0x1'2345'6789ull;
    std::vector<ZipEntrySpec> specs = {{"a/data.pkl", 10},
                                       {"a/data/0", kHuge},
                                       {"a/data/1", 0xFFFFFFFEull},
                                       {"a/data/2", 0xFFFFFFFFull},
                                       {"a/version", 2}};
    ZipLayout layout = ckpt::layout_zip(specs);
    REQUIRE(layout.records.size() == 5);
    for (std::size_t i = 0; i < layout.records.size(); ++i) {
      CAPTURE(i);
      CHECK(layout.records[i].data_offset % 64 == 0);
      layout.records[i].crc32 = 0x11223344u + static_cast<std::uint32_t>(i);
    }
    const ZipRecord& small = layout.records[0];
    const ZipRecord& huge = layout.records[1];
    const ZipRecord& below = layout.records[2];  // 0xFFFFFFFE bytes: fits, but its successor's offset will not
    const ZipRecord& exact = layout.records[3];  // 0xFFFFFFFF bytes: the marker value itself needs ZIP64
    const ZipRecord& last = layout.records[4];
    CHECK(below.header_offset > k32);
    // The local header of a huge record: version 4.5, markers, ZIP64 extra with both sizes.
    {
      Buffer h = ckpt::render_local_header(huge);
      REQUIRE(h.size() == huge.data_offset - huge.header_offset);
      CHECK(u32(h, 0) == kLocalSig);
      CHECK(u16(h, 4) == 45);
      CHECK(u32(h, 14) == 0x11223345u);
      CHECK(u32(h, 18) == k32);
      CHECK(u32(h, 22) == k32);
      std::uint16_t name_len = u16(h, 26);
      std::uint16_t extra_len = u16(h, 28);
      CHECK(text_at(h, 30, name_len) == "a/data/0");
      std::uint64_t x = 30 + name_len;
      CHECK(u16(h, x) == 0x0001);
      CHECK(u16(h, x + 2) == 16);
      CHECK(u64(h, x + 4) == kHuge);   // uncompressed
      CHECK(u64(h, x + 12) == kHuge);  // compressed
      CHECK(text_at(h, x + 20, 2) == "FB");
      CHECK(u16(h, x + 22) == extra_len - 24);
      CHECK(text_at(h, x + 24, extra_len - 24) == std::string(extra_len - 24, 'Z'));
      CHECK(30 + name_len + extra_len == h.size());
    }
    // Local headers carry no offset: a small record far into the file needs no ZIP64 there.
    {
      Buffer h = ckpt::render_local_header(below);
      CHECK(u16(h, 4) == 20);
      CHECK(u32(h, 18) == 0xFFFFFFFEu);
      CHECK(u32(h, 22) == 0xFFFFFFFEu);
      CHECK(text_at(h, 30 + below.name.size(), 2) == "FB");
    }
    {
      Buffer h = ckpt::render_local_header(exact);
      CHECK(u16(h, 4) == 45);
      CHECK(u32(h, 18) == k32);
      std::uint64_t x = 30 + exact.name.size();
      CHECK(u16(h, x) == 0x0001);
      CHECK(u64(h, x + 4) == 0xFFFFFFFFull);
    }

    Buffer cd = ckpt::render_central_directory(layout);
    std::uint64_t e = 0;
    // Entry 0: small and near the start, no ZIP64.
    CHECK(u32(cd, e) == kCentralSig);
    CHECK(u16(cd, e + 6) == 20);
    CHECK(u32(cd, e + 20) == 10);
    CHECK(u16(cd, e + 30) == 0);
    CHECK(u32(cd, e + 42) == small.header_offset);
    e += 46 + small.name.size();
    // Entries 1-4: a size or the header offset does not fit: all three markers and a
    // 24-byte ZIP64 extra (uncompressed, compressed, header offset, in that order).
    for (const ZipRecord* r : {&huge, &below, &exact, &last}) {
      CAPTURE(r->name);
      CHECK(u32(cd, e) == kCentralSig);
      CHECK(u16(cd, e + 4) == 45);
      CHECK(u16(cd, e + 6) == 45);
      CHECK(u32(cd, e + 16) == r->crc32);
      CHECK(u32(cd, e + 20) == k32);
      CHECK(u32(cd, e + 24) == k32);
      CHECK(u16(cd, e + 28) == r->name.size());
      CHECK(u16(cd, e + 30) == 28);
      CHECK(u32(cd, e + 42) == k32);
      CHECK(text_at(cd, e + 46, r->name.size()) == r->name);
      std::uint64_t x = e + 46 + r->name.size();
      CHECK(u16(cd, x) == 0x0001);
      CHECK(u16(cd, x + 2) == 24);
      CHECK(u64(cd, x + 4) == r->nbytes);
      CHECK(u64(cd, x + 12) == r->nbytes);
      CHECK(u64(cd, x + 20) == r->header_offset);
      e = x + 28;
    }
    std::uint64_t cd_size = e;
    CHECK(cd.size() == cd_size + 56 + 20 + 22);
    CHECK(layout.file_size == layout.central_directory_offset + cd.size());
    CHECK(layout.central_directory_offset > k32);
    // ZIP64 end record has the real values; the classic end record saturates.
    CHECK(u32(cd, e) == kZip64EndSig);
    CHECK(u64(cd, e + 32) == 5);
    CHECK(u64(cd, e + 40) == cd_size);
    CHECK(u64(cd, e + 48) == layout.central_directory_offset);
    CHECK(u32(cd, e + 56) == kZip64LocatorSig);
    CHECK(u64(cd, e + 56 + 8) == layout.central_directory_offset + cd_size);
    std::uint64_t end = e + 56 + 20;
    CHECK(u32(cd, end) == kEndSig);
    CHECK(u16(cd, end + 10) == 5);
    CHECK(u32(cd, end + 12) == cd_size);
    CHECK(u32(cd, end + 16) == k32);
  }

  TEST_CASE("ZIP64: the reader takes sizes and header offsets from ZIP64 extras and the ZIP64 end record") {
    // Hand-built: record "first" with a plain directory entry, record "second" whose
    // directory entry stores header offset (only) as 0xFFFFFFFF + an 8-byte ZIP64
    // extra, record "third" with all three fields in the extra; the classic end
    // record saturated, the real values in a ZIP64 end record.
    ckpt::ByteWriter w;  // archives built by hand
    struct Rec {
      std::string name;
      std::string data;
      std::uint64_t header = 0;
      std::uint64_t data_offset = 0;
    };
    std::vector<Rec> recs = {{"first", "hello", 0, 0}, {"second", "zip64 offset", 0, 0}, {"third", "all three", 0, 0}};
    for (Rec& r : recs) {
      r.header = w.size();
      w.u32(kLocalSig);
      w.u16(45);
      w.u16(0);
      w.u16(0);
      w.u16(0);
      w.u16(0);
      w.u32(ckpt::crc32(Bytes(reinterpret_cast<const std::byte*>(r.data.data()), r.data.size())));
      w.u32(r.data.size());
      w.u32(r.data.size());
      w.u16(r.name.size());
      w.u16(3);  // an odd-sized extra: no alignment assumed by the reader
      w.text(r.name);
      w.text("xyz");
      r.data_offset = w.size();
      w.text(r.data);
    }
    std::uint64_t cd_offset = w.size();
    for (std::size_t i = 0; i < recs.size(); ++i) {
      const Rec& r = recs[i];
      bool all = i == 2;
      bool zip64 = i >= 1;
      w.u32(kCentralSig);
      w.u16(45);
      w.u16(45);
      w.u16(0);
      w.u16(0);
      w.u16(0);
      w.u16(0);
      w.u32(ckpt::crc32(Bytes(reinterpret_cast<const std::byte*>(r.data.data()), r.data.size())));
      w.u32(all ? k32 : r.data.size());
      w.u32(all ? k32 : r.data.size());
      w.u16(r.name.size());
      std::uint16_t extra_len = !zip64 ? 0 : all ? 4 + 24 : 4 + 8;
      w.u16(extra_len + 9);  // plus an unknown extra block, which must be skipped
      w.u16(2);              // comment
      w.u16(0);
      w.u16(0);
      w.u32(0);
      w.u32(zip64 ? k32 : r.header);
      w.text(r.name);
      w.u16(0xCAFE);  // unknown block first
      w.u16(5);
      w.text("junk!");
      if (zip64) {
        w.u16(0x0001);
        w.u16(all ? 24 : 8);
        if (all) {
          w.u64(r.data.size());
          w.u64(r.data.size());
        }
        w.u64(r.header);
      }
      w.text("c!");
    }
    std::uint64_t cd_size = w.size() - cd_offset;
    std::uint64_t zip64_end = w.size();
    w.u32(kZip64EndSig);
    w.u64(44);
    w.u16(45);
    w.u16(45);
    w.u32(0);
    w.u32(0);
    w.u64(recs.size());
    w.u64(recs.size());
    w.u64(cd_size);
    w.u64(cd_offset);
    w.u32(kZip64LocatorSig);
    w.u32(0);
    w.u64(zip64_end);
    w.u32(1);
    w.u32(kEndSig);
    w.u16(0);
    w.u16(0);
    w.u16(0xFFFF);
    w.u16(0xFFFF);
    w.u32(k32);
    w.u32(k32);
    w.u16(0);

    Buffer file = w.take();
    ZipArchive zip(view(file), "zip64.zip");
    REQUIRE(zip.records().size() == 3);
    for (std::size_t i = 0; i < recs.size(); ++i) {
      CAPTURE(i);
      const ZipRecord& got = zip.records()[i];
      CHECK(got.name == recs[i].name);
      CHECK(got.header_offset == recs[i].header);
      CHECK(got.data_offset == recs[i].data_offset);
      CHECK(got.nbytes == recs[i].data.size());
      CHECK(ckpt::as_chars(zip.data(got)) == recs[i].data);
    }
  }

  TEST_CASE("crc32: known value, and update/concat agree with a bitwise reference at every split") {
    std::string check = "123456789";
    Bytes check_bytes(reinterpret_cast<const std::byte*>(check.data()), check.size());
    CHECK(ckpt::crc32(check_bytes) == 0xCBF43926u);
    CHECK(reference_crc32(check_bytes) == 0xCBF43926u);
    CHECK(ckpt::crc32(Bytes{}) == 0u);

    Buffer data = payload(3, 1000);
    for (std::size_t i = 0; i < data.size(); i += 7) data[i] = static_cast<std::byte>(i * i);
    Bytes all = view(data);
    std::uint32_t want = reference_crc32(all);
    CHECK(ckpt::crc32(all) == want);
    for (std::size_t split : {0, 1, 2, 3, 4, 7, 8, 15, 16, 63, 64, 65, 500, 997, 999, 1000}) {
      CAPTURE(split);
      Bytes a = all.subspan(0, split);
      Bytes b = all.subspan(split);
      std::uint32_t crc_a = ckpt::crc32(a);
      std::uint32_t crc_b = ckpt::crc32(b);
      CHECK(crc_a == reference_crc32(a));
      CHECK(crc_b == reference_crc32(b));
      CHECK(ckpt::crc32_update(crc_a, b) == want);
      CHECK(ckpt::crc32_concat(crc_a, crc_b, b.size()) == want);
    }
    // Three pieces folded left to right, as the executor does per record.
    std::uint32_t folded = 0;
    for (auto [begin, end] : {std::pair<std::size_t, std::size_t>{0, 10}, {10, 600}, {600, 1000}}) {
      Bytes piece = all.subspan(begin, end - begin);
      folded = ckpt::crc32_concat(folded, ckpt::crc32(piece), piece.size());
    }
    CHECK(folded == want);
  }

  // ---------------------------------------------------------------- corrupt inputs

  namespace {

  struct Corrupt {
    const char* what;
    std::function<Buffer(const Built&)> make;
    const char* message;                                // expected substring of what()
    std::function<std::uint64_t(const Built&)> offset;  // expected where().byte_offset, if any
  };

  Buffer with(const Built& b, const std::function<void(Buffer&)>& edit) {
    Buffer f = b.file;
    edit(f);
    return f;
  }

  // The error parsing `file`; with `through_reader`, local headers are read through
  // a ReadAt callback (as for mapped files) instead of from the bytes.
  std::string error_for(const Buffer& file, std::optional<std::uint64_t>* offset = nullptr,
                        bool through_reader = false) {
    ZipArchive::ReadAt reader;
    if (through_reader) {
      reader = [&file](std::uint64_t at, std::byte* out, std::uint64_t nbytes) {
        REQUIRE(at + nbytes <= file.size());
        std::memcpy(out, file.data() + at, nbytes);
      };
    }
    try {
      ZipArchive zip(view(file), "bad.pt", reader);
    } catch (const ckpt::Error& e) {
      if (offset != nullptr) *offset = e.where().byte_offset;
      CHECK(e.where().file == "bad.pt");
      return e.what();
    }
    return "<no error>";
  }

  }  // namespace

  TEST_CASE("corrupt archives: one case per failure kind, each an Error naming the problem") {
    const std::vector<ZipEntrySpec> specs = {
        {"archive/data.pkl", 100}, {"archive/data/0", 256}, {"archive/version", 2}};
    Built base = build_archive(specs);
    DirectoryOffsets d = directory_offsets(base);
    const auto& rec = base.layout.records;
    auto at = [](std::uint64_t value) { return [value](const Built&) { return value; }; };

    const std::vector<Corrupt> cases = {
        {"empty", [](const Built&) { return Buffer{}; }, "too short", at(0)},
        {"too short", [](const Built&) { return Buffer(21, std::byte{'P'}); }, "too short", at(0)},
        {"not a zip", [](const Built&) { return Buffer(4096, std::byte{'x'}); }, "not a zip archive", at(4096)},
        {"no end of central directory",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, d.end, 0, 4); }); },
         "no end of central directory", at(base.file.size())},
        {"cut in the middle of record data",
         [&](const Built& b) {
           return Buffer(b.file.begin(), b.file.begin() + static_cast<std::ptrdiff_t>(rec[1].data_offset + 100));
         },
         "truncated file", at(rec[1].data_offset + 100)},
        {"record data runs past the end of the file (truncated)",
         [&](const Built& b) {
           return with(b, [&](Buffer& f) {
             std::uint64_t e = cd_entry(b, 1);
             put_le(f, e + 20, f.size(), 4);
             put_le(f, e + 24, f.size(), 4);
           });
         },
         "truncated", at(rec[1].data_offset)},
        {"bad central directory signature",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, cd_entry(b, 1), 0x02014b51, 4); }); },
         "bad central directory entry signature", [&](const Built& b) { return cd_entry(b, 1); }},
        {"central directory offset outside the file",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, d.zip64_end + 48, f.size() + 1, 8); }); },
         "lies outside the file", at(d.end)},
        {"central directory size outside the file",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, d.zip64_end + 40, 1u << 20, 8); }); },
         "lies outside the file", at(d.end)},
        {"entries count too large for the directory size",
         [&](const Built& b) {
           return with(b, [&](Buffer& f) {
             put_le(f, d.zip64_end + 24, 1000, 8);
             put_le(f, d.zip64_end + 32, 1000, 8);
           });
         },
         "1000 entries cannot fit", at(d.end)},
        {"the end record counting one entry fewer than the directory holds",
         [&](const Built& b) {
           return with(b, [&](Buffer& f) {
             for (std::uint64_t field : {d.end + 8, d.end + 10}) put_le(f, field, specs.size() - 1, 2);
             for (std::uint64_t field : {d.zip64_end + 24, d.zip64_end + 32}) put_le(f, field, specs.size() - 1, 8);
           });
         },
         "holds more entries than the 2 its end record counts", at(cd_entry(base, 2))},
        {"a record's data running into the next record's header",
         [&](const Built& b) {
           return with(b, [&](Buffer& f) {
             std::uint64_t extra = rec[0].data_offset - rec[0].header_offset - 30 - specs[0].name.size();
             put_le(f, rec[0].header_offset + 28, extra + 64, 2);
           });
         },
         "record 'archive/data/0' (its header at offset", at(cd_entry(base, 1))},
        {"bad local header signature",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, rec[1].header_offset, 0x04034b00, 4); }); },
         "local header: bad signature", at(rec[1].header_offset)},
        {"local header offset past the end",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, cd_entry(b, 2) + 42, 0x7FFFFFFF, 4); }); },
         "lies past the end of the file", at(base.file.size())},
        {"local name differs from the directory",
         [&](const Built& b) { return with(b, [&](Buffer& f) { f[rec[1].header_offset + 30 + 8] = std::byte{'D'}; }); },
         "names another record", at(rec[1].header_offset)},
        {"compressed record (method 8)",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, cd_entry(b, 1) + 10, 8, 2); }); },
         "compressed (method 8)", [&](const Built& b) { return cd_entry(b, 1); }},
        {"encrypted record",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, cd_entry(b, 0) + 8, 0x0801, 2); }); },
         "encrypted", [&](const Built& b) { return cd_entry(b, 0); }},
        {"compressed and uncompressed sizes disagree",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, cd_entry(b, 1) + 20, 255, 4); }); },
         "sizes disagree", [&](const Built& b) { return cd_entry(b, 1); }},
        {"record overlapping the central directory",
         [&](const Built& b) {
           return with(b, [&](Buffer& f) {
             std::uint64_t e = cd_entry(b, 2);
             put_le(f, e + 20, 2 + 10, 4);
             put_le(f, e + 24, 2 + 10, 4);
           });
         },
         "overlaps the central directory", [&](const Built& b) { return cd_entry(b, 2); }},
        {"multi-disk archive", [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, d.end + 4, 1, 2); }); },
         "multi-disk", at(d.end)},
        {"ZIP64 locator pointing outside the archive",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, d.locator + 8, d.locator, 8); }); },
         "ZIP64 locator points outside", at(d.locator)},
        {"bad ZIP64 end record signature",
         [&](const Built& b) { return with(b, [&](Buffer& f) { put_le(f, d.zip64_end, 0x06064b00, 4); }); },
         "bad ZIP64 end of central directory signature", at(d.zip64_end)},
        {"legacy torch.save format",
         [](const Built&) {
           Buffer f;
           for (unsigned char c :
                {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e})
             f.push_back(static_cast<std::byte>(c));
           f.resize(200, std::byte{0});
           return f;
         },
         "legacy torch.save format (PyTorch < 1.6) is not supported", at(0)},
    };

    // The unmodified base archive is valid: every failure below is the edit's doing.
    CHECK_NOTHROW(ZipArchive(view(base.file), "good.pt"));
    // With a reader, every local header comes through it, nearby headers in
    // one read (these all lie within 64 KiB), and the records are the same.
    auto reads_of = [](const Buffer& file, std::size_t& reads) {
      return ZipArchive(view(file), "good.pt", [&file, &reads](std::uint64_t at, std::byte* out, std::uint64_t nbytes) {
        ++reads;
        std::memcpy(out, file.data() + at, nbytes);
      });
    };
    auto same_records = [](const ZipArchive& a, const ZipArchive& b) {
      REQUIRE(a.records().size() == b.records().size());
      for (std::size_t i = 0; i < a.records().size(); ++i)
        CHECK(a.records()[i].data_offset == b.records()[i].data_offset);
    };
    std::size_t reads = 0;
    ZipArchive through = reads_of(base.file, reads);
    CHECK(reads == 1);
    same_records(through, ZipArchive(view(base.file), "good.pt"));
    // A record larger than a batch between two headers: its data is not read,
    // the headers on either side take a read each.
    Built far = build_archive({{"a/data.pkl", 10}, {"a/data/0", 200000}, {"a/version", 2}});
    std::size_t far_reads = 0;
    same_records(reads_of(far.file, far_reads), ZipArchive(view(far.file), "good.pt"));
    CHECK(far_reads == 2);
    for (const Corrupt& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      Buffer file = c.make(base);
      CHECK_THROWS_AS(ZipArchive(view(file), "bad.pt"), ckpt::Error);
      std::optional<std::uint64_t> offset;
      std::string message = error_for(file, &offset);
      // Local headers read through a callback give the very same error.
      std::optional<std::uint64_t> reader_offset;
      CHECK(error_for(file, &reader_offset, true) == message);
      CHECK(reader_offset == offset);
      CHECK_MESSAGE(message.find(c.message) != std::string::npos, message);
      CHECK(message.rfind("bad.pt: ", 0) == 0);
      if (c.offset) {
        REQUIRE(offset.has_value());
        CHECK(*offset == c.offset(base));
        CHECK_MESSAGE(message.find(fmt_hex(c.offset(base))) != std::string::npos, message);
      }
    }
  }

  TEST_CASE("a classic archive (no ZIP64 end record or locator) parses, and its end record is checked") {
    Built built = build_archive(kSpecs);
    DirectoryOffsets d = directory_offsets(built);
    // Drop the ZIP64 end record and locator: what Python's zipfile writes for small files.
    Buffer classic(built.file.begin(), built.file.begin() + static_cast<std::ptrdiff_t>(d.zip64_end));
    classic.insert(classic.end(), built.file.begin() + static_cast<std::ptrdiff_t>(d.end), built.file.end());
    std::uint64_t end = classic.size() - 22;
    REQUIRE(u32(classic, end) == kEndSig);
    {
      ZipArchive zip(view(classic), "classic.zip");
      REQUIRE(zip.records().size() == kSpecs.size());
      for (std::size_t i = 0; i < kSpecs.size(); ++i) {
        CHECK(zip.records()[i].data_offset == built.layout.records[i].data_offset);
        CHECK(zip.records()[i].crc32 == built.layout.records[i].crc32);
      }
    }
    auto fails_with = [&](const std::function<void(Buffer&)>& edit, const std::string& message) {
      Buffer f = classic;
      edit(f);
      std::optional<std::uint64_t> offset;
      std::string what = error_for(f, &offset);
      CHECK_MESSAGE(what.find(message) != std::string::npos, what);
      CHECK(offset == end);
    };
    fails_with([&](Buffer& f) { put_le(f, end + 16, end + 1, 4); }, "lies outside the file");
    fails_with([&](Buffer& f) { put_le(f, end + 12, end, 4); }, "lies outside the file");
    fails_with(
        [&](Buffer& f) {
          put_le(f, end + 8, 0xFFFF, 2);
          put_le(f, end + 10, 0xFFFF, 2);
        },
        "65535 entries cannot fit");
    fails_with([&](Buffer& f) { put_le(f, end + 8, 3, 2); }, "multi-disk");
  }

  TEST_CASE("a record whose name needs no padding gets an empty 'FB' block") {
    // 30 (header) + 30 (name) + 4 (block header) = 64: data starts right after.
    std::vector<ZipEntrySpec> specs = {{std::string(30, 'p'), 5}};
    Built built = build_archive(specs);
    const ZipRecord& r = built.layout.records[0];
    CHECK(r.data_offset == 64);
    CHECK(u16(built.file, 28) == 4);
    CHECK(text_at(built.file, 60, 2) == "FB");
    CHECK(u16(built.file, 62) == 0);
    ZipArchive zip(view(built.file), "nopad.zip");
    CHECK(zip.records().at(0).data_offset == 64);
  }

  TEST_CASE("duplicate record names are rejected") {
    Built built = build_archive({{"archive/data/0", 4}, {"archive/data/1", 4}, {"archive/data/0", 8}});
    CHECK_THROWS_WITH_AS(ZipArchive(view(built.file), "dup.pt"),
                         doctest::Contains("duplicate record name 'archive/data/0'"), ckpt::Error);
    std::optional<std::uint64_t> offset;
    error_for(built.file, &offset);
    CHECK(offset == cd_entry(built, 2));
  }

  TEST_CASE("the record index outlives moves and copies of the archive") {
    // The index holds views of the records' names: a copy indexes its own, and a
    // move keeps the records where the views point.
    Built built = build_archive({{"archive/data/0", 4}, {"a-name-longer-than-sso/data/1", 8}});
    std::optional<ZipArchive> original(std::in_place, view(built.file), "idx.pt");
    ZipArchive copy = *original;
    ZipArchive moved = std::move(*original);
    original.reset();
    for (const ZipArchive* zip : {&copy, &moved}) {
      REQUIRE(zip->find("archive/data/0") != nullptr);
      CHECK(zip->find("archive/data/0")->nbytes == 4);
      REQUIRE(zip->find("a-name-longer-than-sso/data/1") != nullptr);
      CHECK(zip->find("a-name-longer-than-sso/data/1") == &zip->records().at(1));
      CHECK(zip->find("archive/data/2") == nullptr);
    }
    copy = moved;  // copy-assigned: its own index again
    CHECK(copy.find("archive/data/0") == &copy.records().at(0));
  }

  TEST_CASE("layout_zip rejects names longer than a zip name field") {
    std::vector<ZipEntrySpec> specs = {{std::string(0x10000, 'n'), 1}};
    CHECK_THROWS_KIND(ckpt::layout_zip(specs), ckpt::ErrorKind::BadInput);
    std::vector<ZipEntrySpec> ok = {{std::string(0xFFFF, 'n'), 1}};
    CHECK(ckpt::layout_zip(ok).records.at(0).data_offset % 64 == 0);
  }

  TEST_CASE("layout_zip reports a size that overflows 64 bits") {
    std::vector<ZipEntrySpec> specs = {{"a", ~std::uint64_t{0} - 10}, {"b", 100}};
    CHECK_THROWS_AS(ckpt::layout_zip(specs), ckpt::Error);
  }

}  // TEST_SUITE
