// Element-wise work on mapped bytes: dtype conversion (rounding exactly as
// torch's `.to()`) and element comparison, done by LibTorch.
//
// LibTorch costs 0.7 s and 200 MiB of resident code just to load, so ckpt-tool
// does not link it: these functions load the plugin libckpt_torch.so (next to
// the executable, or $CKPT_TORCH_PLUGIN) on first use. Commands that only copy
// bytes, and diffs of equal data, never load it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ckpt/format/dtype.hpp"

namespace ckpt {

// Converts `numel` elements from `source` (of `from`) into `dest` (of `to`).
void convert_elements(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel);

struct ElementComparison {
  std::uint64_t count = 0;  // differing elements
  double max_abs = 0.0;     // largest |a - b| among them (NaN ignored)
  double max_rel = 0.0;     // largest |a - b| / |b|
  struct Position {
    std::uint64_t index;  // element index in the compared range
    double a;
    double b;
  };
  std::vector<Position> first;  // the first `max_positions` differing elements
};

// Compares `numel` elements of one dtype: bit for bit when atol and rtol are 0,
// else |a - b| <= atol + rtol |b| (NaN equal to NaN).
ElementComparison compare_elements(DType dtype, const std::byte* a, const std::byte* b, std::uint64_t numel,
                                   double atol, double rtol, std::size_t max_positions);

}  // namespace ckpt
