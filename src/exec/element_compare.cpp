#include "ckpt/exec/element_compare.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

template <typename T>
T load(const std::byte* p) {
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

// IEEE half to float without branches (so that the loops below vectorize): the
// exponent and mantissa shifted into a float's place and scaled by 2**112 give
// normals and subnormals alike; exponent 31 (inf, NaN) is then forced to 255.
float half_to_float(std::uint16_t half) {
  std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  std::uint32_t magnitude = half & 0x7fffu;
  float scaled = std::bit_cast<float>(magnitude << 13) * 0x1p112f;
  std::uint32_t bits = std::bit_cast<std::uint32_t>(scaled) | (magnitude >= 0x7c00u ? 0x7f800000u : 0u);
  return std::bit_cast<float>(bits | sign);
}

float bfloat16_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

// The real floating dtypes: their bit pattern type and value.
struct Half {
  using Bits = std::uint16_t;
  static constexpr DType dtype = DType::Float16;
  static double value(Bits bits) { return half_to_float(bits); }
};
struct BFloat16 {
  using Bits = std::uint16_t;
  static constexpr DType dtype = DType::BFloat16;
  static double value(Bits bits) { return bfloat16_to_float(bits); }
};
struct Float {
  using Bits = std::uint32_t;
  static constexpr DType dtype = DType::Float32;
  static double value(Bits bits) { return std::bit_cast<float>(bits); }
};
struct Double {
  using Bits = std::uint64_t;
  static constexpr DType dtype = DType::Float64;
  static double value(Bits bits) { return std::bit_cast<double>(bits); }
};

template <typename F>
auto with_real(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16: return f(Half{});
    case DType::BFloat16: return f(BFloat16{});
    case DType::Float32: return f(Float{});
    default: return f(Double{});
  }
}

bool is_complex(DType dtype) {
  return dtype == DType::Complex64 || dtype == DType::Complex128;
}

// Elements are looked at in blocks: a block's loop only marks and counts the
// differing elements (no early exit, no call, no floating-point reduction), so
// the compiler vectorizes it; only a block with differences is scanned again,
// for their largest differences and the first positions. The real-float loop
// is also built for AVX2 (target_clones), chosen at run time where the CPU
// has it (faster on fp16 against bf16).
constexpr std::size_t kBlock = 1024;
constexpr double kMaxDouble = std::numeric_limits<double>::max();

struct Accumulator {
  ElementComparison& out;
  std::size_t max_positions;
  DType dtype_a;
  DType dtype_b;
  const std::byte* a;
  const std::byte* b;

  void positions(std::uint64_t block_begin, const std::uint8_t* differs, std::size_t n) {
    for (std::size_t i = 0; i < n && out.first.size() < max_positions; ++i) {
      if (differs[i] == 0) continue;
      std::uint64_t index = block_begin + i;
      out.first.push_back({index, element_value(dtype_a, a + index * dtype_info(dtype_a).itemsize),
                           element_value(dtype_b, b + index * dtype_info(dtype_b).itemsize)});
    }
  }
  bool wants_positions() const { return out.first.size() < max_positions; }
};

// The largest |a - b| and |a - b| / |b| over the differing elements of real
// or complex values: NaN when some difference is NaN (NaN against a number,
// inf against inf of the other sign... under no tolerance); an infinite
// difference is infinitely large relative to any b.
struct RealMaxima {
  double max_abs = 0.0;
  double max_rel = 0.0;
  bool nan = false;
  void add(double d, double magnitude_b) {
    if (std::isnan(d)) {
      nan = true;
      return;
    }
    max_abs = std::max(max_abs, d);
    double rel = std::isinf(d) ? d : d / magnitude_b;
    if (!std::isnan(rel)) max_rel = std::max(max_rel, rel);  // 0 / 0: -0.0 against 0.0
  }
  void store(ElementComparison& out) const {
    double abs = nan ? std::numeric_limits<double>::quiet_NaN() : max_abs;
    out.max_abs = ElementValue{ElementValue::Kind::Real, DType::Float64, 0, 0, abs, 0.0};
    out.max_rel = nan ? std::numeric_limits<double>::quiet_NaN() : max_rel;
  }
};

