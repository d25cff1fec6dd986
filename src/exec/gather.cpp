#include "ckpt/exec/gather.hpp"

#include <algorithm>
#include <cstring>

#include "ckpt/exec/source_check.hpp"
#include "ckpt/exec/synthetic.hpp"
#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

// `count` destination bytes of `op` whose source starts at byte `source_offset`
// (for mapped sources, `source` points at those bytes).
void copy_part(const Piece& op, const std::byte* source, std::uint64_t source_offset, std::uint64_t count,
               const PieceSources& from, std::byte* dest) {
  if (op.source == Piece::kZeros) {
    std::memset(dest, 0, count);
    return;
  }
  if (op.source == Piece::kSynthetic) {
    synthesize(op.dest_dtype, source_offset, count, dest);
    return;
  }
  if (!op.converts()) {
    std::memcpy(dest, source, count);
    return;
  }
  check_invariant(from.convert != nullptr && static_cast<bool>(*from.convert),
                  "a piece converts dtypes but no converter was given");
  (*from.convert)(op.source_dtype, op.dest_dtype, source, dest, count / dtype_info(op.dest_dtype).itemsize);
}

// Fills destination bytes [begin, end) (at `dest`) with what `op` puts there.
void gather_piece(const Piece& op, std::uint64_t begin, std::uint64_t end, const PieceSources& from, std::byte* dest) {
  thread_local std::vector<std::byte> scratch;
  std::uint64_t first_row = 0;
  if (op.rows > 1 && begin > op.offset) first_row = (begin - op.offset) / op.stride;
  // (the row that starts before the window may also end before it)
  if (op.offset + first_row * op.stride + op.nbytes <= begin) ++first_row;
  std::uint64_t end_row = first_row;  // one past the last row reaching the window
  while (end_row < op.rows && op.offset + end_row * op.stride < end) ++end_row;
  if (first_row >= end_row) return;
  // The part of row r inside the window: destination [from, to), source from `source_at`.
  auto clip = [&](std::uint64_t r) {
    std::uint64_t row_dest = op.offset + r * op.stride;
    return std::pair{std::max(row_dest, begin), std::min(row_dest + op.nbytes, end)};
  };
  auto source_at = [&](std::uint64_t r, std::uint64_t at) {
    return op.source_offset + r * op.source_stride + op.source_bytes(at - (op.offset + r * op.stride));
  };
  check_invariant(!op.mapped() || op.source < from.files.size(), "a piece reads from an unknown source");
  if (op.mapped() && op.plain()) {
    auto [row_from, row_to] = clip(0);
    std::byte* out = dest + (row_from - begin);
    from.files[op.source]->read_at(source_at(0, row_from), out, row_to - row_from);
    if (from.check != nullptr) from.check->note(op.source, source_at(0, row_from), Bytes(out, row_to - row_from));
    return;
  }
  std::uint64_t read_begin = 0;  // source bytes [read_begin, ...) read ahead into scratch
  bool read_ahead = false;
  if (op.mapped()) {
    std::uint64_t first_from = clip(first_row).first;
    auto [last_from, last_to] = clip(end_row - 1);
    read_begin = source_at(first_row, first_from);
    std::uint64_t read_end = source_at(end_row - 1, last_from) + op.source_bytes(last_to - last_from);
    std::uint64_t useful = 0;
    for (std::uint64_t r = first_row; r < end_row; ++r) useful += clip(r).second - clip(r).first;
    if (read_end - read_begin <= 4 * useful + 4096) {
      scratch.resize(read_end - read_begin);
      from.files[op.source]->read_at(read_begin, scratch.data(), scratch.size());
      if (from.check != nullptr) from.check->note(op.source, read_begin, scratch);
      read_ahead = true;
    }
  }
  for (std::uint64_t r = first_row; r < end_row; ++r) {
    auto [row_from, row_to] = clip(r);
    if (row_from >= row_to) continue;
    const std::byte* source = nullptr;
    if (op.mapped()) {
      std::uint64_t at = source_at(r, row_from);
      source = read_ahead ? scratch.data() + (at - read_begin) : from.files[op.source]->bytes().data() + at;
    }
    copy_part(op, source, source_at(r, row_from), row_to - row_from, from, dest + (row_from - begin));
  }
}

}  // namespace

void gather(std::span<const Piece> pieces, std::uint64_t begin, std::uint64_t end, const PieceSources& from,
            std::byte* dest) {
  for (const Piece& op : pieces) {
    if (op.end() <= begin || op.offset >= end) continue;
    gather_piece(op, begin, end, from, dest);
  }
}

void read_source_bytes(const TensorSource& source, const std::vector<const MappedFile*>& files, std::uint64_t begin,
                       std::uint64_t count, std::byte* out) {
  check_invariant(begin + count <= source.nbytes(), "read past the end of a tensor");
  TensorSource window =
      source.slice(begin, count, {static_cast<std::int64_t>(count / dtype_info(source.dtype).itemsize)});
  // A TensorSource's pieces take its dtype (what synthetic pieces generate).
  for (Piece& piece : window.pieces) piece.source_dtype = piece.dest_dtype = source.dtype;
  gather(window.pieces, 0, count, PieceSources{files}, out);
}

}  // namespace ckpt
