// Unit tests for plans as data (src/plan/plan.cpp): how copies are appended and
// merged, and the invariants validate() enforces before the executor runs.
// The only file on disk is one small temporary source for MappedFile.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/io/error.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/plan/plan.hpp"
#include "layout_fixtures.hpp"
#include "plan_sources.hpp"
#include "temp_files.hpp"

namespace {

using ckpt::Piece;
using ckpt::Plan;
using ckpt::PlannedFile;
using ckpt::PlannedRecord;

using test_files::TempFile;

bool same(const Piece& piece, std::uint32_t source, std::uint64_t source_offset, std::uint64_t dest_offset,
          std::uint64_t nbytes) {
  return piece.source == source && piece.source_offset == source_offset && piece.offset == dest_offset &&
         piece.nbytes == nbytes;
}

// A plan of one file with one record, whose copies the test sets directly.
Plan plan_with(const ckpt::MappedFile& source, PlannedRecord record) {
  Plan plan;
  plan.add_source(test_files::whole_file_source(source));
  plan.files.push_back(test_files::planned_file("/tmp/never-written.pt", {std::move(record)}));
  return plan;
}

// A plain copy, fields set by name (Piece has more fields: rows, strides, dtypes).
Piece copy(std::uint32_t source, std::uint64_t source_offset, std::uint64_t dest_offset, std::uint64_t nbytes) {
  return layout_fixtures::plain(source, source_offset, dest_offset, nbytes);
}
// `rows` rows of `nbytes`, strided on both sides.
Piece rows_copy(std::uint32_t source, std::uint64_t source_offset, std::uint64_t source_stride,
                std::uint64_t dest_offset, std::uint64_t dest_stride, std::uint64_t nbytes, std::uint64_t rows) {
  return layout_fixtures::strided(source, source_offset, dest_offset, nbytes, rows, source_stride, dest_stride);
}

PlannedRecord record_of(std::uint64_t nbytes, std::vector<Piece> copies) {
  PlannedRecord record;
  record.name = "archive/data/0";
  record.nbytes = nbytes;
  record.copies = std::move(copies);
  return record;
}

}  // namespace