template <typename A, typename B, bool kExact>
__attribute__((target_clones("avx2", "default"))) void compare_real(Accumulator& acc, std::uint64_t numel,
                                                                    const Tolerance& tolerance) {
  std::uint8_t differs[kBlock];
  RealMaxima maxima;
  const double atol = tolerance.atol;
  const double rtol = tolerance.rtol;
  using BitsA = typename A::Bits;
  using BitsB = typename B::Bits;
  for (std::uint64_t begin = 0; begin < numel; begin += kBlock) {
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(kBlock, numel - begin));
    const std::byte* pa = acc.a + begin * sizeof(BitsA);
    const std::byte* pb = acc.b + begin * sizeof(BitsB);
    std::uint32_t count = 0;
    // Vectorized: no branch, no division, no floating-point reduction (GCC
    // keeps those in order without -ffast-math).
    for (std::size_t i = 0; i < n; ++i) {
      BitsA bits_a = load<BitsA>(pa + i * sizeof(BitsA));
      BitsB bits_b = load<BitsB>(pb + i * sizeof(BitsB));
      double x = A::value(bits_a);
      double y = B::value(bits_b);
      double d = std::fabs(x - y);
      bool differ;
      if constexpr (kExact) {
        differ = bits_a != bits_b;
      } else {
        bool same = (x == y) | ((x != x) & (y != y));  // NaN equal to NaN
        // An infinity is close only to itself (same), as in torch.isclose: an
        // infinite difference never passes, not even inf <= rtol * inf.
        differ = !(same | ((d <= atol + rtol * std::fabs(y)) & (d <= kMaxDouble)));
      }
      differs[i] = differ;
      count += differ;
    }
    if (count == 0) continue;
    acc.out.count += count;
    for (std::size_t i = 0; i < n; ++i) {  // the block's differing elements again: their differences
      if (differs[i] == 0) continue;
      double x = A::value(load<BitsA>(pa + i * sizeof(BitsA)));
      double y = B::value(load<BitsB>(pb + i * sizeof(BitsB)));
      maxima.add(std::fabs(x - y), std::fabs(y));
    }
    if (acc.wants_positions()) acc.positions(begin, differs, n);
  }
  maxima.store(acc.out);
}

template <typename T>
void compare_integer(Accumulator& acc, std::uint64_t numel) {
  std::uint8_t differs[kBlock];
  std::uint64_t max_abs = 0;
  double max_rel = 0.0;
  for (std::uint64_t begin = 0; begin < numel; begin += kBlock) {
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(kBlock, numel - begin));
    const std::byte* pa = acc.a + begin * sizeof(T);
    const std::byte* pb = acc.b + begin * sizeof(T);
    std::uint32_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
      bool differ = load<T>(pa + i * sizeof(T)) != load<T>(pb + i * sizeof(T));
      differs[i] = differ;
      count += differ;
    }
    if (count == 0) continue;
    acc.out.count += count;
    for (std::size_t i = 0; i < n; ++i) {
      if (differs[i] == 0) continue;
      T x = load<T>(pa + i * sizeof(T));
      T y = load<T>(pb + i * sizeof(T));
      // Exact in 64 bits: the difference of two int64 values fits in a uint64.
      std::uint64_t d = x > y ? static_cast<std::uint64_t>(x) - static_cast<std::uint64_t>(y)
                              : static_cast<std::uint64_t>(y) - static_cast<std::uint64_t>(x);
      max_abs = std::max(max_abs, d);
      max_rel = std::max(max_rel, static_cast<double>(d) / std::fabs(static_cast<double>(y)));
    }
    if (acc.wants_positions()) acc.positions(begin, differs, n);
  }
  acc.out.max_abs = ElementValue{ElementValue::Kind::Unsigned, acc.dtype_a, 0, max_abs, 0.0, 0.0};
  acc.out.max_rel = max_rel;
}

