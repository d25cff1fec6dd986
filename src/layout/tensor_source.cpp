#include "ckpt/layout/tensor_source.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

// One row of a piece, as a plain piece.
Piece row_of(const Piece& piece, std::uint64_t row) {
  Piece out = piece;
  out.rows = 1;
  out.offset = piece.offset + row * piece.stride;
  if (piece.source != Piece::kZeros) out.source_offset = piece.source_offset + row * piece.source_stride;
  out.source_stride = out.stride = 0;
  return out;
}

// Bytes [from, to) of a plain piece (logical offsets), keeping their offsets.
Piece cut(const Piece& piece, std::uint64_t from, std::uint64_t to) {
  Piece out = piece;
  if (piece.source != Piece::kZeros) out.source_offset += from - piece.offset;
  out.offset = from;
  out.nbytes = to - from;
  return out;
}

// Splits a piece so that every output piece's rows each lie inside one row of
// size `row_bytes` of the tensor, at the same column when it has several rows.
void align_to_rows(const Piece& piece, std::uint64_t row_bytes, std::vector<Piece>& out) {
  if (piece.rows > 1) {
    bool aligned = piece.stride == row_bytes && piece.offset % row_bytes + piece.nbytes <= row_bytes;
    if (aligned) {
      out.push_back(piece);
    } else {
      for (std::uint64_t r = 0; r < piece.rows; ++r) align_to_rows(row_of(piece, r), row_bytes, out);
    }
    return;
  }
  std::uint64_t begin = piece.offset;
  std::uint64_t end = piece.offset + piece.nbytes;
  std::uint64_t first_boundary = (begin + row_bytes - 1) / row_bytes * row_bytes;
  if (first_boundary >= end || (first_boundary == begin && end - begin < row_bytes)) {
    // Within one row, or less than one row.
    std::uint64_t split = std::min(end, (begin / row_bytes + 1) * row_bytes);
    out.push_back(cut(piece, begin, split));
    if (split < end) out.push_back(cut(piece, split, end));
    return;
  }
  if (first_boundary > begin) out.push_back(cut(piece, begin, first_boundary));
  std::uint64_t full_rows = (end - first_boundary) / row_bytes;
  if (full_rows > 0) {
    Piece rows = cut(piece, first_boundary, first_boundary + row_bytes);
    rows.rows = full_rows;
    rows.stride = row_bytes;
    rows.source_stride = piece.source == Piece::kZeros ? 0 : row_bytes;
    out.push_back(rows);
  }
  std::uint64_t tail = first_boundary + full_rows * row_bytes;
  if (tail < end) out.push_back(cut(piece, tail, end));
}

void sort_pieces(std::vector<Piece>& pieces) {
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
}

std::uint64_t row_bytes_of(const TensorSource& source, std::uint64_t rows) {
  check_invariant(rows != 0 && source.nbytes() % rows == 0, "rows do not divide a tensor");
  return source.nbytes() / rows;
}

}  // namespace

std::uint64_t TensorSource::numel() const {
  std::uint64_t count = 1;
  for (std::int64_t d : shape) count *= static_cast<std::uint64_t>(d);
  return count;
}

TensorSource TensorSource::slice(std::uint64_t begin, std::uint64_t count, std::vector<std::int64_t> new_shape) const {
  TensorSource out;
  out.dtype = dtype;
  out.shape = std::move(new_shape);
  check_invariant(out.nbytes() == count, "slice size does not match its shape");
  check_invariant(begin + count <= nbytes(), "slice past the end of a tensor");
  std::uint64_t end = begin + count;
  std::vector<Piece> pieces;
  auto shifted = [&](Piece piece) {
    piece.offset -= begin;
    return piece;
  };
  for (const Piece& piece : this->pieces) {
    if (piece.end() <= begin || piece.offset >= end) continue;
    if (piece.rows == 1) {
      pieces.push_back(shifted(cut(piece, std::max(begin, piece.offset), std::min(end, piece.end()))));
      continue;
    }
    // Rows fully inside [begin, end) stay one strided piece; the (at most two)
    // rows cut by the boundaries become plain pieces.
    const std::uint64_t n = piece.nbytes;
    const std::uint64_t stride = piece.stride;
    auto row_start = [&](std::uint64_t r) { return piece.offset + r * stride; };
    auto partial = [&](std::uint64_t r) {
      std::uint64_t from = std::max(begin, row_start(r));
      std::uint64_t to = std::min(end, row_start(r) + n);
      if (from < to) pieces.push_back(shifted(cut(row_of(piece, r), from, to)));
    };
    std::uint64_t touched_lo = begin < piece.offset + n ? 0 : (begin - piece.offset - n) / stride + 1;
    std::uint64_t touched_hi = std::min(piece.rows - 1, (end - 1 - piece.offset) / stride);  // inclusive
    std::uint64_t full_lo = begin <= piece.offset ? 0 : (begin - piece.offset + stride - 1) / stride;
    std::uint64_t full_hi = end >= piece.offset + n ? std::min(piece.rows, (end - piece.offset - n) / stride + 1) : 0;
    if (full_lo >= full_hi) {
      for (std::uint64_t r = touched_lo; r <= touched_hi; ++r) partial(r);
      continue;
    }
    for (std::uint64_t r = touched_lo; r < full_lo; ++r) partial(r);
    Piece inside = piece;
    inside.offset = row_start(full_lo);
    if (piece.source != Piece::kZeros) inside.source_offset = piece.source_offset + full_lo * piece.source_stride;
    inside.rows = full_hi - full_lo;
    if (inside.rows == 1) inside.stride = inside.source_stride = 0;
    pieces.push_back(shifted(inside));
    for (std::uint64_t r = full_hi; r <= touched_hi; ++r) partial(r);
  }
  sort_pieces(pieces);
  for (const Piece& piece : pieces) append_piece(out.pieces, piece);
  return out;
}

