#include "ckpt/layout/boxes.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

// Pairs of boxes whose first dimensions overlap compared before giving up: a
// real checkpoint compares a few per box; a crafted one could ask for n^2.
constexpr std::uint64_t kMaxBoxComparisons = 50'000'000;

bool boxes_intersect(const Box& a, const Box& b) {
  for (std::size_t d = 0; d < a.offsets.size(); ++d) {
    if (std::max(a.offsets[d], b.offsets[d]) >= std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]))
      return false;
  }
  return true;
}

}  // namespace

std::string box_text(const Box& box) {
  std::vector<std::string> ranges;
  for (std::size_t d = 0; d < box.offsets.size() && d < box.sizes.size(); ++d)
    ranges.push_back(fmt::format("{}:{}", box.offsets[d], box.offsets[d] + box.sizes[d]));
  return fmt::format("[{}]", fmt::join(ranges, ", "));
}

std::optional<std::string> tiling_problem(const std::vector<std::int64_t>& shape, const std::vector<Box>& boxes) {
  const std::size_t rank = shape.size();
  std::uint64_t numel = 1;
  for (std::int64_t extent : shape) {
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(std::max<std::int64_t>(extent, 0)), &numel))
      return "a shape whose element count passes 64 bits";
  }
  std::uint64_t covered = 0;        // saturates: more than numel means an overlap, found below
  std::vector<std::size_t> filled;  // the boxes that hold elements
  for (std::size_t i = 0; i < boxes.size(); ++i) {
    const Box& box = boxes[i];
    if (box.offsets.size() != rank || box.sizes.size() != rank) {
      return fmt::format("box {} has {} and {} dimensions, the tensor {}", i, box.offsets.size(), box.sizes.size(),
                         rank);
    }
    std::uint64_t volume = 1;  // at most numel: inside the shape
    for (std::size_t d = 0; d < rank; ++d) {
      if (box.offsets[d] < 0 || box.sizes[d] < 0) return fmt::format("box {} has a negative offset or size", i);
      if (box.offsets[d] > shape[d] || box.sizes[d] > shape[d] - box.offsets[d]) {
        return fmt::format("box {} {} reaches outside the shape [{}]", i, box_text(box), fmt::join(shape, ", "));
      }
      volume *= static_cast<std::uint64_t>(box.sizes[d]);
    }
    if (volume == 0) continue;
    covered = covered > UINT64_MAX - volume ? UINT64_MAX : covered + volume;
    filled.push_back(i);
  }
  // Overlaps: boxes in order of their first dimension, each compared with the
  // boxes still open there.
  auto begin0 = [&](std::size_t i) { return rank == 0 ? 0 : boxes[i].offsets[0]; };
  auto end0 = [&](std::size_t i) { return rank == 0 ? 1 : boxes[i].offsets[0] + boxes[i].sizes[0]; };
  std::stable_sort(filled.begin(), filled.end(), [&](std::size_t a, std::size_t b) { return begin0(a) < begin0(b); });
  std::vector<std::size_t> open;
  std::uint64_t comparisons = 0;
  for (std::size_t i : filled) {
    std::erase_if(open, [&](std::size_t j) { return end0(j) <= begin0(i); });
    for (std::size_t j : open) {
      if (++comparisons > kMaxBoxComparisons) {
        return fmt::format("more than {} pairs of boxes share rows: too many to check for overlaps",
                           kMaxBoxComparisons);
      }
      if (boxes_intersect(boxes[i], boxes[j])) {
        return fmt::format("box {} {} overlaps box {} {}", std::max(i, j), box_text(boxes[std::max(i, j)]),
                           std::min(i, j), box_text(boxes[std::min(i, j)]));
      }
    }
    open.push_back(i);
  }
  if (covered != numel) {
    return fmt::format("the boxes cover {} of its {} elements", covered, numel);
  }
  return std::nullopt;
}

