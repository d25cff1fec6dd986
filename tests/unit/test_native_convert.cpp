// convert_elements' own casts (integers and bool to float32 and float64, done
// without LibTorch: src/exec/torch_plugin.cpp) against LibTorch's `.to()`,
// bit for bit, on the values where rounding shows: past 2^24 and 2^53, the
// extremes, negatives.
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include "no_glog_checks.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "ckpt/exec/tensor_math.hpp"

namespace {

template <typename T>
std::vector<T> interesting(std::mt19937_64& random) {
  std::vector<T> values{std::numeric_limits<T>::min(), std::numeric_limits<T>::max(), T(0), T(1)};
  if constexpr (std::is_signed_v<T>) values.push_back(T(-1));
  if constexpr (sizeof(T) == 8) {
    for (std::int64_t v : {(1LL << 24) + 1, (1LL << 53) + 1, (1LL << 53) - 1, (1LL << 62) + 12345}) {
      values.push_back(static_cast<T>(v));
      values.push_back(static_cast<T>(-v));
    }
  }
  for (int i = 0; i < 1000; ++i) values.push_back(static_cast<T>(random()));
  return values;
}

template <typename T>
void check(ckpt::DType from, at::ScalarType torch_from, std::mt19937_64& random) {
  std::vector<T> values = interesting<T>(random);
  const auto numel = static_cast<std::int64_t>(values.size());
  at::Tensor source = at::from_blob(values.data(), {numel}, at::TensorOptions().dtype(torch_from));
  for (auto [to, torch_to] :
       {std::pair{ckpt::DType::Float32, at::kFloat}, std::pair{ckpt::DType::Float64, at::kDouble}}) {
    at::Tensor want = source.to(torch_to);
    std::vector<std::byte> got(static_cast<std::size_t>(want.nbytes()));
    ckpt::convert_elements(from, to, reinterpret_cast<const std::byte*>(values.data()), got.data(),
                           static_cast<std::uint64_t>(numel));
    CHECK(std::memcmp(got.data(), want.data_ptr(), got.size()) == 0);
  }
}

}  // namespace

TEST_CASE("integers and bool convert to float32 and float64 bit for bit as torch's .to()") {
  std::mt19937_64 random(28);
  check<std::int64_t>(ckpt::DType::Int64, at::kLong, random);
  check<std::int32_t>(ckpt::DType::Int32, at::kInt, random);
  check<std::int16_t>(ckpt::DType::Int16, at::kShort, random);
  check<std::int8_t>(ckpt::DType::Int8, at::kChar, random);
  check<std::uint8_t>(ckpt::DType::UInt8, at::kByte, random);
  std::vector<std::uint8_t> flags{0, 1, 1, 0};
  at::Tensor source = at::from_blob(flags.data(), {4}, at::TensorOptions().dtype(at::kBool));
  at::Tensor want = source.to(at::kFloat);
  std::vector<std::byte> got(16);
  ckpt::convert_elements(ckpt::DType::Bool, ckpt::DType::Float32, reinterpret_cast<const std::byte*>(flags.data()),
                         got.data(), 4);
  CHECK(std::memcmp(got.data(), want.data_ptr(), 16) == 0);
}
