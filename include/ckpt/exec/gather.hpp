// The one reader of pieces (layout/piece.hpp): fills a window of a destination
// from the pieces that reach it. The executor assembles its output units with
// it; diff and the replicated-tensor check read tensors through it
// (read_source_bytes), so every byte ckpt-tool copies or compares is read by
// the same code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/piece.hpp"
#include "ckpt/layout/tensor_source.hpp"

namespace ckpt {

class SourceCrcCheck;

// Converts `numel` elements between dtypes exactly as torch's `.to()` does.
using ConvertFn =
    std::function<void(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel)>;

// Where pieces read from: `files[piece.source]`; the converter for converting
// pieces (none: a converting piece is a bug); the CRC check told every input
// range read (none: not checked).
struct PieceSources {
  const std::vector<const MappedFile*>& files;
  const ConvertFn* convert = nullptr;
  SourceCrcCheck* check = nullptr;
};

// Fills `dest` with destination bytes [begin, end) from every piece that reaches
// them (the pieces tile the destination). A plain row is read with one pread
// straight into `dest`; the rows a piece contributes are read with one pread
// when they lie close together (Megatron's interleaved rows come from
// contiguous parts), otherwise row by row from the mapping.
void gather(std::span<const Piece> pieces, std::uint64_t begin, std::uint64_t end, const PieceSources& from,
            std::byte* dest);

// Bytes [begin, begin + count) of a tensor source (`files[i]` is its file i),
// through gather: for comparisons, which work in bounded chunks.
// Every range read is told to `check` when given.
void read_source_bytes(const TensorSource& source, const std::vector<const MappedFile*>& files, std::uint64_t begin,
                       std::uint64_t count, std::byte* out, SourceCrcCheck* check = nullptr);

}  // namespace ckpt
