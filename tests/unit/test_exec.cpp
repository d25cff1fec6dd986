// Unit tests for the executor (src/exec/exec.cpp) on real files: every kind of
// record (inline, plain ranges, zeros, interleaved rows, records crossing the
// 8 MiB unit boundary, many tiny records sharing a block with their headers) comes
// out with the right bytes and CRC-32s, and the file is byte-identical with direct
// and buffered I/O and with 1 and 3 threads. Expected bytes are computed here with
// plain loops over the source, not by the executor's code.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ckpt/exec/exec.hpp"
#include "ckpt/exec/synthetic.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/plan/plan.hpp"
#include "error_kind.hpp"
#include "plan_sources.hpp"
#include "temp_files.hpp"

namespace {

namespace fs = std::filesystem;
using ckpt::Piece;
using ckpt::PlannedRecord;
using Buffer = std::vector<std::byte>;

constexpr std::uint64_t kMiB = 1ull << 20;

using test_files::read_file;
using test_files::TempDir;
using test_files::write_file;

Buffer pseudo_random_bytes(std::uint64_t nbytes) {
  Buffer bytes(nbytes);
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  for (std::uint64_t i = 0; i < nbytes; i += 8) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    std::memcpy(bytes.data() + i, &state, std::min<std::uint64_t>(8, nbytes - i));
  }
  return bytes;
}

// Whether the file system under `dir` takes an aligned O_DIRECT write (tmpfs does not).
bool direct_io_works(const fs::path& dir) {
  fs::path probe = dir / "probe";
  int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_DIRECT, 0644);
  if (fd < 0) return false;
  void* block = std::aligned_alloc(4096, 4096);
  std::memset(block, 0, 4096);
  bool ok = ::pwrite(fd, block, 4096, 0) == 4096;
  std::free(block);
  ::close(fd);
  fs::remove(probe);
  return ok;
}

// One output record and the bytes it must hold.
struct Expected {
  PlannedRecord record;
  Buffer bytes;
};

Expected plain(const std::string& name, const Buffer& source, std::uint64_t offset, std::uint64_t nbytes) {
  Expected e{PlannedRecord{name, 0, {}, {}}, Buffer(source.begin() + offset, source.begin() + offset + nbytes)};
  e.record.append_copy(0, offset, nbytes);
  return e;
}

// The records of the main test: sizes and placements chosen so that records cross
// the 8 MiB unit boundary, share blocks with headers, and end the file off-block.
std::vector<Expected> varied_records(const Buffer& source) {
  std::vector<Expected> records;
  Expected pickle{PlannedRecord{"a/data.pkl", 0, {}, {}}, {}};
  for (int i = 0; i < 100; ++i) pickle.bytes.push_back(static_cast<std::byte>(i * 7));
  pickle.record.nbytes = pickle.bytes.size();
  pickle.record.inline_bytes = pickle.bytes;
  records.push_back(pickle);
  records.push_back(Expected{PlannedRecord{"a/data/empty", 0, {}, {}}, {}});
  records.push_back(plain("a/data/0", source, 17, 3 * kMiB + 5));  // unaligned source and length
  // 12 MiB: two ranges with zeros between them, across a unit boundary.
  Expected mixed{PlannedRecord{"a/data/1", 0, {}, {}}, {}};  // append_* add up nbytes
  mixed.record.append_copy(0, 1000, 5 * kMiB);
  mixed.record.append_zeros(2 * kMiB + 3);
  mixed.record.append_copy(0, 9 * kMiB + 1, 5 * kMiB - 3);
  mixed.bytes.insert(mixed.bytes.end(), source.begin() + 1000, source.begin() + 1000 + 5 * kMiB);
  mixed.bytes.insert(mixed.bytes.end(), 2 * kMiB + 3, std::byte{0});
  mixed.bytes.insert(mixed.bytes.end(), source.begin() + 9 * kMiB + 1, source.begin() + 14 * kMiB - 2);
  records.push_back(mixed);
  // A dim-1 glue: rows of 40 bytes from two parts, interleaved.
  constexpr std::uint64_t kRows = 30000;
  Expected glued{PlannedRecord{"a/data/2", kRows * 80, {}, {}}, {}};
  for (std::uint64_t part = 0; part < 2; ++part) {
    Piece piece;
    piece.source = 0;
    piece.source_offset = 100 + part * 4 * kMiB;
    piece.offset = part * 40;
    piece.nbytes = 40;
    piece.rows = kRows;
    piece.source_stride = 40;
    piece.stride = 80;
    glued.record.copies.push_back(piece);
  }
  for (std::uint64_t r = 0; r < kRows; ++r) {
    for (std::uint64_t part = 0; part < 2; ++part) {
      auto from = source.begin() + static_cast<std::ptrdiff_t>(100 + part * 4 * kMiB + r * 40);
      glued.bytes.insert(glued.bytes.end(), from, from + 40);
    }
  }
  records.push_back(glued);
  for (int i = 0; i < 300; ++i) {  // tiny records: many headers per block
    records.push_back(plain("a/data/t" + std::to_string(i), source, 3 * i, 1 + i % 61));
  }
  records.push_back(plain("a/data/last", source, 5 * kMiB, 7 * kMiB + 1));
  return records;
}

