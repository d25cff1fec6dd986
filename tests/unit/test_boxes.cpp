// Unit tests for n-dimensional boxes (src/layout/boxes.cpp): tiling checks and
// a tensor assembled from its boxes, against a byte-by-byte reference.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ckpt/layout/boxes.hpp"
#include "layout_fixtures.hpp"

namespace {

using ckpt::Box;
using ckpt::DType;
using ckpt::Piece;
using ckpt::TensorSource;
using layout_fixtures::Ids;

std::uint64_t volume(const std::vector<std::int64_t>& sizes) {
  std::uint64_t n = 1;
  for (std::int64_t s : sizes) n *= static_cast<std::uint64_t>(s);
  return n;
}

// Boxes that tile `box` exactly: cut along a random dimension, recursively.
void split(const Box& box, std::mt19937& random, int depth, std::vector<Box>& out) {
  std::vector<std::size_t> cuttable;
  for (std::size_t d = 0; d < box.sizes.size(); ++d) {
    if (box.sizes[d] > 1) cuttable.push_back(d);
  }
  if (depth == 0 || cuttable.empty() || random() % 4 == 0) {
    out.push_back(box);
    if (random() % 6 == 0 && !box.sizes.empty()) {  // an empty box on the boundary, as torch writes them
      Box empty = box;
      empty.sizes[0] = 0;
      out.push_back(empty);
    }
    return;
  }
  std::size_t d = cuttable[random() % cuttable.size()];
  std::int64_t at = 1 + static_cast<std::int64_t>(random() % static_cast<std::uint64_t>(box.sizes[d] - 1));
  Box low = box;
  Box high = box;
  low.sizes[d] = at;
  high.offsets[d] += at;
  high.sizes[d] -= at;
  split(low, random, depth - 1, out);
  split(high, random, depth - 1, out);
}

// Box i's bytes in fake file i from byte `base` on: one piece, or (`pieces`)
// cut into several at random points.
TensorSource part_of(const Box& box, DType dtype, std::uint32_t file, std::uint64_t base, bool pieces,
                     std::mt19937& random) {
  TensorSource part;
  part.dtype = dtype;
  part.shape = box.sizes;
  std::uint64_t nbytes = volume(box.sizes) * ckpt::dtype_info(dtype).itemsize;
  std::uint64_t at = 0;
  while (at < nbytes) {
    std::uint64_t n = pieces ? std::min<std::uint64_t>(nbytes - at, 1 + random() % 7) : nbytes;
    Piece piece;
    piece.source = file;
    piece.source_offset = base + at;
    piece.offset = at;
    piece.nbytes = n;
    part.pieces.push_back(piece);
    at += n;
  }
  return part;
}

// Byte identities of the whole tensor, placed element by element.
Ids reference(const std::vector<std::int64_t>& shape, DType dtype, const std::vector<Box>& boxes,
              const std::vector<std::uint64_t>& bases) {
  const std::uint64_t itemsize = ckpt::dtype_info(dtype).itemsize;
  Ids out(volume(shape) * itemsize, layout_fixtures::kUnsetId);
  for (std::size_t i = 0; i < boxes.size(); ++i) {
    const Box& box = boxes[i];
    std::uint64_t count = volume(box.sizes);
    for (std::uint64_t e = 0; e < count; ++e) {
      std::uint64_t rest = e;
      std::uint64_t global = 0;
      std::uint64_t scale = 1;
      for (std::size_t d = shape.size(); d-- > 0;) {
        std::uint64_t local = rest % static_cast<std::uint64_t>(box.sizes[d]);
        rest /= static_cast<std::uint64_t>(box.sizes[d]);
        global += (static_cast<std::uint64_t>(box.offsets[d]) + local) * scale;
        scale *= static_cast<std::uint64_t>(shape[d]);
      }
      for (std::uint64_t b = 0; b < itemsize; ++b) {
        out[global * itemsize + b] = (std::uint64_t{i} << 40) | (bases[i] + e * itemsize + b);
      }
    }
  }
  return out;
}

}  // namespace

