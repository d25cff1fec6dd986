// Unit tests for plans written down (src/plan/plan_file.cpp): every field comes
// back, and a damaged or hostile plan file is an Error, never a crash or a plan
// that reads outside its sources.
#include <doctest/doctest.h>

#include "plan_sources.hpp"

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/io/crc32.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/zstd.hpp"
#include "ckpt/plan/plan.hpp"
#include "ckpt/plan/plan_file.hpp"

namespace {

using ckpt::Bytes;
using ckpt::DType;
using ckpt::Piece;
using ckpt::Plan;
using ckpt::PlannedRecord;

// A plan using every field: two sources (one without CRCs), plain, strided,
// converting, zero and synthetic copies, inline and compressed-inline records,
// both containers, and the commit steps.
Plan full_plan() {
  Plan plan;
  plan.sources.push_back(
      {"/data/a.pt", 4096, 1700000000123456789, 2049, 77, {{64, 1000, 0xdeadbeef}, {2000, 96, 7}}, true});
  plan.sources.push_back({"/data/b.safetensors", 512, -5, 1, 2, {{8, 504, 0}}, false});
  PlannedRecord inline_record{
      "out/data.pkl", 5, {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4}, std::byte{5}}, {}};
  PlannedRecord copies{"out/data/0", 0, {}, {}};
  copies.append_copy(0, 64, 100);
  copies.append_zeros(28);
  Piece strided;
  strided.source = 0;
  strided.source_offset = 200;
  strided.offset = copies.nbytes;
  strided.nbytes = 8;
  strided.rows = 4;
  strided.source_stride = 16;
  strided.stride = 8;
  copies.copies.push_back(strided);
  copies.nbytes += 32;
  Piece converting;
  converting.source = 1;
  converting.source_offset = 8;
  converting.offset = copies.nbytes;
  converting.nbytes = 8;
  converting.source_dtype = DType::Float16;
  converting.dest_dtype = DType::Float32;
  copies.copies.push_back(converting);
  copies.nbytes += 8;
  PlannedRecord synthetic{"out/data/1", 0, {}, {}};
  Piece generated;
  generated.source = Piece::kSynthetic;
  generated.source_offset = 12;
  generated.nbytes = 16;
  generated.source_dtype = generated.dest_dtype = DType::BFloat16;
  synthetic.copies.push_back(generated);
  synthetic.nbytes = 16;
  PlannedRecord big{"out/version", 70000, std::vector<std::byte>(70000, std::byte{'3'}), {}};
  ckpt::compress_inline(big);
  REQUIRE(big.inline_zstd);
  plan.files.push_back(test_files::planned_file("/out/model.pt", {inline_record, copies, synthetic, big}));
  plan.files.push_back(test_files::planned_file(
      "/out/side.json", {{"side.json", 2, {std::byte{'{'}, std::byte{'}'}}, {}}}, ckpt::Container::Concatenated));
  plan.files.push_back(test_files::planned_file("/out/dcp/__0_0.distcp", {inline_record, copies, inline_record},
                                                ckpt::Container::Archives, {0, 2}));
  plan.directories = {"/out/hf"};
  plan.stale_files = {"/out/model-00001-of-00002.safetensors"};
  plan.read_only = {"/data/m.json.zst"};
  ckpt::validate(plan);
  return plan;
}

Bytes bytes_of(const std::vector<std::byte>& data) {
  return {data.data(), data.size()};
}

// The plan file of `body` (the expanded plan bytes), with a valid header (its CRC).
std::vector<std::byte> with_body(const std::string& body) {
  std::vector<std::byte> file = ckpt::serialize_plan(Plan{});
  file.resize(16);
  std::uint32_t crc = ckpt::crc32(Bytes(reinterpret_cast<const std::byte*>(body.data()), body.size()));
  for (int i = 0; i < 4; ++i) file[12 + i] = static_cast<std::byte>((crc >> (8 * i)) & 0xff);
  std::string compressed = ckpt::zstd_compress(body, {});
  for (char c : compressed) file.push_back(static_cast<std::byte>(c));
  return file;
}

std::string body_of(const std::vector<std::byte>& file) {
  return ckpt::zstd_decompress(bytes_of(file).subspan(16), {}, ckpt::kMaxPlanBytes, "a plan");
}

}  // namespace