TEST_SUITE("plan") {
  TEST_CASE("append_copy merges copies that continue both source and destination") {
    PlannedRecord record;
    record.append_copy(0, 100, 10);
    record.append_copy(0, 110, 5);  // continues: merged
    record.append_copy(0, 200, 7);  // source jumps: new piece
    record.append_copy(1, 207, 3);  // other source: new piece
    record.append_copy(1, 210, 0);  // empty: ignored
    record.append_copy(1, 210, 4);  // continues source 1: merged
    record.append_copy(0, 115, 1);  // source 0 again, after other copies: new piece
    REQUIRE(record.copies.size() == 4);
    CHECK(same(record.copies[0], 0, 100, 0, 15));
    CHECK(same(record.copies[1], 0, 200, 15, 7));
    CHECK(same(record.copies[2], 1, 207, 22, 7));
    CHECK(same(record.copies[3], 0, 115, 29, 1));
    CHECK(record.nbytes == 30);
  }

  TEST_CASE("append_copy does not merge a copy that goes backwards or repeats bytes") {
    PlannedRecord record;
    record.append_copy(0, 100, 10);
    record.append_copy(0, 100, 10);  // the same bytes again
    record.append_copy(0, 90, 10);   // the bytes before
    REQUIRE(record.copies.size() == 3);
    CHECK(same(record.copies[1], 0, 100, 10, 10));
    CHECK(same(record.copies[2], 0, 90, 20, 10));
    CHECK(record.nbytes == 30);
  }

  TEST_CASE("append_zeros merges runs of zeros, never with data") {
    PlannedRecord record;
    record.append_zeros(5);
    record.append_zeros(3);
    record.append_copy(0, 0, 4);
    record.append_zeros(2);
    REQUIRE(record.copies.size() == 3);
    CHECK(record.copies[0].source == Piece::kZeros);
    CHECK(record.copies[0].nbytes == 8);
    CHECK(same(record.copies[1], 0, 0, 8, 4));
    CHECK(record.copies[2].source == Piece::kZeros);
    CHECK(record.copies[2].offset == 12);
    CHECK(record.nbytes == 14);
  }

  TEST_CASE("Plan: add_source deduplicates, bytes_to_copy sums record sizes") {
    TempFile a(16);
    TempFile b(16);
    ckpt::MappedFile fa(a.path());
    ckpt::MappedFile fb(b.path());
    Plan plan;
    CHECK(plan.add_source(test_files::whole_file_source(fa)) == 0);
    CHECK(plan.add_source(test_files::whole_file_source(fb)) == 1);
    CHECK(plan.add_source(test_files::whole_file_source(fa)) == 0);
    CHECK(plan.sources.size() == 2);
    PlannedRecord r1;
    r1.append_copy(0, 0, 16);
    PlannedRecord r2;
    r2.append_copy(1, 4, 8);
    r2.append_zeros(100);
    plan.files.push_back(test_files::planned_file("x.pt", {r1, r2}));
    CHECK(plan.bytes_to_copy() == 124);
    CHECK_NOTHROW(ckpt::validate(plan));
  }

  TEST_CASE("Container::Archives: zips back to back, each from an aligned first byte, offsets its own") {
    PlannedFile file;
    file.path = "__0_0.distcp";
    file.container = ckpt::Container::Archives;
    for (const char* name : {"archive/data.pkl", "archive/data/0", "archive/data.pkl", "archive/data/0"}) {
      PlannedRecord record;
      record.name = name;
      record.nbytes = 5;
      record.inline_bytes.assign(5, std::byte{1});
      file.records.push_back(record);
    }
    file.archives = {0, 2};
    std::vector<ckpt::ArchiveLayout> archives = ckpt::archive_layouts(file);
    REQUIRE(archives.size() == 2);
    CHECK(archives[0].start == 0);
    CHECK(archives[1].start % ckpt::kTorchAlignment == 0);
    CHECK(archives[1].start >= archives[0].zip.file_size);
    CHECK(archives[1].start < archives[0].zip.file_size + ckpt::kTorchAlignment);
    CHECK(archives[1].first_record == 2);
    CHECK(archives[1].zip.records[0].header_offset == 0);  // each a zip of its own
    ckpt::ZipLayout whole = ckpt::layout_file(file);
    CHECK(whole.records[2].data_offset == archives[1].start + archives[1].zip.records[0].data_offset);
    CHECK(whole.file_size == archives[1].start + archives[1].zip.file_size);
    ckpt::Plan plan;
    plan.files.push_back(file);
    CHECK_NOTHROW(ckpt::validate(plan));
    plan.files[0].archives = {1, 2};  // not from the first record
    CHECK_THROWS_AS(ckpt::validate(plan), ckpt::InternalError);
    plan.files[0].archives = {0, 0};
    CHECK_THROWS_AS(ckpt::validate(plan), ckpt::InternalError);
    plan.files[0].container = ckpt::Container::Zip;
    plan.files[0].archives = {0};
    CHECK_THROWS_AS(ckpt::validate(plan), ckpt::InternalError);
  }

  TEST_CASE("compress_inline / expand_inline: large inline records kept compressed, expanded byte for byte") {
    PlannedFile file;
    file.path = "out.pt";
    PlannedRecord small;
    small.name = "a/byteorder";
    small.inline_bytes = {std::byte{'l'}};
    small.nbytes = 1;
    PlannedRecord big;
    big.name = "a/data.pkl";
    for (std::size_t i = 0; i < (200u << 10); ++i) big.inline_bytes.push_back(static_cast<std::byte>((i * 7) % 13));
    big.nbytes = big.inline_bytes.size();
    const std::vector<std::byte> original = big.inline_bytes;
    ckpt::compress_inline(small);
    ckpt::compress_inline(big);
    CHECK_FALSE(small.inline_zstd);  // too small to matter
    REQUIRE(big.inline_zstd);
    CHECK(big.inline_bytes.size() < original.size() / 10);
    file.records = {small, big};
    Plan plan;
    plan.files.push_back(file);
    CHECK_NOTHROW(ckpt::validate(plan));
    std::optional<PlannedFile> expanded = ckpt::expand_inline(file);
    REQUIRE(expanded.has_value());
    CHECK(expanded->records[1].inline_bytes == original);
    CHECK_FALSE(expanded->records[1].inline_zstd);
    CHECK(expanded->records[0].inline_bytes == small.inline_bytes);
    CHECK_FALSE(ckpt::expand_inline(*expanded).has_value());  // nothing left to expand
    // a frame that does not give the record's size is a bug in the plan
    plan.files[0].records[1].nbytes += 1;
    CHECK_THROWS_AS(ckpt::validate(plan), ckpt::InternalError);
    CHECK_THROWS_AS(ckpt::expand_inline(plan.files[0]), ckpt::InternalError);
  }

  TEST_CASE("InlineRecordWriter: pieces become the same bytes, raw while small, else a frame per MiB") {
    auto written = [](const std::vector<std::byte>& bytes, std::vector<std::size_t> cuts) {
      ckpt::InlineRecordWriter writer("a/data.pkl");
      std::size_t at = 0;
      for (std::size_t cut : cuts) {
        writer.append(ckpt::Bytes(bytes).subspan(at, cut - at));
        at = cut;
      }
      writer.append(ckpt::Bytes(bytes).subspan(at));
      return writer.finish();
    };
    std::vector<std::byte> small(1000, std::byte{7});
    PlannedRecord raw = written(small, {1, 500});
    CHECK_FALSE(raw.inline_zstd);
    CHECK(raw.inline_bytes == small);
    CHECK(raw.nbytes == small.size());
    std::vector<std::byte> large;
    for (std::size_t i = 0; i < (3u << 20) + 12345; ++i) large.push_back(static_cast<std::byte>((i * 7919) % 251));
    for (const std::vector<std::size_t>& cuts : {std::vector<std::size_t>{}, {1, 70000, (1u << 20) + 3, 3u << 20}}) {
      PlannedRecord record = written(large, cuts);
      REQUIRE(record.inline_zstd);
      CHECK(record.nbytes == large.size());
      PlannedFile file;
      file.path = "out.pt";
      file.records = {record};
      Plan plan;
      plan.files.push_back(file);
      CHECK_NOTHROW(ckpt::validate(plan));  // the frames' stated sizes add up to nbytes
      std::optional<PlannedFile> expanded = ckpt::expand_inline(file);
      REQUIRE(expanded.has_value());
      CHECK(expanded->records[0].inline_bytes == large);
      plan.files[0].records[0].inline_bytes.resize(record.inline_bytes.size() - 1);  // a cut frame
      CHECK_THROWS_AS(ckpt::validate(plan), ckpt::InternalError);
    }
  }

  TEST_CASE("validate accepts well-formed records") {
    TempFile file(100);
    ckpt::MappedFile source(file.path());
    REQUIRE(source.size() == 100);
    PlannedRecord copies;
    copies.name = "archive/data/0";
    copies.append_copy(0, 0, 50);
    copies.append_zeros(10);
    copies.append_copy(0, 60, 40);  // up to the last byte of the source
    CHECK(copies.sequential());
    CHECK_NOTHROW(ckpt::validate(plan_with(source, copies)));

    PlannedRecord inline_record;
    inline_record.name = "archive/version";
    inline_record.inline_bytes = {std::byte{'3'}, std::byte{'\n'}};
    inline_record.nbytes = 2;
    CHECK_NOTHROW(ckpt::validate(plan_with(source, inline_record)));

    PlannedRecord empty;
    empty.name = "archive/data/1";
    CHECK_NOTHROW(ckpt::validate(plan_with(source, empty)));

    // Copies that tile the record in another order than their destinations.
    PlannedRecord shuffled = record_of(30, {copy(0, 0, 20, 10), copy(0, 50, 0, 10), copy(Piece::kZeros, 0, 10, 10)});
    CHECK_FALSE(shuffled.sequential());
    CHECK_NOTHROW(ckpt::validate(plan_with(source, shuffled)));

    // Two strided copies interleaving 4 output rows of 8 bytes (Megatron dim-1 glue).
    PlannedRecord glued = record_of(32, {rows_copy(0, 0, 4, 0, 8, 4, 4), rows_copy(0, 16, 4, 4, 8, 4, 4)});
    CHECK_FALSE(glued.sequential());
    CHECK_NOTHROW(ckpt::validate(plan_with(source, glued)));

    // Copies that straddle what were output rows of a dim-1 glue (8 bytes here),
    // plain or strided: records have no rows any more (the executor cuts copies
    // wherever its pieces end), so only the tiling counts.
    PlannedRecord crossing = record_of(16, {copy(0, 0, 0, 4), copy(0, 4, 4, 8), copy(0, 12, 12, 4)});
    CHECK(crossing.sequential());
    CHECK_NOTHROW(ckpt::validate(plan_with(source, crossing)));
    PlannedRecord crossing_rows = record_of(24, {rows_copy(0, 0, 10, 0, 12, 6, 2), rows_copy(0, 50, 10, 6, 12, 6, 2)});
    CHECK_FALSE(crossing_rows.sequential());
    CHECK_NOTHROW(ckpt::validate(plan_with(source, crossing_rows)));

    // A strided copy that converts: source stride in source bytes, sizes in
    // destination bytes (3 rows of 2 float16 from rows of 2 float32, 20 apart).
    Piece converting = rows_copy(0, 0, 20, 0, 4, 4, 3);
    converting.source_dtype = ckpt::DType::Float32;
    converting.dest_dtype = ckpt::DType::Float16;
    CHECK(converting.source_nbytes() == 8);
    CHECK_NOTHROW(ckpt::validate(plan_with(source, record_of(12, {converting}))));
  }

  TEST_CASE("validate rejects broken plans as internal errors, naming the output file and record") {
    TempFile file(100);
    ckpt::MappedFile source(file.path());
    struct Case {
      const char* what;
      PlannedRecord record;
      const char* message;
    };
    PlannedRecord bad_inline;
    bad_inline.name = "archive/version";
    bad_inline.inline_bytes = {std::byte{'3'}};
    bad_inline.nbytes = 2;
    Piece converting = copy(0, 0, 0, 60);  // 30 float16 elements from 30 float32 = 120 source bytes
    converting.source_dtype = ckpt::DType::Float32;
    converting.dest_dtype = ckpt::DType::Float16;
    Piece partial = copy(0, 0, 0, 3);  // 1.5 float16 elements
    partial.source_dtype = ckpt::DType::Float32;
    partial.dest_dtype = ckpt::DType::Float16;
    const Case cases[] = {
        {"gap between copies", record_of(30, {copy(0, 0, 0, 10), copy(0, 20, 20, 10)}),
         "cover 20 bytes of a 30-byte record"},
        {"gap hidden by an overlap", record_of(30, {copy(0, 0, 0, 10), copy(0, 0, 5, 10), copy(0, 20, 20, 10)}),
         "gap or overlap at offset 5"},
        {"overlapping copies", record_of(15, {copy(0, 0, 0, 10), copy(0, 20, 5, 10)}),
         "cover 20 bytes of a 15-byte record"},
        {"first copy not at 0", record_of(10, {copy(0, 0, 1, 9)}), "cover 9 bytes of a 10-byte record"},
        {"copy past the end of the record", record_of(5, {copy(0, 0, 0, 10)}), "past the end of the record"},
        {"copy past the end of the source", record_of(20, {copy(0, 90, 0, 20)}), "past the end of its source"},
        {"copy starting past the end of the source", record_of(1, {copy(0, 100, 0, 1)}), "past the end of its source"},
        {"strided copy whose last row leaves the source", record_of(30, {rows_copy(0, 20, 40, 0, 10, 10, 3)}),
         "past the end of its source"},
        {"converting copy whose source bytes leave the source", record_of(60, {converting}),
         "past the end of its source"},
        {"conversion of half an element", record_of(3, {partial}), "partial elements"},
        {"rows that overlap each other", record_of(20, {rows_copy(0, 0, 10, 0, 5, 10, 2)}), "rows of a copy overlap"},
        {"empty copy", record_of(0, {copy(0, 0, 0, 0)}), "empty copy"},
        {"unknown source", record_of(10, {copy(1, 0, 0, 10)}), "unknown source"},
        {"inline bytes of the wrong size", bad_inline, "inline bytes do not match"},
    };
    for (const Case& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      Plan plan = plan_with(source, c.record);
      bool threw = false;
      try {
        ckpt::validate(plan);
      } catch (const ckpt::InternalError& e) {
        threw = true;
        std::string message = e.what();
        CAPTURE(message);
        CHECK(message.find(c.message) != std::string::npos);
        CHECK(message.find("invalid plan: /tmp/never-written.pt: " + c.record.name + ": ") != std::string::npos);
      }
      CHECK(threw);
    }
  }

  TEST_CASE("validate rejects a copy whose source end overflows 64 bits") {
    // Regression test for a bug found by this test (fixed).
    TempFile file(100);
    ckpt::MappedFile source(file.path());
    Plan plan = plan_with(source, record_of(16, {copy(0, ~std::uint64_t{0} - 7, 0, 16)}));
    CHECK_THROWS_WITH_AS(ckpt::validate(plan), doctest::Contains("past the end of its source"), ckpt::InternalError);
    PlannedRecord strided = record_of(24, {rows_copy(0, 0, std::uint64_t{1} << 63, 0, 8, 8, 3)});
    CHECK_THROWS_WITH_AS(ckpt::validate(plan_with(source, strided)), doctest::Contains("past the end of its source"),
                         ckpt::InternalError);
  }

  TEST_CASE("validate rejects destination ranges that wrap around 64 bits") {
    TempFile file(100);
    ckpt::MappedFile source(file.path());
    // A copy at destination 2^64 - 4 "ends" at 0 and would pass a naive end check;
    // the tiling check has to catch it.
    Plan plan = plan_with(
        source, record_of(14, {copy(Piece::kZeros, 0, 0, 10), copy(Piece::kZeros, 0, ~std::uint64_t{0} - 3, 4)}));
    CHECK_THROWS_AS(ckpt::validate(plan), ckpt::InternalError);
  }

}  // TEST_SUITE