// Complex elements are (real, imaginary) pairs of the component type.
template <typename A, typename B, bool kExact>
void compare_complex(Accumulator& acc, std::uint64_t numel, const Tolerance& tolerance) {
  std::uint8_t differs[kBlock];
  RealMaxima maxima;
  constexpr std::size_t kSizeA = 2 * sizeof(typename A::Bits);
  constexpr std::size_t kSizeB = 2 * sizeof(typename B::Bits);
  for (std::uint64_t begin = 0; begin < numel; begin += kBlock) {
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(kBlock, numel - begin));
    std::uint32_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::byte* pa = acc.a + (begin + i) * kSizeA;
      const std::byte* pb = acc.b + (begin + i) * kSizeB;
      auto real_bits_a = load<typename A::Bits>(pa);
      auto imag_bits_a = load<typename A::Bits>(pa + kSizeA / 2);
      auto real_bits_b = load<typename B::Bits>(pb);
      auto imag_bits_b = load<typename B::Bits>(pb + kSizeB / 2);
      double xr = A::value(real_bits_a);
      double xi = A::value(imag_bits_a);
      double yr = B::value(real_bits_b);
      double yi = B::value(imag_bits_b);
      double d = std::hypot(xr - yr, xi - yi);
      bool differ;
      if constexpr (kExact) {
        differ = real_bits_a != real_bits_b || imag_bits_a != imag_bits_b;
      } else {
        bool nan_x = xr != xr || xi != xi;
        bool nan_y = yr != yr || yi != yi;
        bool same = (xr == yr && xi == yi) || (nan_x && nan_y);
        bool finite = std::isfinite(xr) && std::isfinite(xi) && std::isfinite(yr) && std::isfinite(yi);
        differ = !(same || (finite && d <= tolerance.atol + tolerance.rtol * std::hypot(yr, yi)));
      }
      differs[i] = differ;
      count += differ;
      if (differ) maxima.add(d, std::hypot(yr, yi));
    }
    acc.out.count += count;
    if (count > 0 && acc.wants_positions()) acc.positions(begin, differs, n);
  }
  maxima.store(acc.out);
}

template <typename A, typename B>
void compare_real_pair(Accumulator& acc, std::uint64_t numel, const Tolerance& tolerance, bool complex) {
  bool exact = tolerance.exact();
  if (complex) {
    exact ? compare_complex<A, B, true>(acc, numel, tolerance) : compare_complex<A, B, false>(acc, numel, tolerance);
  } else {
    exact ? compare_real<A, B, true>(acc, numel, tolerance) : compare_real<A, B, false>(acc, numel, tolerance);
  }
}

// The shortest decimal that reads back as `bits`, a finite value of a 16-bit
// float format (fmt knows only float and double): the fewest significant
// digits whose value lies in the interval that rounds to it (ties to even).
template <typename F>
std::string shortest_16(std::uint16_t bits) {
  std::uint16_t magnitude = bits & 0x7fffu;
  double value = F::value(magnitude);
  double below = magnitude == 0 ? -F::value(1) : F::value(static_cast<std::uint16_t>(magnitude - 1));
  double above = F::value(static_cast<std::uint16_t>(magnitude + 1));
  if (std::isinf(above)) above = value + (value - below);  // the largest finite value
  double low = (below + value) / 2;
  double high = (value + above) / 2;
  bool even = (magnitude & 1) == 0;
  std::string sign = (bits & 0x8000u) != 0 ? "-" : "";
  for (int digits = 1; digits < 17; ++digits) {
    std::string text = fmt::format("{:.{}g}", value, digits);
    double back = std::strtod(text.c_str(), nullptr);
    if ((back > low && back < high) || (even && (back == low || back == high))) return sign + text;
  }
  return sign + fmt::format("{}", value);
}

// The bits of a finite float that holds a half's value exactly.
std::uint16_t half_bits_of(float value) {
  std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  float magnitude = std::fabs(value);
  if (magnitude < 0x1p-14f) return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(magnitude * 0x1p24f));
  std::uint32_t exponent = ((bits >> 23) & 0xffu) - 127 + 15;
  return static_cast<std::uint16_t>(sign | (exponent << 10) | ((bits >> 13) & 0x3ffu));
}