TensorSource TensorSource::columns(std::uint64_t rows, std::uint64_t begin, std::uint64_t count,
                                   std::vector<std::int64_t> new_shape) const {
  TensorSource out;
  out.dtype = dtype;
  out.shape = std::move(new_shape);
  std::uint64_t row_bytes = row_bytes_of(*this, rows);
  check_invariant(begin + count <= row_bytes && out.nbytes() == count * rows, "columns outside the rows");
  std::vector<Piece> aligned;
  for (const Piece& piece : pieces) align_to_rows(piece, row_bytes, aligned);
  std::vector<Piece> result;
  for (const Piece& piece : aligned) {
    std::uint64_t row = piece.offset / row_bytes;
    std::uint64_t column = piece.offset % row_bytes;
    std::uint64_t from = std::max(column, begin);
    std::uint64_t to = std::min(column + piece.nbytes, begin + count);
    if (from >= to) continue;
    Piece kept = piece;
    if (piece.source != Piece::kZeros) kept.source_offset += from - column;
    kept.offset = row * count + (from - begin);
    kept.nbytes = to - from;
    kept.stride = piece.rows > 1 ? count : 0;
    result.push_back(kept);
  }
  sort_pieces(result);
  for (const Piece& piece : result) append_piece(out.pieces, piece);
  return out;
}

TensorSource concat(const std::vector<TensorSource>& parts, std::vector<std::int64_t> shape) {
  TensorSource out;
  out.shape = std::move(shape);
  if (!parts.empty()) out.dtype = parts.front().dtype;
  std::uint64_t base = 0;
  for (const TensorSource& part : parts) {
    check_invariant(part.dtype == out.dtype, "concatenating tensors of different dtypes");
    for (Piece piece : part.pieces) {
      piece.offset += base;
      append_piece(out.pieces, piece);
    }
    base += part.nbytes();
  }
  check_invariant(base == out.nbytes(), "concatenation does not match its shape");
  return out;
}

TensorSource interleave_rows(const std::vector<TensorSource>& parts, std::uint64_t rows,
                             std::vector<std::int64_t> shape) {
  TensorSource out;
  out.shape = std::move(shape);
  if (!parts.empty()) out.dtype = parts.front().dtype;
  std::uint64_t out_row = 0;
  for (const TensorSource& part : parts) out_row += row_bytes_of(part, rows);
  check_invariant(out_row * rows == out.nbytes(), "interleaved rows do not match their shape");
  std::vector<Piece> result;
  std::uint64_t column = 0;
  for (const TensorSource& part : parts) {
    check_invariant(part.dtype == out.dtype, "interleaving tensors of different dtypes");
    std::uint64_t part_row = row_bytes_of(part, rows);
    std::vector<Piece> aligned;
    for (const Piece& piece : part.pieces) align_to_rows(piece, part_row, aligned);
    for (Piece piece : aligned) {
      std::uint64_t row = piece.offset / part_row;
      piece.offset = row * out_row + column + piece.offset % part_row;
      piece.stride = piece.rows > 1 ? out_row : 0;
      result.push_back(piece);
    }
    column += part_row;
  }
  sort_pieces(result);
  for (const Piece& piece : result) append_piece(out.pieces, piece);
  return out;
}

TensorSource zeros_source(DType dtype, std::vector<std::int64_t> shape) {
  TensorSource out;
  out.dtype = dtype;
  out.shape = std::move(shape);
  Piece zeros;
  zeros.nbytes = out.nbytes();
  append_piece(out.pieces, zeros);
  return out;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

void untie(NamedTensor& tie, const NamedTensor& target) {
  tie.source = target.source;
  tie.kind = target.kind;
  tie.convert_to = target.convert_to;
  tie.alias_of.reset();
}

}  // namespace ckpt