TEST_SUITE("plan_file") {
  TEST_CASE("a plan comes back field for field") {
    Plan plan = full_plan();
    std::vector<std::byte> file = ckpt::serialize_plan(plan);
    CHECK(ckpt::parse_plan(bytes_of(file), "p.plan") == plan);
    CHECK(ckpt::parse_plan(bytes_of(ckpt::serialize_plan(Plan{})), "p.plan") == Plan{});
  }

  TEST_CASE("a damaged plan file is an Error at every cut and every flipped byte") {
    std::vector<std::byte> file = ckpt::serialize_plan(full_plan());
    for (std::size_t size = 0; size < file.size(); ++size) {
      CHECK_THROWS_AS(ckpt::parse_plan(bytes_of(file).first(size), "p.plan"), ckpt::Error);
    }
    // The expanded bytes, cut and flipped: each is refused or, where the flip
    // lands on a value any plan may hold, read as a valid plan.
    std::string body = body_of(file);
    for (std::size_t size = 0; size < body.size(); size += 7) {
      CHECK_THROWS_AS(ckpt::parse_plan(bytes_of(with_body(body.substr(0, size))), "p.plan"), ckpt::Error);
    }
    int refused = 0;
    for (std::size_t at = 0; at < body.size(); ++at) {
      for (unsigned char flip : {0x01, 0x80, 0xff}) {
        std::string damaged = body;
        damaged[at] = static_cast<char>(static_cast<unsigned char>(damaged[at]) ^ flip);
        try {
          Plan read = ckpt::parse_plan(bytes_of(with_body(damaged)), "p.plan");
          ckpt::validate(read);  // what was accepted holds every invariant
        } catch (const ckpt::Error&) {
          ++refused;
        }
      }
    }
    CHECK(refused > 0);
  }

  TEST_CASE("a damaged plan is refused by its CRC, whatever byte changed") {
    std::vector<std::byte> file = ckpt::serialize_plan(full_plan());
    std::string body = body_of(file);
    for (std::size_t at = 0; at < body.size(); ++at) {
      std::string damaged = body;
      damaged[at] = static_cast<char>(static_cast<unsigned char>(damaged[at]) ^ 0x01);
      std::vector<std::byte> bad = with_body(damaged);
      std::copy(file.begin() + 12, file.begin() + 16, bad.begin() + 12);  // the CRC of the undamaged plan
      try {
        ckpt::parse_plan(bytes_of(bad), "p.plan");
        FAIL("a damaged plan was read, byte " << at);
      } catch (const ckpt::Error& e) {
        CHECK(e.kind() == ckpt::ErrorKind::CorruptData);
      }
    }
  }

  TEST_CASE("counts larger than the bytes left are refused before anything is allocated") {
    std::string body(8, '\xff');  // 2^64 - 1 sources
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(with_body(body)), "p.plan"),
                         doctest::Contains("more than the plan's"), ckpt::Error);
  }

  TEST_CASE("a plan that would read outside its sources' records is refused as input, not as a bug") {
    Plan plan = full_plan();
    plan.files[0].records[1].copies[0].source_offset = 2;  // before the first record
    std::vector<std::byte> file = ckpt::serialize_plan(plan);
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(file), "p.plan"), doctest::Contains("outside every record"),
                         ckpt::Error);
    plan = full_plan();
    plan.files[0].records[1].copies[0].source = 9;
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(ckpt::serialize_plan(plan)), "p.plan"),
                         doctest::Contains("unknown source"), ckpt::Error);
    plan = full_plan();
    plan.sources[0].records[1].offset = 100;  // overlaps the first
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(ckpt::serialize_plan(plan)), "p.plan"), doctest::Contains("overlap"),
                         ckpt::Error);
  }

  TEST_CASE("header: not a plan, another version") {
    std::vector<std::byte> file = ckpt::serialize_plan(Plan{});
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(file).first(5), "p.plan"), doctest::Contains("not a plan"),
                         ckpt::Error);
    file[8] = std::byte{3};
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(file), "p.plan"), doctest::Contains("format version 3"),
                         ckpt::Error);
  }

  TEST_CASE("packed files: unpacked field for field, written and read packed, checked like the rest") {
    Plan plan = full_plan();
    Plan packed = plan;
    for (ckpt::PlannedFile& file : packed.files) ckpt::pack(file);
    for (std::size_t k = 0; k < plan.files.size(); ++k) {
      REQUIRE(packed.files[k].is_packed());
      CHECK(packed.files[k].records.empty());
      CHECK(ckpt::planned_file_size(packed.files[k]) == ckpt::layout_file(plan.files[k]).file_size);
      CHECK(ckpt::unpack(packed.files[k]) == plan.files[k]);
    }
    CHECK(packed.bytes_to_copy() == plan.bytes_to_copy());
    ckpt::validate(packed);
    Plan back = ckpt::parse_plan(bytes_of(ckpt::serialize_plan(packed)), "p.plan");
    CHECK(back == packed);
    // What the executor writes: unpacked, its compressed pickle expanded.
    std::optional<ckpt::PlannedFile> expanded = ckpt::expand_inline(back.files[0]);
    REQUIRE(expanded.has_value());
    CHECK(expanded->records.size() == plan.files[0].records.size());
    CHECK_FALSE(expanded->records[3].inline_zstd);

    // A packed file whose records say another size than its header, or whose
    // records read outside their sources, is refused as input.
    Plan lying = packed;
    lying.files[0].packed_file_size += 64;
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(ckpt::serialize_plan(lying)), "p.plan"),
                         doctest::Contains("packed records"), ckpt::Error);
    Plan outside = plan;
    outside.files[0].records[1].copies[0].source_offset += 1 << 20;
    ckpt::pack(outside.files[0]);
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(ckpt::serialize_plan(outside)), "p.plan"),
                         doctest::Contains("not a valid plan"), ckpt::Error);
    Plan cut = packed;  // (a damaged file is its CRC's: this one's CRC is made for it)
    cut.files[1].packed.resize(cut.files[1].packed.size() - 3);
    CHECK_THROWS_WITH_AS(ckpt::parse_plan(bytes_of(ckpt::serialize_plan(cut)), "p.plan"), doctest::Contains("zstd"),
                         ckpt::Error);
  }
}

TEST_SUITE("plan_file") {
  TEST_CASE("compressed inline bytes that do not expand to their record's size are refused") {
    Plan plan = full_plan();
    PlannedRecord& big = plan.files[0].records[3];
    std::string other = ckpt::zstd_compress(std::string(69999, '3'), {});
    big.inline_bytes.assign(reinterpret_cast<const std::byte*>(other.data()),
                            reinterpret_cast<const std::byte*>(other.data()) + other.size());
    // Refused whether the frame declares its true size (as here) or the record's.
    CHECK_THROWS_AS(ckpt::parse_plan(bytes_of(ckpt::serialize_plan(plan)), "p.plan"), ckpt::Error);
  }
}
