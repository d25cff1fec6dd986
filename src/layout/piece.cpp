#include "ckpt/layout/piece.hpp"

namespace ckpt {

std::uint64_t Piece::source_bytes(std::uint64_t dest_bytes) const {
  if (!converts()) return dest_bytes;
  return dest_bytes / dtype_info(dest_dtype).itemsize * dtype_info(source_dtype).itemsize;
}

void append_piece(std::vector<Piece>& pieces, const Piece& piece) {
  if (piece.nbytes == 0 || piece.rows == 0) return;
  if (!pieces.empty() && piece.plain()) {
    Piece& last = pieces.back();
    bool continues = last.plain() && last.source == piece.source && last.dest_dtype == piece.dest_dtype &&
                     last.offset + last.nbytes == piece.offset &&
                     (piece.source == Piece::kZeros || last.source_offset + last.nbytes == piece.source_offset);
    if (continues) {
      last.nbytes += piece.nbytes;
      return;
    }
  }
  pieces.push_back(piece);
}

}  // namespace ckpt