ckpt::Plan plan_of(const ckpt::MappedFile& source, const std::vector<Expected>& records, const fs::path& out) {
  ckpt::Plan plan;
  plan.add_source(test_files::whole_file_source(source));
  ckpt::PlannedFile file;
  file.path = out.string();
  for (const Expected& e : records) file.records.push_back(e.record);
  plan.files.push_back(file);
  return plan;
}

// The output parses as a zip whose records hold the expected bytes, with their CRC-32s.
void check_output(const fs::path& path, const std::vector<Expected>& records) {
  Buffer bytes = read_file(path);
  ckpt::ZipArchive archive(bytes, path.string());
  REQUIRE(archive.records().size() == records.size());
  for (const Expected& e : records) {
    const ckpt::ZipRecord* record = archive.find(e.record.name);
    REQUIRE(record != nullptr);
    ckpt::Bytes data = archive.data(*record);
    CHECK((data.size() == e.bytes.size() && std::equal(data.begin(), data.end(), e.bytes.begin())));
    CHECK(record->crc32 == ckpt::crc32(e.bytes));
    CHECK(record->data_offset % ckpt::kTorchAlignment == 0);
  }
}

// Runs the records as one file with direct and buffered I/O and each thread
// count; every output is correct and all are byte-identical.
void run_all_modes(const TempDir& dir, const ckpt::MappedFile& source, const std::vector<Expected>& records,
                   const ckpt::ExecOptions& base_options = {}, std::vector<unsigned> thread_counts = {1, 3}) {
  bool direct_possible = direct_io_works(dir.path());
  Buffer first;
  for (bool direct : {true, false}) {
    for (unsigned threads : thread_counts) {
      CAPTURE(direct);
      CAPTURE(threads);
      fs::path out = dir / ("out-" + std::to_string(direct) + "-" + std::to_string(threads) + ".pt");
      ckpt::ExecOptions options = base_options;
      options.check_crc = false;  // raw sources, not zip archives: the CRC check has its own cases below
      options.threads = threads;
      options.direct_io = direct;
      ckpt::ExecStats stats = ckpt::execute(plan_of(source, records, out), options);
      CHECK(stats.direct_files == (direct && direct_possible ? 1u : 0u));
      CHECK(stats.bytes_written == fs::file_size(out));
      check_output(out, records);
      Buffer bytes = read_file(out);
      if (first.empty()) first = bytes;
      CHECK(bytes == first);
      for (const auto& entry : fs::directory_iterator(dir.path())) {  // no temporary file left
        CHECK(entry.path().filename().string().find("ckpt-tmp") == std::string::npos);
      }
      fs::remove(out);
    }
  }
}

// The zip layout of records of these names and sizes.
ckpt::ZipLayout layout_of(const std::vector<std::pair<std::string, std::uint64_t>>& records) {
  std::vector<ckpt::ZipEntrySpec> specs;
  for (const auto& [name, nbytes] : records) specs.push_back({name, nbytes});
  return ckpt::layout_zip(specs);
}

// The size of record `which` such that `offset_of(layout)` lands exactly on
// `target`: offsets grow with the size (headers are padded to 64 bytes, so
// data offsets move in steps of 64), so a binary search finds the smallest size
// that reaches the target, and the test checks that it hits it.
std::uint64_t size_to_hit(std::vector<std::pair<std::string, std::uint64_t>> records, std::size_t which,
                          std::uint64_t target, std::uint64_t (*offset_of)(const ckpt::ZipLayout&)) {
  std::uint64_t low = 0;
  std::uint64_t high = target;  // a record as large as the target overshoots it
  while (low < high) {
    std::uint64_t mid = low + (high - low) / 2;
    records[which].second = mid;
    if (offset_of(layout_of(records)) < target) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  records[which].second = low;
  REQUIRE(offset_of(layout_of(records)) == target);
  return low;
}

}  // namespace

