// The one executor: runs a validated Plan.
//
// Per output file: lay out the zip (every offset is known), create the temporary
// file at its final size, and cut every record into pieces of at most 8 MiB of
// destination bytes. A pool of threads runs the pieces: a piece that is one plain
// range is written with pwrite straight from the mapped input; any other piece
// (interleaved rows, dtype conversion, zeros among data) is gathered into a
// per-thread buffer first. Each piece's CRC-32 is computed on the bytes written;
// the CRCs are combined per record in order, then the local headers and the
// central directory are written, the file fsynced and renamed. It makes no
// decisions: the same plan gives the same bytes for any thread count.
#pragma once

#include <cstdint>
#include <functional>

#include "ckpt/plan.hpp"
#include "ckpt/tensor_source.hpp"

namespace ckpt {

struct ExecOptions {
  unsigned threads = 0;    // 0: all cores
  bool overwrite = false;  // --force
  bool progress = false;   // progress line on stderr
  // Converts `numel` elements between dtypes exactly as torch's `.to()` does;
  // needed by plans with converting copies (LibTorch lives in the caller).
  std::function<void(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel)> convert;
};

struct ExecStats {
  std::uint64_t bytes_written = 0;
  double seconds = 0.0;
  double create_seconds = 0.0;  // temp files created at their final size (fallocate)
  double copy_seconds = 0.0;    // the parallel copy
  double commit_seconds = 0.0;  // headers, fsync, rename
};

ExecStats execute(const Plan& plan, const ExecOptions& options);

// Copies bytes [begin, begin + count) of a tensor source out of the mapped
// files (`files[i]` is the source's file i) into `out`: for comparisons, which
// work in bounded chunks.
void read_source_bytes(const TensorSource& source, const std::vector<const MappedFile*>& files, std::uint64_t begin,
                       std::uint64_t count, std::byte* out);

}  // namespace ckpt
