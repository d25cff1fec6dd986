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

#include "ckpt/crc32.hpp"
#include "ckpt/exec.hpp"
#include "ckpt/mapped_file.hpp"
#include "ckpt/plan.hpp"
#include "ckpt/synthetic.hpp"
#include "ckpt/zip.hpp"

namespace {

namespace fs = std::filesystem;
using ckpt::CopyOp;
using ckpt::PlannedRecord;
using Buffer = std::vector<std::byte>;

constexpr std::uint64_t kMiB = 1ull << 20;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "ckpt_exec_test_XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~TempDir() { fs::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  fs::path operator/(const std::string& name) const { return path_ / name; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

Buffer pseudo_random_bytes(std::uint64_t nbytes) {
  Buffer bytes(nbytes);
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  for (std::uint64_t i = 0; i < nbytes; i += 8) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    std::memcpy(bytes.data() + i, &state, std::min<std::uint64_t>(8, nbytes - i));
  }
  return bytes;
}

void write_file(const fs::path& path, const Buffer& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

Buffer read_file(const fs::path& path) {
  Buffer bytes(fs::file_size(path));
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(in.gcount() == static_cast<std::streamsize>(bytes.size()));
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
    CopyOp op;
    op.source = 0;
    op.source_offset = 100 + part * 4 * kMiB;
    op.dest_offset = part * 40;
    op.nbytes = 40;
    op.rows = kRows;
    op.source_stride = 40;
    op.dest_stride = 80;
    glued.record.copies.push_back(op);
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
  plan.add_source(source);
  ckpt::PlannedFile file{out.string(), {}};
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
    std::vector<std::pair<std::string, std::uint64_t>> sizes = {{"a/data.pkl", 0}, {"a/data/0", 8 * kMiB},
                                                                {"a/data/1", 8 * kMiB}, {"a/data/2", 5000}};
    SUBCASE("the first record's data ends at 8 MiB") {
      sizes[1].second = kUnit - layout_of(sizes).records[1].data_offset;
      CHECK(layout_of(sizes).records[1].data_offset + sizes[1].second == kUnit);
    }
    SUBCASE("the second record's data starts at 8 MiB") {
      sizes[1].second = size_to_hit(sizes, 1, kUnit, [](const ckpt::ZipLayout& l) { return l.records[2].data_offset; });
    }
    SUBCASE("the second record's local header starts at 8 MiB") {
      sizes[1].second = size_to_hit(sizes, 1, kUnit, [](const ckpt::ZipLayout& l) { return l.records[2].header_offset; });
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
      sizes[3].second = size_to_hit(sizes, 3, 2 * kUnit, [](const ckpt::ZipLayout& l) {
        return l.central_directory_offset;
      });
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
    CopyOp op;
    op.source = 0;
    op.source_offset = 4;
    op.nbytes = 2 * kElements;
    op.source_dtype = ckpt::DType::Float32;
    op.dest_dtype = ckpt::DType::Float16;
    converted.record.copies.push_back(op);
    for (std::uint64_t i = 0; i < kElements; ++i) {
      converted.bytes.push_back(source_bytes[4 + 4 * i + 2]);
      converted.bytes.push_back(source_bytes[4 + 4 * i + 3]);
    }
    Expected synthetic{PlannedRecord{"a/data/1", 2 * kElements, {}, {}}, Buffer(2 * kElements)};
    CopyOp synth;
    synth.source = CopyOp::kSynthetic;
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
    ckpt::ExecStats stats = ckpt::execute(plan_of(source, records, out), options);
    CHECK(stats.direct_files == 0);
    check_output(out, records);
  }
}
