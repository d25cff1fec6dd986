// Unit tests for DeepSpeed ZeRO's partition rules (src/layout/zero.cpp): every
// parameter's bytes traced to the rank file and offset they come from, against
// the rules computed element by element here, for random shapes and world
// sizes; and the numel checks zero_to_fp32 makes.
#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ckpt/layout/zero.hpp"
#include "layout_fixtures.hpp"

namespace {

using ckpt::DType;
using ckpt::TensorSource;
using ckpt::ZeroParam;
using layout_fixtures::byte_id;
using layout_fixtures::Ids;
using layout_fixtures::runs_source;

constexpr std::uint64_t kBase = 64;  // where each rank's partition starts in its fake file
constexpr std::uint64_t kItem = 4;   // fp32

std::vector<ZeroParam> random_params(std::mt19937& random, int count) {
  std::vector<ZeroParam> params;
  for (int i = 0; i < count; ++i) {
    std::vector<std::int64_t> shape;
    const int dims = static_cast<int>(random() % 3);
    for (int d = 0; d < dims; ++d) shape.push_back(1 + static_cast<std::int64_t>(random() % 9));
    if (random() % 7 == 0) shape = {0};
    params.push_back({layout_fixtures::cat("p", std::to_string(i)), shape});
  }
  return params;
}

std::uint64_t numel_of(const ZeroParam& param) {
  return ckpt::shape_numel(param.shape).value();
}

// The identities of elements [first, first + count) of a rank-ordered layout
// where element e lives in file where(e).first at element where(e).second.
template <typename Where>
Ids element_ids(std::uint64_t first, std::uint64_t count, Where where) {
  Ids ids;
  for (std::uint64_t e = first; e < first + count; ++e) {
    auto [file, element] = where(e);
    for (std::uint64_t b = 0; b < kItem; ++b) ids.push_back(byte_id(file, kBase + element * kItem + b));
  }
  return ids;
}

}  // namespace

TEST_CASE("ZeRO-1/2: a group's parameters are its ranks' partitions, one after the other") {
  std::mt19937 random(28);
  for (int round = 0; round < 200; ++round) {
    const std::int64_t world = 1 + static_cast<std::int64_t>(random() % 5);
    std::vector<ZeroParam> params = random_params(random, 1 + static_cast<int>(random() % 6));
    std::uint64_t total = 0;
    for (const ZeroParam& param : params) total += numel_of(param);
    const std::uint64_t align = 2 * static_cast<std::uint64_t>(world);
    const std::uint64_t padded = (total + align - 1) / align * align;
    const std::uint64_t size = padded / static_cast<std::uint64_t>(world);
    const bool stripped =
        random() % 2 == 0;  // single_partition_of_fp32_groups strips the padding; BF16_Optimizer keeps it
    std::vector<TensorSource> partitions;
    for (std::int64_t r = 0; r < world; ++r) {
      const std::uint64_t begin = static_cast<std::uint64_t>(r) * size;
      const std::uint64_t kept = stripped ? (begin >= total ? 0 : std::min(size, total - begin)) : size;
      partitions.push_back(runs_source(DType::Float32, {static_cast<std::int64_t>(kept)},
                                       {{static_cast<std::uint32_t>(r), kBase, kept * kItem}}));
      if (kept == 0) partitions.back().pieces.clear();
    }
    ckpt::ZeroUnflattened got = ckpt::zero12_group(partitions, params, world);
    REQUIRE_MESSAGE(!got.problem, *got.problem);
    REQUIRE(got.params.size() == params.size());
    std::uint64_t offset = 0;
    for (std::size_t i = 0; i < params.size(); ++i) {
      CHECK(got.params[i].shape == params[i].shape);
      Ids want = element_ids(offset, numel_of(params[i]), [&](std::uint64_t e) {
        return std::pair{static_cast<std::uint32_t>(e / size), e % size};
      });
      CHECK(layout_fixtures::ids_of(got.params[i]) == want);
      offset += numel_of(params[i]);
    }
  }
}