// `shortest` (a finite decimal as fmt writes it: "1e+02", "100", "0.001",
// "1.5e-07") laid out as Python's repr lays out a float: positional from
// 1e-4 up to 1e16 ("100.0", "0.001"), else d.ddde+XX ("1e+16", "1.5e-07").
// `point` gives an integral positional value its ".0", as a float's repr does
// and a complex's parts' do not ("(3-4j)").
std::string python_layout(std::string_view shortest, bool point) {
  std::string sign;
  if (shortest.starts_with('-')) {
    sign = "-";
    shortest.remove_prefix(1);
  }
  std::size_t e = shortest.find_first_of("eE");
  int exponent = e == std::string_view::npos ? 0 : std::atoi(std::string(shortest.substr(e + 1)).c_str());
  std::string_view mantissa = shortest.substr(0, e);
  std::size_t dot = mantissa.find('.');
  // value = 0.<digits> x 10^(before_point + exponent)
  int before_point = static_cast<int>(dot == std::string_view::npos ? mantissa.size() : dot);
  std::string digits;
  for (char c : mantissa) {
    if (c != '.') digits += c;
  }
  while (digits.size() > 1 && digits.front() == '0') {
    digits.erase(0, 1);
    --before_point;
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  if (digits == "0") return sign + (point ? "0.0" : "0");
  const int decimal = before_point + exponent - 1;  // the power of ten of the first digit
  if (decimal >= -4 && decimal < 16) {
    std::string integral = "0";
    std::string fraction = std::string(static_cast<std::size_t>(std::max(0, -decimal - 1)), '0') + digits;
    if (decimal >= 0) {
      auto width = static_cast<std::size_t>(decimal + 1);
      integral = digits.substr(0, width);
      integral.append(width - integral.size(), '0');
      fraction = digits.size() > width ? digits.substr(width) : "";
    }
    if (fraction.empty()) return sign + integral + (point ? ".0" : "");
    return sign + integral + "." + fraction;
  }
  std::string out = sign + digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
  return out + fmt::format("e{}{:02d}", decimal < 0 ? '-' : '+', std::abs(decimal));
}

// The shortest digits that read back as `value` in `dtype`, as fmt writes them.
std::string shortest_digits(double value, DType dtype) {
  switch (dtype) {
    case DType::Float16: return shortest_16<Half>(half_bits_of(static_cast<float>(value)));
    case DType::BFloat16: {
      auto bits = static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(static_cast<float>(value)) >> 16);
      return shortest_16<BFloat16>(bits);
    }
    case DType::Float32: return fmt::format("{}", static_cast<float>(value));
    default: return fmt::format("{}", value);
  }
}

std::string format_real(double value, DType dtype, bool point = true) {
  if (std::isnan(value)) return std::signbit(value) ? "-nan" : "nan";  // bit-for-bit diffs can differ in the sign
  if (std::isinf(value)) return value < 0 ? "-inf" : "inf";
  return python_layout(shortest_digits(value, dtype), point);
}

// std::max, but NaN wins (a NaN difference is reported, not hidden).
double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(a, b);
}

}  // namespace

ElementValue element_value(DType dtype, const std::byte* element) {
  ElementValue out;
  out.dtype = dtype;
  switch (dtype) {
    case DType::Bool:
      out.kind = ElementValue::Kind::Bool;
      out.signed_value = load<std::uint8_t>(element);  // a byte: anything but 0 and 1 is shown as it is
      return out;
    case DType::UInt8:
      out.kind = ElementValue::Kind::Unsigned;
      out.unsigned_value = load<std::uint8_t>(element);
      return out;
    case DType::Int8: out.signed_value = load<std::int8_t>(element); break;
    case DType::Int16: out.signed_value = load<std::int16_t>(element); break;
    case DType::Int32: out.signed_value = load<std::int32_t>(element); break;
    case DType::Int64: out.signed_value = load<std::int64_t>(element); break;
    case DType::Complex64:
    case DType::Complex128: {
      out.kind = ElementValue::Kind::Complex;
      DType part = dtype == DType::Complex64 ? DType::Float32 : DType::Float64;
      std::size_t half = dtype_info(dtype).itemsize / 2;
      out.real = element_value(part, element).real;
      out.imag = element_value(part, element + half).real;
      return out;
    }
    default:
      out.kind = ElementValue::Kind::Real;
      out.real = with_real(dtype, [&](auto type) {
        using T = decltype(type);
        return T::value(load<typename T::Bits>(element));
      });
      return out;
  }
  out.kind = ElementValue::Kind::Signed;
  return out;
}

