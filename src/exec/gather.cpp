#include "ckpt/exec/gather.hpp"

#include <algorithm>
#include <cstring>

#include "ckpt/exec/source_check.hpp"
#include "ckpt/exec/synthetic.hpp"
#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

// `count` destination bytes of `piece` whose source starts at byte `source_offset`
// (for mapped sources, `source` points at those bytes).
void copy_part(const Piece& piece, const std::byte* source, std::uint64_t source_offset, std::uint64_t count,
               const PieceSources& from, std::byte* dest) {
  if (piece.source == Piece::kZeros) {
    std::memset(dest, 0, count);
    return;
  }
  if (piece.source == Piece::kSynthetic) {
    synthesize(piece.dest_dtype, source_offset, count, dest);
    return;
  }
  if (!piece.converts()) {
    std::memcpy(dest, source, count);
    return;
  }
  check_invariant(from.convert != nullptr && static_cast<bool>(*from.convert),
                  "a piece converts dtypes but no converter was given");
  (*from.convert)(piece.source_dtype, piece.dest_dtype, source, dest, count / dtype_info(piece.dest_dtype).itemsize);
}

// Fills destination bytes [begin, end) (at `dest`) with what `piece` puts there.
void gather_piece(const Piece& piece, std::uint64_t begin, std::uint64_t end, const PieceSources& from,
                  std::byte* dest) {
  thread_local std::vector<std::byte> scratch;
  std::uint64_t first_row = 0;
  if (piece.rows > 1 && begin > piece.offset) first_row = (begin - piece.offset) / piece.stride;
  // (the row that starts before the window may also end before it)
  if (piece.offset + first_row * piece.stride + piece.nbytes <= begin) ++first_row;
  std::uint64_t end_row = first_row;  // one past the last row reaching the window
  while (end_row < piece.rows && piece.offset + end_row * piece.stride < end) ++end_row;
  if (first_row >= end_row) return;
  // The part of row r inside the window: destination [from, to), source from `source_at`.
  auto clip = [&](std::uint64_t r) {
    std::uint64_t row_dest = piece.offset + r * piece.stride;
    return std::pair{std::max(row_dest, begin), std::min(row_dest + piece.nbytes, end)};
  };
  auto source_at = [&](std::uint64_t r, std::uint64_t at) {
    return piece.source_offset + r * piece.source_stride + piece.source_bytes(at - (piece.offset + r * piece.stride));
  };
  check_invariant(!piece.mapped() || piece.source < from.files.size(), "a piece reads from an unknown source");
  if (piece.mapped() && piece.plain()) {
    auto [row_from, row_to] = clip(0);
    std::byte* out = dest + (row_from - begin);
    from.files[piece.source]->read_at(source_at(0, row_from), out, row_to - row_from);
    if (from.check != nullptr) from.check->note(piece.source, source_at(0, row_from), Bytes(out, row_to - row_from));
    return;
  }
  std::uint64_t read_begin = 0;  // source bytes [read_begin, ...) read ahead into scratch
  bool read_ahead = false;
  if (piece.mapped()) {
    std::uint64_t first_from = clip(first_row).first;
    auto [last_from, last_to] = clip(end_row - 1);
    read_begin = source_at(first_row, first_from);
    std::uint64_t read_end = source_at(end_row - 1, last_from) + piece.source_bytes(last_to - last_from);
    std::uint64_t useful = 0;
    for (std::uint64_t r = first_row; r < end_row; ++r) useful += clip(r).second - clip(r).first;
    if (read_end - read_begin <= 4 * useful + 4096) {
      scratch.resize(read_end - read_begin);
      from.files[piece.source]->read_at(read_begin, scratch.data(), scratch.size());
      if (from.check != nullptr) from.check->note(piece.source, read_begin, scratch);
      read_ahead = true;
    }
  }
  for (std::uint64_t r = first_row; r < end_row; ++r) {
    auto [row_from, row_to] = clip(r);
    if (row_from >= row_to) continue;
    const std::byte* source = nullptr;
    if (piece.mapped()) {
      std::uint64_t at = source_at(r, row_from);
      source = read_ahead ? scratch.data() + (at - read_begin) : from.files[piece.source]->bytes().data() + at;
    }
    copy_part(piece, source, source_at(r, row_from), row_to - row_from, from, dest + (row_from - begin));
  }
}

}  // namespace

void gather(std::span<const Piece> pieces, std::uint64_t begin, std::uint64_t end, const PieceSources& from,
            std::byte* dest) {
  for (const Piece& piece : pieces) {
    if (piece.end() <= begin || piece.offset >= end) continue;
    gather_piece(piece, begin, end, from, dest);
  }
}

void read_source_bytes(const TensorSource& source, const std::vector<const MappedFile*>& files, std::uint64_t begin,
                       std::uint64_t count, std::byte* out, SourceCrcCheck* check) {
  check_invariant(begin + count <= source.nbytes(), "read past the end of a tensor");
  TensorSource window =
      source.slice(begin, count, {static_cast<std::int64_t>(count / dtype_info(source.dtype).itemsize)});
  // A TensorSource's pieces take its dtype (what synthetic pieces generate).
  for (Piece& piece : window.pieces) piece.source_dtype = piece.dest_dtype = source.dtype;
  gather(window.pieces, 0, count, PieceSources{files, nullptr, check}, out);
}

}  // namespace ckpt
