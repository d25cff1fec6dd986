// Unit tests for the element comparison of diff (src/exec/element_compare.cpp),
// with LibTorch as the oracle: every float16 and bfloat16 bit pattern converts
// to the value c10 gives and prints as the shortest decimal that reads back as
// it; comparisons agree with torch.isclose-style counts computed by ATen.
// LibTorch first, then no_glog_checks.hpp, then doctest.
#include <ATen/ops/abs.h>
#include <ATen/ops/add.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/masked_select.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "no_glog_checks.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ckpt/exec/element_compare.hpp"
#include "ckpt/tensor/tensor_view.hpp"

namespace ckpt {

namespace {

// The c10 value of a 16-bit pattern.
template <typename T>
float c10_value(std::uint16_t bits) {
  T value;
  value.x = bits;
  return static_cast<float>(value);
}

template <typename T>
std::uint16_t c10_bits(float value) {
  return T(value).x;  // round to nearest even, as torch's .to()
}

const std::byte* bytes_of(const void* p) {
  return static_cast<const std::byte*>(p);
}

// The significant digits of a decimal ("0.00125" -> 3).
std::size_t significant_digits(const std::string& text) {
  std::string digits;
  for (char c : text.substr(0, text.find('e'))) {
    if (c >= '0' && c <= '9') digits += c;
  }
  std::size_t first = digits.find_first_not_of('0');
  if (first == std::string::npos) return 1;
  return digits.find_last_not_of('0') - first + 1;
}

template <typename T>
void check_every_pattern(DType dtype) {
  std::size_t checked = 0;
  for (std::uint32_t bits = 0; bits < 0x10000u; ++bits) {
    auto pattern = static_cast<std::uint16_t>(bits);
    ElementValue value = element_value(dtype, bytes_of(&pattern));
    float expected = c10_value<T>(pattern);
    if (std::isnan(expected)) {
      REQUIRE(std::isnan(value.real));
      REQUIRE(format_value(value) == (std::signbit(expected) ? "-nan" : "nan"));
      continue;
    }
    REQUIRE(value.real == static_cast<double>(expected));
    REQUIRE(std::signbit(value.real) == std::signbit(expected));
    std::string text = format_value(value);
    if (std::isinf(expected)) {
      REQUIRE(text == (expected < 0 ? "-inf" : "inf"));
      continue;
    }
    // Reads back as the same pattern (through float: exact for these digits) ...
    float back = std::strtof(text.c_str(), nullptr);
    INFO(fmt::format("bits 0x{:04x} printed {}", bits, text));
    REQUIRE(c10_bits<T>(back) == pattern);
    // ... laid out as Python's repr of a float: positional with a point from 1e-4 up to 1e16 ...
    double shown = std::fabs(std::strtod(text.c_str(), nullptr));
    bool positional = text.find('e') == std::string::npos;
    REQUIRE(positional == (shown == 0 || (shown >= 1e-4 && shown < 1e16)));
    if (positional) REQUIRE(text.find('.') != std::string::npos);
    // ... and one digit fewer would not.
    std::size_t digits = significant_digits(text);
    if (digits > 1) {
      std::string shorter = fmt::format("{:.{}g}", static_cast<double>(expected), digits - 1);
      REQUIRE(c10_bits<T>(std::strtof(shorter.c_str(), nullptr)) != pattern);
    }
    ++checked;
  }
  CHECK(checked > 60000);
}

}  // namespace

TEST_CASE("every float16 and bfloat16 value converts as c10 does and prints shortest") {
  check_every_pattern<c10::Half>(DType::Float16);
  check_every_pattern<c10::BFloat16>(DType::BFloat16);
}

TEST_CASE("floats print as Python's repr lays out a float, with the shortest digits of their dtype") {
  auto text = [](DType dtype, double value) {
    return format_value(ElementValue{ElementValue::Kind::Real, dtype, 0, 0, value, 0.0});
  };
  CHECK(text(DType::BFloat16, 100.0) == "100.0");  // one digit, which %g would write 1e+02
  CHECK(text(DType::Float16, 2048.0) == "2048.0");
  CHECK(text(DType::Float16, 65504.0) == "65500.0");  // the shortest digits that read back as float16's 65504
  CHECK(text(DType::Float32, 1e10) == "10000000000.0");
  CHECK(text(DType::Float64, 123456789.0) == "123456789.0");
  CHECK(text(DType::Float64, 9999999999999998.0) == "9999999999999998.0");
  CHECK(text(DType::Float64, 1e16) == "1e+16");
  CHECK(text(DType::Float64, 1.5e300) == "1.5e+300");
  CHECK(text(DType::Float64, 0.0001) == "0.0001");
  CHECK(text(DType::Float32, 1e-5) == "1e-05");
  CHECK(text(DType::Float64, -2.5e-3) == "-0.0025");
  CHECK(text(DType::Float32, 0.1) == "0.1");
  CHECK(text(DType::Float64, 0.0) == "0.0");
  ElementValue complex{ElementValue::Kind::Complex, DType::Complex64, 0, 0, 3.0, -4.5};
  CHECK(format_value(complex) == "(3-4.5j)");  // a complex's parts have no ".0", as in Python
}

TEST_CASE("tolerance counts match ATen, across float dtypes") {
  at::manual_seed(14);
  at::Tensor a = at::randn({100000}, at::kFloat);
  for (at::ScalarType target : {at::kHalf, at::kBFloat16, at::kDouble}) {
    at::Tensor b = a.to(target);
    for (double tol : {0.0, 1e-4, 1e-3, 1e-2}) {
      Tolerance tolerance{tol, tol};
      if (tolerance.exact()) continue;  // different dtypes need a tolerance
      at::Tensor x = a.to(at::kDouble);
      at::Tensor y = b.to(at::kDouble);
      at::Tensor abs_diff = at::abs(at::sub(x, y));
      at::Tensor differing = at::gt(abs_diff, at::add(at::mul(at::abs(y), tol), tol));
      auto expected = at::sum(differing).item<std::int64_t>();
      DType dtype_b = target == at::kHalf ? DType::Float16 : target == at::kBFloat16 ? DType::BFloat16 : DType::Float64;
      ElementComparison result = compare_elements(DType::Float32, bytes_of(a.data_ptr()), dtype_b,
                                                  bytes_of(b.data_ptr()), a.numel(), tolerance, 5);
      INFO(fmt::format("target {} tolerance {}", c10::toString(target), tol));
      CHECK(result.count == static_cast<std::uint64_t>(expected));
      CHECK(result.first.size() == std::min<std::uint64_t>(5, result.count));
      for (const ElementComparison::Position& p : result.first) {
        CHECK(p.a.real == x[static_cast<std::int64_t>(p.index)].item<double>());
        CHECK(p.b.real == y[static_cast<std::int64_t>(p.index)].item<double>());
      }
      if (result.count > 0) {
        CHECK(result.max_abs.real == at::max(at::masked_select(abs_diff, differing)).item<double>());
      }
    }
  }
}

TEST_CASE("exact comparison is bit for bit; integers exact whatever the tolerance") {
  float a[] = {0.0f, 1.0f, NAN, 2.0f};
  float b[] = {-0.0f, 1.0f, NAN, 2.5f};
  ElementComparison exact = compare_elements(DType::Float32, bytes_of(a), DType::Float32, bytes_of(b), 4, {}, 10);
  CHECK(exact.count == 2);  // -0.0 and 2.5; the two NaNs have the same bits
  REQUIRE(exact.first.size() == 2);
  CHECK(exact.first[0].index == 0);
  CHECK(format_value(exact.first[0].b) == "-0.0");
  CHECK(exact.max_abs.real == 0.5);
  ElementComparison close = compare_elements(DType::Float32, bytes_of(a), DType::Float32, bytes_of(b), 4, {0.5, 0}, 10);
  CHECK(close.count == 0);

  std::int64_t big_a[] = {std::int64_t{1} << 60, INT64_MIN, 5};
  std::int64_t big_b[] = {(std::int64_t{1} << 60) + 100, INT64_MAX, 5};
  ElementComparison ints =
      compare_elements(DType::Int64, bytes_of(big_a), DType::Int64, bytes_of(big_b), 3, {1e30, 1}, 10);
  CHECK(ints.count == 2);
  CHECK(ints.max_abs.kind == ElementValue::Kind::Unsigned);
  CHECK(ints.max_abs.unsigned_value == UINT64_MAX);
  CHECK(format_value(ints.first[0].b) == "1152921504606847076");
  CHECK(format_value(ints.first[1].a) == "-9223372036854775808");

  std::uint8_t flags_a[] = {1, 0, 2};
  std::uint8_t flags_b[] = {1, 1, 2};
  ElementComparison bools =
      compare_elements(DType::Bool, bytes_of(flags_a), DType::Bool, bytes_of(flags_b), 3, {1, 1}, 10);
  CHECK(bools.count == 1);
  CHECK(format_value(bools.first[0].a) == "False");
  CHECK(format_value(bools.first[0].b) == "True");
}

TEST_CASE("positions are the first ones; a later chunk merges after an earlier one") {
  std::vector<float> a(5000, 1.0f);
  std::vector<float> b = a;
  for (std::size_t i : {10u, 1500u, 1501u, 4999u}) b[i] = 2.0f;
  ElementComparison first =
      compare_elements(DType::Float32, bytes_of(a.data()), DType::Float32, bytes_of(b.data()), 2500, {}, 2);
  ElementComparison second = compare_elements(DType::Float32, bytes_of(a.data() + 2500), DType::Float32,
                                              bytes_of(b.data() + 2500), 2500, {}, 2);
  CHECK(first.count == 3);
  REQUIRE(first.first.size() == 2);
  CHECK(first.first[1].index == 1500);
  // Each chunk keeps the first K; merged in order, the first K of the whole.
  merge_comparison(first, std::move(second), 2500, 2);
  CHECK(first.count == 4);
  REQUIRE(first.first.size() == 2);
  CHECK(first.first[1].index == 1500);
  ElementComparison none;
  merge_comparison(none,
                   compare_elements(DType::Float32, bytes_of(a.data() + 2500), DType::Float32,
                                    bytes_of(b.data() + 2500), 2500, {}, 2),
                   2500, 3);
  REQUIRE(none.first.size() == 1);
  CHECK(none.first[0].index == 4999);
}

TEST_CASE("complex values compare by modulus and print as Python does") {
  float a[] = {1, 2, 3, -4};  // (1+2j), (3-4j)
  float b[] = {1, 2, 3, -4.5f};
  ElementComparison exact = compare_elements(DType::Complex64, bytes_of(a), DType::Complex64, bytes_of(b), 2, {}, 5);
  CHECK(exact.count == 1);
  CHECK(format_value(exact.first[0].a) == "(3-4j)");
  CHECK(format_value(exact.first[0].b) == "(3-4.5j)");
  CHECK(exact.max_abs.real == 0.5);
  CHECK(compare_elements(DType::Complex64, bytes_of(a), DType::Complex64, bytes_of(b), 2, {0.5, 0}, 5).count == 0);
  CHECK(compare_elements(DType::Complex64, bytes_of(a), DType::Complex64, bytes_of(b), 2, {0.49, 0}, 5).count == 1);
  CHECK(!comparable_dtypes(DType::Complex64, DType::Float32, {1, 1}));
  CHECK(!comparable_dtypes(DType::Float16, DType::BFloat16, {}));
  CHECK(comparable_dtypes(DType::Float16, DType::BFloat16, {0, 1e-3}));
}

}  // namespace ckpt
