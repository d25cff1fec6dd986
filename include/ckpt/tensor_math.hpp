// Element-wise work on mapped bytes with LibTorch: dtype conversion (rounding
// exactly as torch's `.to()`) and differences. Declared without LibTorch types,
// so callers need not include its headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ckpt/dtype.hpp"

namespace ckpt {

// Converts `numel` elements from `source` (of `from`) into `dest` (of `to`).
void convert_elements(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel);

struct Difference {
  std::uint64_t count = 0;         // elements that differ (NaN == NaN counts as equal)
  double max_abs = 0.0;            // largest |a - b|
  double max_rel = 0.0;            // largest |a - b| / |b|
};
// Compares `numel` elements of one dtype.
Difference compare_elements(DType dtype, const std::byte* a, const std::byte* b, std::uint64_t numel);

}  // namespace ckpt