TEST_CASE("ZeRO-1/2: parameters that do not fill the group to its padding are refused") {
  std::vector<ZeroParam> params{{"a", {5, 3}}, {"b", {7}}};  // 22 elements, padded to 24 over 3 ranks
  auto partitions = [](std::vector<std::uint64_t> sizes) {
    std::vector<TensorSource> out;
    for (std::size_t r = 0; r < sizes.size(); ++r)
      out.push_back(runs_source(DType::Float32, {static_cast<std::int64_t>(sizes[r])},
                                {{static_cast<std::uint32_t>(r), kBase, sizes[r] * kItem}}));
    return out;
  };
  CHECK(!ckpt::zero12_group(partitions({8, 8, 6}), params, 3).problem);
  CHECK(!ckpt::zero12_group(partitions({8, 8, 8}), params, 3).problem);                  // padding kept
  ckpt::ZeroUnflattened more = ckpt::zero12_group(partitions({8, 8, 8, 8}), params, 3);  // a fourth rank's
  REQUIRE(more.problem);
  CHECK(more.problem->find("take 22 elements of the group's 32") != std::string::npos);
  ckpt::ZeroUnflattened fewer = ckpt::zero12_group(partitions({8, 8, 4}), params, 3);
  REQUIRE(fewer.problem);
  CHECK(fewer.problem->find("b [7] needs elements [15, 22) of the group, which holds 20") != std::string::npos);
}

TEST_CASE("ZeRO-3: each parameter is ceil(numel / world) elements of every rank, cut to its numel") {
  std::mt19937 random(3);
  for (int round = 0; round < 200; ++round) {
    const std::int64_t world = 1 + static_cast<std::int64_t>(random() % 5);
    const auto ws = static_cast<std::uint64_t>(world);
    std::vector<ZeroParam> params = random_params(random, 1 + static_cast<int>(random() % 6));
    std::vector<std::uint64_t> per;
    std::uint64_t partitioned = 0;
    for (const ZeroParam& param : params) {
      per.push_back((numel_of(param) + ws - 1) / ws);
      partitioned += per.back();
    }
    // Each rank's elements in two sub-groups, cut at a random place: a
    // parameter's slice may span them. Rank r's sub-group g is file 2r + g.
    const std::uint64_t cut = partitioned == 0 ? 0 : random() % (partitioned + 1);
    std::vector<std::vector<TensorSource>> ranks;
    for (std::uint32_t r = 0; r < ws; ++r) {
      ranks.push_back({runs_source(DType::Float32, {static_cast<std::int64_t>(cut)}, {{2 * r, kBase, cut * kItem}}),
                       runs_source(DType::Float32, {static_cast<std::int64_t>(partitioned - cut)},
                                   {{2 * r + 1, kBase, (partitioned - cut) * kItem}})});
      for (TensorSource& group : ranks.back()) {
        if (group.numel() == 0) group.pieces.clear();
      }
    }
    ckpt::ZeroUnflattened got = ckpt::zero3_params(ranks, params, world);
    REQUIRE_MESSAGE(!got.problem, *got.problem);
    std::uint64_t offset = 0;
    for (std::size_t i = 0; i < params.size(); ++i) {
      Ids want = element_ids(0, numel_of(params[i]), [&](std::uint64_t e) {
        const auto rank = static_cast<std::uint32_t>(e / per[i]);
        const std::uint64_t at = offset + e % per[i];  // in the rank's groups, one after the other
        return at < cut ? std::pair{2 * rank, at} : std::pair{2 * rank + 1, at - cut};
      });
      CHECK(got.params[i].shape == params[i].shape);
      CHECK(layout_fixtures::ids_of(got.params[i]) == want);
      offset += per[i];
    }
  }
}

TEST_CASE("ZeRO-3: a rank whose flat groups hold other than the parameters' slices is refused") {
  std::vector<ZeroParam> params{{"w", {3, 3}}, {"b", {3}}};  // 9 + 3 over 4 ranks: 3 + 1 per rank
  auto rank = [](std::uint32_t file, std::uint64_t numel) {
    return std::vector<TensorSource>{
        runs_source(DType::Float32, {static_cast<std::int64_t>(numel)}, {{file, kBase, numel * kItem}})};
  };
  CHECK(!ckpt::zero3_params({rank(0, 4), rank(1, 4), rank(2, 4), rank(3, 4)}, params, 4).problem);
  ckpt::ZeroUnflattened short_rank = ckpt::zero3_params({rank(0, 4), rank(1, 4), rank(2, 3), rank(3, 4)}, params, 4);
  REQUIRE(short_rank.problem);
  CHECK(short_rank.problem->find("rank 2 holds 3 elements") != std::string::npos);
  ckpt::ZeroUnflattened frozen = ckpt::zero3_frozen(rank(0, 4), {"f", {3, 2}});  // 6 elements from 4
  REQUIRE(frozen.problem);
  CHECK(frozen.problem->find("needs 6 elements, and its fragments hold 4") != std::string::npos);
}