TEST_SUITE("exec") {
  TEST_CASE("direct and buffered I/O, 1 and 3 threads, write the same correct file") {
    TempDir dir;
    Buffer source_bytes = pseudo_random_bytes(16 * kMiB);
    write_file(dir / "source.bin", source_bytes);
    ckpt::MappedFile source((dir / "source.bin").string());
    run_all_modes(dir, source, varied_records(source_bytes));
  }

  TEST_CASE("records and files that start or end exactly on unit and block boundaries") {
    TempDir dir;
    Buffer source_bytes = pseudo_random_bytes(24 * kMiB);
    write_file(dir / "source.bin", source_bytes);
    ckpt::MappedFile source((dir / "source.bin").string());
    constexpr std::uint64_t kUnit = 8 * kMiB;
    std::vector<std::pair<std::string, std::uint64_t>> sizes = {
        {"a/data.pkl", 0}, {"a/data/0", 8 * kMiB}, {"a/data/1", 8 * kMiB}, {"a/data/2", 5000}};
    SUBCASE("the first record's data ends at 8 MiB") {
      sizes[1].second = kUnit - layout_of(sizes).records[1].data_offset;
      CHECK(layout_of(sizes).records[1].data_offset + sizes[1].second == kUnit);
    }
    SUBCASE("the second record's data starts at 8 MiB") {
      sizes[1].second = size_to_hit(sizes, 1, kUnit, [](const ckpt::ZipLayout& l) { return l.records[2].data_offset; });
    }
    SUBCASE("the second record's local header starts at 8 MiB") {
      sizes[1].second =
          size_to_hit(sizes, 1, kUnit, [](const ckpt::ZipLayout& l) { return l.records[2].header_offset; });
    }
    SUBCASE("the file ends on a block boundary") {
      std::uint64_t target = (layout_of(sizes).file_size / 4096 + 2) * 4096;
      sizes[3].second = size_to_hit(sizes, 3, target, [](const ckpt::ZipLayout& l) { return l.file_size; });
    }
    SUBCASE("the file ends at 24 MiB, a unit boundary") {
      sizes[3].second = kUnit - 30000;
      sizes[3].second = size_to_hit(sizes, 3, 3 * kUnit, [](const ckpt::ZipLayout& l) { return l.file_size; });
    }
    SUBCASE("the central directory starts at 16 MiB, a unit boundary") {
      sizes[2].second = kUnit - 300000;
      sizes[3].second = 300000 - 30000;
      sizes[3].second =
          size_to_hit(sizes, 3, 2 * kUnit, [](const ckpt::ZipLayout& l) { return l.central_directory_offset; });
    }
    std::vector<Expected> records;
    Expected pickle{PlannedRecord{"a/data.pkl", 0, {}, {}}, {}};
    records.push_back(pickle);
    std::uint64_t at = 0;
    for (std::size_t i = 1; i < sizes.size(); ++i) {
      records.push_back(plain(sizes[i].first, source_bytes, at % (16 * kMiB), sizes[i].second));
      at += sizes[i].second + 12345;
    }
    run_all_modes(dir, source, records, {}, {2});  // (thread counts: the first test)
  }

  TEST_CASE("converting and synthetic copies split at a unit boundary give whole elements") {
    TempDir dir;
    Buffer source_bytes = pseudo_random_bytes(24 * kMiB);
    write_file(dir / "source.bin", source_bytes);
    ckpt::MappedFile source((dir / "source.bin").string());
    // A stand-in conversion float32 -> float16: the upper two bytes of each element.
    ckpt::ExecOptions options;
    options.convert = [](ckpt::DType from, ckpt::DType to, const std::byte* in, std::byte* out, std::uint64_t numel) {
      REQUIRE(from == ckpt::DType::Float32);
      REQUIRE(to == ckpt::DType::Float16);
      for (std::uint64_t i = 0; i < numel; ++i) std::memcpy(out + 2 * i, in + 4 * i + 2, 2);
    };
    constexpr std::uint64_t kElements = 5 * kMiB + 3;  // 10 MiB of float16: crosses 8 MiB
    Expected converted{PlannedRecord{"a/data/0", 2 * kElements, {}, {}}, {}};
    Piece piece;
    piece.source = 0;
    piece.source_offset = 4;
    piece.nbytes = 2 * kElements;
    piece.source_dtype = ckpt::DType::Float32;
    piece.dest_dtype = ckpt::DType::Float16;
    converted.record.copies.push_back(piece);
    for (std::uint64_t i = 0; i < kElements; ++i) {
      converted.bytes.push_back(source_bytes[4 + 4 * i + 2]);
      converted.bytes.push_back(source_bytes[4 + 4 * i + 3]);
    }
    Expected synthetic{PlannedRecord{"a/data/1", 2 * kElements, {}, {}}, Buffer(2 * kElements)};
    Piece synth;
    synth.source = Piece::kSynthetic;
    synth.source_offset = 2 * 1000;
    synth.nbytes = 2 * kElements;
    synth.source_dtype = synth.dest_dtype = ckpt::DType::BFloat16;
    synthetic.record.copies.push_back(synth);
    ckpt::synthesize(ckpt::DType::BFloat16, 2 * 1000, 2 * kElements, synthetic.bytes.data());
    run_all_modes(dir, source, {converted, synthetic}, options, {2});
  }

  TEST_CASE("a file with more header blocks than the executor keeps is written buffered, correctly") {
    TempDir dir;
    Buffer source_bytes = pseudo_random_bytes(64 * 1024);
    write_file(dir / "source.bin", source_bytes);
    ckpt::MappedFile source((dir / "source.bin").string());
    // Records of 4 KiB put nearly every header in a block of its own.
    std::vector<Expected> records;
    for (std::size_t i = 0; i < ckpt::kMaxKeptHeaderBlocks + 1000; ++i) {
      records.push_back(plain("a/data/" + std::to_string(i), source_bytes, (i * 64) % 32768, 4096));
    }
    fs::path out = dir / "many.pt";
    ckpt::ExecOptions options;
    options.threads = 2;
    options.check_crc = false;  // a raw source
    ckpt::ExecStats stats = ckpt::execute(plan_of(source, records, out), options);
    CHECK(stats.direct_files == 0);
    check_output(out, records);
  }

  // ------------------------------------------------------------ input CRCs, all or nothing

  // A source that is a real zip archive: records s/data/0..2 of random bytes,
  // written by the executor itself from inline bytes.
  struct ZipSource {
    Buffer data0 = pseudo_random_bytes(kMiB + 100);
    Buffer data1 = pseudo_random_bytes(12 * kMiB);
    Buffer data2 = pseudo_random_bytes(64 * 1024);
    fs::path path;
    std::uint64_t offset[3] = {0, 0, 0};  // data offsets in the file

    explicit ZipSource(const TempDir& dir) : path(dir / "source.pt") {
      ckpt::Plan plan;
      ckpt::PlannedFile file;
      file.path = path.string();
      for (const Buffer* data : {&data0, &data1, &data2}) {
        std::string name = "s/data/" + std::to_string(file.records.size());
        file.records.push_back(PlannedRecord{name, data->size(), *data, {}});
      }
      plan.files.push_back(file);
      ckpt::execute(plan, {});
      ckpt::MappedFile mapped(path.string());
      ckpt::ZipArchive zip(mapped);
      for (int i = 0; i < 3; ++i) offset[i] = zip.find("s/data/" + std::to_string(i))->data_offset;
    }
    void flip(std::uint64_t file_offset) const {
      Buffer bytes = read_file(path);
      bytes.at(file_offset) ^= std::byte{1};
      write_file(path, bytes);
    }
  };

  // Copies from data/0 (all but its first 10 and last 90 bytes), data/1 as
  // interleaved rows (read ahead) and as sparse 16-byte rows 4 KiB apart (read
  // straight from the mapping); data/2 is not copied.
  ckpt::Plan checked_plan(const ckpt::MappedFile& source, const ZipSource& zip, const fs::path& out) {
    ckpt::Plan plan;
    plan.add_source(test_files::zip_source(source));
    ckpt::PlannedFile file;
    file.path = out.string();
    PlannedRecord r0{"o/data/0", 0, {}, {}};
    r0.append_copy(0, zip.offset[0] + 10, kMiB);
    file.records.push_back(r0);
    constexpr std::uint64_t kRows = 20000;
    PlannedRecord r1{"o/data/1", kRows * 80, {}, {}};
    for (std::uint64_t part = 0; part < 2; ++part) {
      Piece piece;
      piece.source = 0;
      piece.source_offset = zip.offset[1] + part * 4 * kMiB;
      piece.offset = part * 40;
      piece.nbytes = 40;
      piece.rows = kRows;
      piece.source_stride = 40;
      piece.stride = 80;
      r1.copies.push_back(piece);
    }
    file.records.push_back(r1);
    PlannedRecord r2{"o/data/2", 500 * 16, {}, {}};
    Piece sparse;
    sparse.source = 0;
    sparse.source_offset = zip.offset[1] + 9 * kMiB;
    sparse.nbytes = 16;
    sparse.rows = 500;  // up to 11 MiB of data/1's 12
    sparse.source_stride = 4096;
    sparse.stride = 16;
    r2.copies.push_back(sparse);
    file.records.push_back(r2);
    plan.files.push_back(file);
    return plan;
  }

  bool no_file_but(const TempDir& dir, const std::vector<std::string>& names) {
    std::vector<std::string> found;
    for (const auto& entry : fs::directory_iterator(dir.path())) found.push_back(entry.path().filename().string());
    std::sort(found.begin(), found.end());
    std::vector<std::string> wanted = names;
    std::sort(wanted.begin(), wanted.end());
    return found == wanted;
  }

  TEST_CASE("every input byte copied is checked against its record's CRC-32") {
    TempDir dir;
    ZipSource zip(dir);
    fs::path out = dir / "out.pt";
    {
      ckpt::MappedFile source(zip.path.string());
      ckpt::ExecStats stats = ckpt::execute(checked_plan(source, zip, out), {});
      CHECK(stats.crc_checked);
      // data/0: the 100 bytes no copy read; data/1: at least the rows the sparse
      // copy skipped; never data/2, never all of data/1 twice.
      CHECK(stats.crc_reread_bytes >= 100 + 4 * kMiB);
      CHECK(stats.crc_reread_bytes < 100 + zip.data1.size());
      fs::remove(out);
    }
    struct Case {
      const char* what;
      std::uint64_t offset;
      const char* record;  // nullptr: the corruption is in no record the plan reads
    };
    for (const Case& c :
         {Case{"a byte copied", zip.offset[0] + 5000, "s/data/0"},
          Case{"a byte of a copied record that no copy reads", zip.offset[0] + 3, "s/data/0"},
          Case{"a byte read ahead for interleaved rows", zip.offset[1] + 4 * kMiB + 7, "s/data/1"},
          Case{"a byte of a sparse row read from the mapping", zip.offset[1] + 9 * kMiB + 4096 * 7 + 3, "s/data/1"},
          Case{"a byte skipped between sparse rows", zip.offset[1] + 9 * kMiB + 100, "s/data/1"},
          Case{"a byte of a record no copy reads", zip.offset[2] + 10, nullptr}}) {
      CAPTURE(c.what);
      zip.flip(c.offset);
      ckpt::MappedFile source(zip.path.string());
      if (c.record == nullptr) {
        CHECK_NOTHROW(ckpt::execute(checked_plan(source, zip, out), {}));
        fs::remove(out);
      } else {
        try {
          ckpt::execute(checked_plan(source, zip, out), {});
          FAIL("a corrupted input was copied");
        } catch (const ckpt::Error& e) {
          CHECK(e.where().file == zip.path.string());
          CHECK(e.where().member == c.record);
          CHECK_KIND(e, ckpt::ErrorKind::CorruptData);
        }
        CHECK(no_file_but(dir, {"source.pt"}));
        ckpt::ExecOptions unchecked;
        unchecked.check_crc = false;
        ckpt::ExecStats stats = ckpt::execute(checked_plan(source, zip, out), unchecked);
        CHECK_FALSE(stats.crc_checked);
        fs::remove(out);
      }
      zip.flip(c.offset);  // back as it was
    }
  }

  TEST_CASE("a copy that reaches outside every record of its input is a bug, refused before writing") {
    TempDir dir;
    ZipSource zip(dir);
    ckpt::MappedFile source(zip.path.string());
    ckpt::Plan plan;
    plan.add_source(test_files::zip_source(source));
    ckpt::PlannedFile file;
    file.path = (dir / "out.pt").string();
    PlannedRecord record{"o/data/0", 0, {}, {}};
    record.append_copy(0, zip.offset[0] + zip.data0.size() - 10, 100);  // into data/1's local header
    file.records.push_back(record);
    plan.files.push_back(file);
    CHECK_THROWS_WITH_AS(ckpt::execute(plan, {}), doctest::Contains("outside every record"), ckpt::InternalError);
    CHECK(no_file_but(dir, {"source.pt"}));
  }

  TEST_CASE("an input changed after planning is refused, nothing written") {
    TempDir dir;
    ZipSource zip(dir);
    ckpt::Plan plan;
    {
      ckpt::MappedFile source(zip.path.string());
      plan = checked_plan(source, zip, dir / "out.pt");
    }
    SUBCASE("rewritten in place (mtime)") {
      ::usleep(10000);  // another mtime, whatever the file system's granularity
      zip.flip(zip.offset[2] + 1);
    }
    SUBCASE("replaced by a copy of the same size and mtime (inode)") {
      fs::copy_file(zip.path, dir / "copy.pt");
      fs::last_write_time(dir / "copy.pt", fs::last_write_time(zip.path));
      fs::rename(dir / "copy.pt", zip.path);
    }
    CHECK_THROWS_WITH_AS(ckpt::execute(plan, {}), doctest::Contains("changed after it was planned"), ckpt::Error);
    CHECK(no_file_but(dir, {"source.pt"}));
  }

  TEST_CASE("several outputs appear all together or not at all") {
    TempDir dir;
    ZipSource zip(dir);
    ckpt::MappedFile source(zip.path.string());
    auto three_outputs = [&](std::uint64_t last_source_offset) {
      ckpt::Plan plan = checked_plan(source, zip, dir / "a.pt");
      plan.files.push_back(checked_plan(source, zip, dir / "b.pt").files[0]);
      ckpt::PlannedFile last;
      last.path = (dir / "c.pt").string();
      PlannedRecord record{"o/data/0", 0, {}, {}};
      record.append_copy(0, last_source_offset, 1000);
      last.records.push_back(record);
      plan.files.push_back(last);
      return plan;
    };
    SUBCASE("an output that is the input, under another name, is refused even with overwrite") {
      fs::create_hard_link(zip.path, dir / "c.pt");
      ckpt::ExecOptions options;
      options.overwrite = true;
      CHECK_THROWS_KIND(ckpt::execute(three_outputs(zip.offset[2]), options), ckpt::ErrorKind::BadInput);
      CHECK(no_file_but(dir, {"source.pt", "c.pt"}));
    }
    SUBCASE("an existing last output stops the run before the first is created") {
      write_file(dir / "c.pt", Buffer(10));
      CHECK_THROWS_KIND(ckpt::execute(three_outputs(zip.offset[2]), {}), ckpt::ErrorKind::BadInput);
      CHECK(no_file_but(dir, {"source.pt", "c.pt"}));
    }
    SUBCASE("a corrupted input read only by the last output: none is renamed") {
      zip.flip(zip.offset[2] + 500);
      ckpt::MappedFile corrupted(zip.path.string());
      ckpt::Plan plan = three_outputs(zip.offset[2]);
      plan.sources = {test_files::zip_source(corrupted)};
      CHECK_THROWS_WITH_AS(ckpt::execute(plan, {}), doctest::Contains("s/data/2"), ckpt::Error);
      CHECK(no_file_but(dir, {"source.pt"}));
    }
    SUBCASE("stale temporary files of the same outputs are removed and reported") {
      write_file(dir / ".b.pt.ckpt-tmp-999999999", Buffer(10));  // no such process
      // this process's pid, left by an earlier process that had it
      write_file(dir / (".c.pt.ckpt-tmp-" + std::to_string(::getpid())), Buffer(10));
      write_file(dir / ".a.pt.ckpt-tmp-x", Buffer(10));  // not a temporary file of ours: kept
      std::vector<std::string> notices;
      ckpt::ExecOptions options;
      options.notice = [&](const std::string& text) { notices.push_back(text); };
      ckpt::execute(three_outputs(zip.offset[2]), options);
      REQUIRE(notices.size() == 2);
      CHECK(notices[0].find(".b.pt.ckpt-tmp-999999999") != std::string::npos);
      CHECK(notices[1].find(".c.pt.ckpt-tmp-" + std::to_string(::getpid())) != std::string::npos);
      CHECK(no_file_but(dir, {"source.pt", "a.pt", "b.pt", "c.pt", ".a.pt.ckpt-tmp-x"}));
    }
  }
}
