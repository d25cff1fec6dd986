// Unit tests for the sharding rules of src/layout/metaseq.cpp: the MP part and DP
// shard in a file name, and fairscale's FSDP chunk-and-pad rule. Pure functions:
// no file is touched.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/layout/metaseq.hpp"

namespace {

struct RoleCase {
  const char* path;
  std::optional<int> mp_part;
  std::optional<int> dp_shard;
};

}  // namespace

TEST_SUITE("layout") {
  TEST_CASE("parse_file_role: MP part and DP shard from metaseq file names") {
    const RoleCase cases[] = {
        {"checkpoint_last-model_part-3-shard7.pt", 3, 7},
        {"checkpoint_12-model_part-0-shard0.pt", 0, 0},
        {"checkpoint_last-shard2.pt", std::nullopt, 2},
        {"reshard-model_part-1.pt", 1, std::nullopt},
        {"model.pt", std::nullopt, std::nullopt},
        {"checkpoint_last-model_part-10-shard11.pt", 10, 11},
        {"/data/run/checkpoint_last-model_part-1-shard5.pt", 1, 5},
        // Only the file name counts: directories named like shards do not.
        {"/ckpt/shard3/model.pt", std::nullopt, std::nullopt},
        {"runs/model_part-4/shard3/consolidated.pt", std::nullopt, std::nullopt},
        {"shard3/checkpoint_last-model_part-2.pt", 2, std::nullopt},
        // "reshard" is not "shard", "model_parts" is not "model_part".
        {"reshard.pt", std::nullopt, std::nullopt},
        {"checkpoint-model_parts-3.pt", std::nullopt, std::nullopt},
        {"checkpoint-shardX.pt", std::nullopt, std::nullopt},
        // Numbers must end at a separator.
        {"checkpoint-shard7b.pt", std::nullopt, std::nullopt},
        {"checkpoint_last-model_part-3x-shard1.pt", std::nullopt, 1},
        // Leading zeros, and the number at the very end of the name.
        {"checkpoint_last-model_part-07-shard007.pt", 7, 7},
        {"model_part-2", 2, std::nullopt},
        {"shard9", std::nullopt, 9},
        // Numbers too long for an int are ignored rather than overflowing.
        {"checkpoint-model_part-99999999999-shard1.pt", std::nullopt, 1},
    };
    for (const RoleCase& c : cases) {
      std::string path = c.path;
      CAPTURE(path);
      ckpt::FileRole role = ckpt::parse_file_role(c.path);
      CHECK(role.mp_part == c.mp_part);
      CHECK(role.dp_shard == c.dp_shard);
    }
  }

  TEST_CASE("fsdp_chunk: fairscale's chunk-and-pad rule") {
    struct Want {
      std::int64_t begin, numel, padding;
    };
    struct Case {
      std::int64_t numel;
      int world_size;
      std::vector<Want> ranks;
    };
    const Case cases[] = {
        // chunk 2: ranks hold 2, 2, 1 (+1 pad), 0 (+2 pad)
        {5, 4, {{0, 2, 0}, {2, 2, 0}, {4, 1, 1}, {5, 0, 2}}},
        // chunk 7: rank 7 is pure padding
        {49, 8, {{0, 7, 0}, {7, 7, 0}, {14, 7, 0}, {21, 7, 0}, {28, 7, 0}, {35, 7, 0}, {42, 7, 0}, {49, 0, 7}}},
        // chunk 2: torch.chunk gives 5 chunks for 8 ranks; ranks 5-7 hold padding only
        {9, 8, {{0, 2, 0}, {2, 2, 0}, {4, 2, 0}, {6, 2, 0}, {8, 1, 1}, {9, 0, 2}, {9, 0, 2}, {9, 0, 2}}},
        // empty parameter: nothing and no padding anywhere
        {0, 3, {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}}},
        // divides evenly
        {12, 3, {{0, 4, 0}, {4, 4, 0}, {8, 4, 0}}},
        // one rank holds everything
        {7, 1, {{0, 7, 0}}},
        // fewer elements than ranks
        {1, 4, {{0, 1, 0}, {1, 0, 1}, {1, 0, 1}, {1, 0, 1}}},
    };
    for (const Case& c : cases) {
      CAPTURE(c.numel);
      CAPTURE(c.world_size);
      REQUIRE(c.ranks.size() == static_cast<std::size_t>(c.world_size));
      std::int64_t chunk = (c.numel + c.world_size - 1) / c.world_size;
      std::int64_t real_total = 0;
      std::int64_t expected_begin = 0;
      for (int rank = 0; rank < c.world_size; ++rank) {
        CAPTURE(rank);
        ckpt::FsdpChunk got = ckpt::fsdp_chunk(c.numel, c.world_size, rank);
        CHECK(got.begin == c.ranks[rank].begin);
        CHECK(got.numel == c.ranks[rank].numel);
        CHECK(got.padding == c.ranks[rank].padding);
        // Every rank's flat parameter has the same length: numel + padding == chunk.
        CHECK(got.numel + got.padding == chunk);
        CHECK(got.numel >= 0);
        CHECK(got.padding >= 0);
        // Ranks tile [0, numel) in order without gaps or overlaps.
        CHECK(got.begin == expected_begin);
        expected_begin = got.begin + got.numel;
        real_total += got.numel;
      }
      CHECK(real_total == c.numel);
    }
  }

  TEST_CASE("fsdp_chunk: invariants over a sweep of sizes") {
    for (std::int64_t numel : {1, 2, 3, 63, 64, 65, 1000, 4097}) {
      for (int world_size : {1, 2, 3, 4, 7, 8, 16, 64}) {
        CAPTURE(numel);
        CAPTURE(world_size);
        std::int64_t chunk = (numel + world_size - 1) / world_size;
        std::int64_t covered = 0;
        bool padded = false;
        for (int rank = 0; rank < world_size; ++rank) {
          ckpt::FsdpChunk got = ckpt::fsdp_chunk(numel, world_size, rank);
          REQUIRE(got.numel + got.padding == chunk);
          REQUIRE(got.begin == covered);
          REQUIRE(got.begin + got.numel <= numel);
          // Padding only at the end: after the first padded rank, no rank holds real data.
          if (padded) REQUIRE(got.numel == 0);
          padded = padded || got.padding > 0;
          covered += got.numel;
        }
        CHECK(covered == numel);
      }
    }
  }

  TEST_CASE("fsdp_chunk: numel near INT64_MAX (from hostile metadata) does not overflow") {
    // Regression test for a bug found by this test (fixed).
    constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
    ckpt::FsdpChunk first = ckpt::fsdp_chunk(kMax, 2, 0);
    ckpt::FsdpChunk second = ckpt::fsdp_chunk(kMax, 2, 1);
    CHECK(first.begin == 0);
    CHECK(first.numel == (std::int64_t{1} << 62));
    CHECK(first.padding == 0);
    CHECK(second.begin == (std::int64_t{1} << 62));
    CHECK(second.numel == (std::int64_t{1} << 62) - 1);
    CHECK(second.padding == 1);
  }

}  // TEST_SUITE
