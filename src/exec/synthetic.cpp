#include "ckpt/exec/synthetic.hpp"

#include <bit>
#include <cstring>

namespace ckpt {

namespace {

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

float value_at(std::uint64_t index) {
  // 24 random bits -> [-0.05, 0.05)
  return (static_cast<float>(mix(index) >> 40) / 16777216.0f - 0.5f) * 0.1f;
}

std::uint16_t to_half(float value) {  // exact enough for synthetic data: truncates, flushes tiny values
  std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000);
  int exponent = static_cast<int>((bits >> 23) & 0xFF) - 127 + 15;
  if (exponent <= 0) return sign;
  return static_cast<std::uint16_t>(sign | (exponent << 10) | ((bits >> 13) & 0x3FF));
}

template <typename T>
void store(std::byte* out, std::uint64_t i, T value) {
  std::memcpy(out + i * sizeof(T), &value, sizeof(T));
}

}  // namespace

void synthesize(DType dtype, std::uint64_t byte_offset, std::uint64_t count, std::byte* out) {
  std::uint64_t itemsize = dtype_info(dtype).itemsize;
  std::uint64_t first = byte_offset / itemsize;
  std::uint64_t n = count / itemsize;
  for (std::uint64_t i = 0; i < n; ++i) {
    std::uint64_t index = first + i;
    switch (dtype) {
      case DType::Float32: store(out, i, value_at(index)); break;
      case DType::Float64: store(out, i, static_cast<double>(value_at(index))); break;
      case DType::Float16: store(out, i, to_half(value_at(index))); break;
      case DType::BFloat16:
        store(out, i, static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(value_at(index)) >> 16));
        break;
      case DType::Bool: store(out, i, static_cast<std::uint8_t>(mix(index) & 1)); break;
      case DType::Complex64:
        store(out, 2 * i, value_at(2 * index));
        store(out, 2 * i + 1, value_at(2 * index + 1));
        break;
      case DType::Complex128:
        store(out, 2 * i, static_cast<double>(value_at(2 * index)));
        store(out, 2 * i + 1, static_cast<double>(value_at(2 * index + 1)));
        break;
      default: {  // integers: the low bytes of the hash
        std::uint64_t bits = mix(index);
        std::memcpy(out + i * itemsize, &bits, itemsize);
      }
    }
  }
}

}  // namespace ckpt
