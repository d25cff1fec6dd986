// Comparing elements of two tensors, and holding and printing one element's
// value exactly: the element-wise half of `ckpt-tool diff` (compare.hpp cuts
// tensors into chunks and calls compare_elements on each).
//
// Written here rather than with LibTorch: one fused pass reads each byte once
// and needs no temporaries, where LibTorch's chain of whole-chunk operations
// (convert to double, subtract, abs, compare, nonzero) was far slower on a
// chunk where every element differed, and through doubles lost integers
// beyond 2**53.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/format/dtype.hpp"

namespace ckpt {

// One element's value, whatever its dtype, held without loss.
struct ElementValue {
  enum class Kind : std::uint8_t { Bool, Signed, Unsigned, Real, Complex };
  Kind kind = Kind::Real;
  DType dtype = DType::Float64;   // floats print with the shortest digits that read back as this dtype
  std::int64_t signed_value = 0;  // Bool (0 or 1), Signed
  std::uint64_t unsigned_value = 0;
  double real = 0.0;  // Real, Complex (every supported float converts to double exactly)
  double imag = 0.0;
};

// The element at `element` (itemsize bytes, little-endian as torch saves it).
ElementValue element_value(DType dtype, const std::byte* element);

// Python's spelling, exact: 1152921504606846976, True, 0.1 (the shortest
// digits that read back as the same float16/bfloat16/float32/float64 value,
// laid out as repr lays out a float: 100.0, 1e-05, 1e+16), nan (-nan when its
// sign is set), -inf, (1+2j).
std::string format_value(const ElementValue& value);

struct Tolerance {
  double atol = 0.0;
  double rtol = 0.0;
  bool given = false;  // a tolerance was asked for, even of zero: compare by value
  // Bit for bit: no tolerance asked for (`diff` without --atol and --rtol).
  bool exact() const { return !given && atol == 0.0 && rtol == 0.0; }
};

// Whether two dtypes can be compared element by element: the same dtype, or
// (with a tolerance) two real floating dtypes, or two complex dtypes, by value.
bool comparable_dtypes(DType a, DType b, const Tolerance& tolerance);

struct ElementComparison {
  std::uint64_t count = 0;  // differing elements
  // Largest |a - b| among them: the exact integer for integer and bool dtypes,
  // else a double (the modulus for complex), NaN when some difference is NaN.
  ElementValue max_abs{ElementValue::Kind::Unsigned};
  double max_rel = 0.0;  // largest |a - b| / |b| among them (inf for an infinite difference), NaN likewise
  struct Position {
    std::uint64_t index;  // element index in the compared range
    ElementValue a;
    ElementValue b;
  };
  std::vector<Position> first;  // the first `max_positions` differing elements
};

// Compares `numel` elements of `a` (of dtype_a) with `numel` of `b`.
// - Integers and bool: exactly, whatever the tolerance.
// - Exact (no tolerance): bit for bit (-0.0 differs from 0.0, NaN payloads count).
// - Real floats with a tolerance: by value in double, |a - b| <= atol + rtol |b|
//   for finite values, an infinity equal only to itself, NaN equal to NaN
//   (torch.isclose with equal_nan).
// - Complex with a tolerance: the same on the modulus of the difference and of b.
// The caller checks comparable_dtypes first.
ElementComparison compare_elements(DType dtype_a, const std::byte* a, DType dtype_b, const std::byte* b,
                                   std::uint64_t numel, const Tolerance& tolerance, std::size_t max_positions);

// Merges the comparison of a later range into `into` (max_positions kept).
void merge_comparison(ElementComparison& into, ElementComparison&& later, std::uint64_t later_first_index,
                      std::size_t max_positions);

}  // namespace ckpt
