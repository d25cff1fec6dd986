// Unit tests for split_job (src/exec/job_exec.cpp): every unit of every output
// written by exactly one rank, the shares even by bytes.
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "ckpt/exec/job_exec.hpp"

using ckpt::FilePart;
using ckpt::JobSplit;
using ckpt::kUnitBytes;

namespace {

// Checks what every split must be, and returns it.
JobSplit checked_split(const std::vector<std::uint64_t>& sizes, int ranks) {
  JobSplit split = ckpt::split_job(sizes, ranks);
  REQUIRE(split.whole.size() == static_cast<std::size_t>(ranks));
  REQUIRE(split.parts.size() == static_cast<std::size_t>(ranks));
  // Each file is one rank's whole, or shared and cut into parts covering its units once.
  std::vector<int> whole_of(sizes.size(), 0);
  for (const auto& files : split.whole) {
    for (std::size_t k : files) ++whole_of.at(k);
  }
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    bool shared = std::binary_search(split.shared.begin(), split.shared.end(), k);
    CHECK(whole_of[k] + (shared ? 1 : 0) == 1);
    if (!shared) continue;
    std::vector<FilePart> parts;
    for (const auto& rank_parts : split.parts) {
      for (const FilePart& part : rank_parts) {
        if (part.file == k) parts.push_back(part);
      }
    }
    CHECK(parts.size() >= 2);
    std::uint64_t next = 0;
    for (const FilePart& part : parts) {  // in rank order: ascending units
      CHECK(part.first_unit == next);
      CHECK(part.end_unit > part.first_unit);
      next = part.end_unit;
    }
    CHECK(next == ckpt::unit_count(sizes[k]));
  }
  std::uint64_t total = std::accumulate(sizes.begin(), sizes.end(), std::uint64_t{0});
  CHECK(std::accumulate(split.bytes.begin(), split.bytes.end(), std::uint64_t{0}) == total);
  return split;
}

}  // namespace

TEST_SUITE("job_split") {
  TEST_CASE("one large file: cut in units between every rank, each within a unit of its share") {
    std::vector<std::uint64_t> sizes{100 * kUnitBytes + 12345};
    for (int ranks : {1, 2, 3, 4, 7}) {
      JobSplit split = checked_split(sizes, ranks);
      CHECK(split.shared.size() == (ranks > 1 ? 1u : 0u));
      for (std::uint64_t bytes : split.bytes) {
        CHECK(bytes + kUnitBytes >= sizes[0] / static_cast<std::uint64_t>(ranks));
        CHECK(bytes <= sizes[0] / static_cast<std::uint64_t>(ranks) + kUnitBytes);
      }
    }
  }

  TEST_CASE("many small files: whole, in order, each rank near its share; at most ranks - 1 shared") {
    std::vector<std::uint64_t> sizes(2048, 270 * 1024);
    for (int ranks : {2, 3, 4}) {
      JobSplit split = checked_split(sizes, ranks);
      CHECK(split.shared.empty());  // none reaches past a unit
      std::uint64_t share = 2048ull * 270 * 1024 / static_cast<std::uint64_t>(ranks);
      for (std::uint64_t bytes : split.bytes) CHECK(bytes <= share + 270 * 1024);
      for (const auto& files : split.whole) CHECK(std::is_sorted(files.begin(), files.end()));
    }
    std::vector<std::uint64_t> mixed{3 * kUnitBytes, 1, 0, 40 * kUnitBytes, 5, 9 * kUnitBytes + 7};
    for (int ranks : {2, 3, 4, 8}) {
      JobSplit split = checked_split(mixed, ranks);
      CHECK(split.shared.size() <= static_cast<std::size_t>(ranks - 1));
    }
  }

  TEST_CASE("nothing to write, or more ranks than units: every file still written once") {
    checked_split({}, 3);
    checked_split({0, 0}, 2);
    JobSplit split = checked_split({kUnitBytes, 10}, 16);
    CHECK(split.shared.empty());
    JobSplit two = checked_split({2 * kUnitBytes}, 16);
    CHECK(two.shared.size() == 1);
  }
}