std::string format_value(const ElementValue& value) {
  switch (value.kind) {
    case ElementValue::Kind::Bool:
      return value.signed_value == 1   ? "True"
             : value.signed_value == 0 ? "False"
                                       : fmt::format("{}", value.signed_value);
    case ElementValue::Kind::Signed: return fmt::format("{}", value.signed_value);
    case ElementValue::Kind::Unsigned: return fmt::format("{}", value.unsigned_value);
    case ElementValue::Kind::Real: return format_real(value.real, value.dtype);
    case ElementValue::Kind::Complex: {
      DType part = value.dtype == DType::Complex64 ? DType::Float32 : DType::Float64;
      std::string imag = format_real(value.imag, part, false);
      bool negative = !imag.empty() && imag[0] == '-';
      return fmt::format("({}{}{}j)", format_real(value.real, part, false), negative ? "" : "+", imag);
    }
  }
  return "?";
}

bool comparable_dtypes(DType a, DType b, const Tolerance& tolerance) {
  if (a == b) return true;
  if (tolerance.exact()) return false;
  return (dtype_info(a).floating && dtype_info(b).floating) || (is_complex(a) && is_complex(b));
}

ElementComparison compare_elements(DType dtype_a, const std::byte* a, DType dtype_b, const std::byte* b,
                                   std::uint64_t numel, const Tolerance& tolerance, std::size_t max_positions) {
  if (!comparable_dtypes(dtype_a, dtype_b, tolerance)) {
    throw Error(fmt::format("cannot compare {} with {}", dtype_info(dtype_a).name, dtype_info(dtype_b).name));
  }
  ElementComparison out;
  Accumulator acc{out, max_positions, dtype_a, dtype_b, a, b};
  switch (dtype_a) {
    case DType::Bool:
    case DType::UInt8: compare_integer<std::uint8_t>(acc, numel); break;
    case DType::Int8: compare_integer<std::int8_t>(acc, numel); break;
    case DType::Int16: compare_integer<std::int16_t>(acc, numel); break;
    case DType::Int32: compare_integer<std::int32_t>(acc, numel); break;
    case DType::Int64: compare_integer<std::int64_t>(acc, numel); break;
    default: {
      bool complex = is_complex(dtype_a);
      auto part = [](DType dtype) {
        if (dtype == DType::Complex64) return DType::Float32;
        return dtype == DType::Complex128 ? DType::Float64 : dtype;
      };
      with_real(part(dtype_a), [&](auto type_a) {
        with_real(part(dtype_b), [&](auto type_b) {
          compare_real_pair<decltype(type_a), decltype(type_b)>(acc, numel, tolerance, complex);
        });
      });
    }
  }
  return out;
}

void merge_comparison(ElementComparison& into, ElementComparison&& later, std::uint64_t later_first_index,
                      std::size_t max_positions) {
  if (later.count == 0) return;
  if (into.count == 0) {
    into.max_abs = later.max_abs;
  } else if (later.max_abs.kind == ElementValue::Kind::Unsigned) {
    into.max_abs.unsigned_value = std::max(into.max_abs.unsigned_value, later.max_abs.unsigned_value);
  } else {
    into.max_abs.real = nan_max(into.max_abs.real, later.max_abs.real);
  }
  into.count += later.count;
  into.max_rel = nan_max(into.max_rel, later.max_rel);
  for (ElementComparison::Position& p : later.first) {
    if (into.first.size() >= max_positions) break;
    p.index += later_first_index;
    into.first.push_back(std::move(p));
  }
}

}  // namespace ckpt