TensorSource assemble_boxes(DType dtype, const std::vector<std::int64_t>& shape, const std::vector<Box>& boxes,
                            const std::vector<TensorSource>& parts) {
  check_invariant(boxes.size() == parts.size(), "assemble_boxes: one part per box");
  if (std::optional<std::string> problem = tiling_problem(shape, boxes)) {
    internal_error("assemble_boxes: the boxes do not tile the tensor: " + *problem);
  }
  TensorSource out;
  out.dtype = dtype;
  out.shape = shape;
  const std::uint64_t itemsize = dtype_info(dtype).itemsize;
  const std::size_t rank = shape.size();
  std::vector<std::uint64_t> stride(rank, 1);  // of the whole tensor, in elements
  for (std::size_t d = rank; d-- > 1;) stride[d - 1] = stride[d] * static_cast<std::uint64_t>(shape[d]);
  for (std::size_t i = 0; i < boxes.size(); ++i) {
    const Box& box = boxes[i];
    const TensorSource& part = parts[i];
    check_invariant(part.dtype == dtype && part.shape == box.sizes, "assemble_boxes: a part that is not its box");
    if (part.nbytes() == 0) continue;
    // Dimensions after k are whole in the box: one run of the tensor per index
    // of the dimensions before k. The box is the whole tensor when k < 0.
    std::ptrdiff_t k = static_cast<std::ptrdiff_t>(rank) - 1;
    while (k >= 0 && box.sizes[static_cast<std::size_t>(k)] == shape[static_cast<std::size_t>(k)]) --k;
    if (k < 0) {
      out.pieces.insert(out.pieces.end(), part.pieces.begin(), part.pieces.end());
      continue;
    }
    const auto run = static_cast<std::size_t>(k);
    const std::uint64_t run_bytes = static_cast<std::uint64_t>(box.sizes[run]) * stride[run] * itemsize;
    auto origin = [&](std::size_t d) { return static_cast<std::uint64_t>(box.offsets[d]) * stride[d]; };
    // Runs along dimension `run - 1` are the rows of one piece; the dimensions
    // before it are walked (an odometer over `index`).
    const bool has_rows = run > 0;
    const std::uint64_t rows = has_rows ? static_cast<std::uint64_t>(box.sizes[run - 1]) : 1;
    const std::uint64_t row_stride = has_rows ? stride[run - 1] * itemsize : 0;
    const std::size_t walked = has_rows ? run - 1 : 0;
    const bool one_piece = part.pieces.size() == 1 && part.pieces[0].plain() && part.pieces[0].offset == 0 &&
                           part.pieces[0].nbytes == part.nbytes();
    std::vector<std::int64_t> index(walked, 0);
    std::uint64_t source_at = 0;  // the part's logical bytes used so far
    while (true) {
      std::uint64_t element = origin(run) + (has_rows ? origin(run - 1) : 0);
      for (std::size_t d = 0; d < walked; ++d)
        element += (static_cast<std::uint64_t>(box.offsets[d] + index[d])) * stride[d];
      const std::uint64_t dest = element * itemsize;
      if (one_piece) {
        Piece piece = part.pieces[0];
        if (piece.source != Piece::kZeros) piece.source_offset += source_at;
        piece.offset = dest;
        piece.nbytes = run_bytes;
        piece.rows = rows;
        piece.source_stride = rows > 1 ? run_bytes : 0;
        piece.stride = rows > 1 ? row_stride : 0;
        out.pieces.push_back(piece);
      } else {
        for (std::uint64_t r = 0; r < rows; ++r) {
          TensorSource slice =
              part.slice(source_at + r * run_bytes, run_bytes, {static_cast<std::int64_t>(run_bytes / itemsize)});
          for (Piece piece : slice.pieces) {
            piece.offset += dest + r * row_stride;
            out.pieces.push_back(piece);
          }
        }
      }
      source_at += rows * run_bytes;
      std::size_t d = walked;
      while (d > 0 && ++index[d - 1] == box.sizes[d - 1]) index[--d] = 0;
      if (d == 0) break;
    }
    check_invariant(source_at == part.nbytes(), "assemble_boxes: a part's bytes not all placed");
  }
  std::stable_sort(out.pieces.begin(), out.pieces.end(),
                   [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
  return out;
}

}  // namespace ckpt