TEST_SUITE("boxes") {
  TEST_CASE("boxes: random tilings of 0 to 4 dimensions assemble to the tensor, byte for byte") {
    std::mt19937 random(20261206);
    std::size_t strided = 0;
    for (int round = 0; round < 400; ++round) {
      std::size_t rank = static_cast<std::size_t>(round % 5);
      std::vector<std::int64_t> shape;
      for (std::size_t d = 0; d < rank; ++d) shape.push_back(1 + static_cast<std::int64_t>(random() % 6));
      DType dtype = round % 3 == 0 ? DType::Float32 : (round % 3 == 1 ? DType::BFloat16 : DType::UInt8);
      std::vector<Box> boxes;
      split(Box{std::vector<std::int64_t>(rank, 0), shape}, random, 4, boxes);
      std::shuffle(boxes.begin(), boxes.end(), random);
      CAPTURE(round);
      REQUIRE_FALSE(ckpt::tiling_problem(shape, boxes).has_value());
      std::vector<TensorSource> parts;
      std::vector<std::uint64_t> bases;
      for (std::size_t i = 0; i < boxes.size(); ++i) {
        bases.push_back(64 * (i % 3));
        parts.push_back(part_of(boxes[i], dtype, static_cast<std::uint32_t>(i), bases.back(), round % 2 == 1, random));
      }
      TensorSource whole = ckpt::assemble_boxes(dtype, shape, boxes, parts);
      CHECK(whole.shape == shape);
      for (const Piece& piece : whole.pieces) strided += piece.rows > 1;
      Ids got = layout_fixtures::ids_of(whole);
      Ids want = reference(shape, dtype, boxes, bases);
      CHECK_MESSAGE(layout_fixtures::difference(got, want).empty(), layout_fixtures::difference(got, want));
    }
    CHECK(strided > 50);  // the one-piece path makes strided pieces
  }

  TEST_CASE("boxes: a Shard(1) cut of a tall tensor is one strided piece per box") {
    std::vector<std::int64_t> shape{1000, 12};
    std::vector<Box> boxes{{{0, 0}, {1000, 5}}, {{0, 5}, {1000, 5}}, {{0, 10}, {1000, 2}}};
    std::mt19937 random(1);
    std::vector<TensorSource> parts;
    for (std::size_t i = 0; i < boxes.size(); ++i)
      parts.push_back(part_of(boxes[i], DType::Float32, static_cast<std::uint32_t>(i), 0, false, random));
    TensorSource whole = ckpt::assemble_boxes(DType::Float32, shape, boxes, parts);
    REQUIRE(whole.pieces.size() == 3);
    CHECK(whole.pieces[1].rows == 1000);
    CHECK(whole.pieces[1].offset == 5 * 4);
    CHECK(whole.pieces[1].stride == 12 * 4);
    CHECK(whole.pieces[1].source_stride == 5 * 4);
  }

  TEST_CASE("boxes: what keeps boxes from tiling is named") {
    struct Case {
      const char* what;
      std::vector<std::int64_t> shape;
      std::vector<Box> boxes;
      const char* words;
    };
    const Case cases[] = {
        {"a gap", {4, 4}, {{{0, 0}, {2, 4}}, {{3, 0}, {1, 4}}}, "the boxes cover 12 of its 16 elements"},
        {"an overlap", {4, 4}, {{{0, 0}, {3, 4}}, {{2, 0}, {2, 4}}}, "box 1 [2:4, 0:4] overlaps box 0 [0:3, 0:4]"},
        {"an overlap in the second dimension only", {4, 4}, {{{0, 0}, {4, 3}}, {{0, 2}, {4, 2}}}, "overlaps"},
        {"outside", {4, 4}, {{{0, 0}, {4, 4}}, {{3, 3}, {2, 2}}}, "box 1 [3:5, 3:5] reaches outside the shape [4, 4]"},
        {"a box of another rank", {4, 4}, {{{0}, {4}}}, "box 0 has 1 and 1 dimensions, the tensor 2"},
        {"negative", {4}, {{{-1}, {5}}}, "box 0 has a negative offset or size"},
        {"two boxes of a 0-dim tensor", {}, {{{}, {}}, {{}, {}}}, "box 1 [] overlaps box 0 []"},
        {"no box at all", {2}, {}, "the boxes cover 0 of its 2 elements"},
        {"a shape past 64 bits", {1 << 30, 1 << 30, 1 << 30}, {}, "passes 64 bits"},
    };
    for (const Case& c : cases) {
      CAPTURE(c.what);
      std::optional<std::string> problem = ckpt::tiling_problem(c.shape, c.boxes);
      REQUIRE(problem.has_value());
      CHECK_MESSAGE(problem->find(c.words) != std::string::npos, *problem);
    }
    CHECK_FALSE(ckpt::tiling_problem({}, {{{}, {}}}).has_value());                 // a 0-dim tensor, one box
    CHECK_FALSE(ckpt::tiling_problem({0, 3}, {}).has_value());                     // nothing to cover
    CHECK_FALSE(ckpt::tiling_problem({2}, {{{0}, {2}}, {{2}, {0}}}).has_value());  // an empty box at the end
  }

  TEST_CASE("boxes: assembling boxes that do not tile is a bug of the caller") {
    std::mt19937 random(2);
    Box box{{0}, {3}};
    CHECK_THROWS_AS(
        ckpt::assemble_boxes(DType::Float32, {4}, {box}, {part_of(box, DType::Float32, 0, 0, false, random)}),
        ckpt::InternalError);
  }
}
