// The LibTorch side of tensor_math.hpp, built into the plugin libckpt_torch.so
// (and linked directly by the tensor unit tests). The extern "C" entry points at
// the end are the plugin's whole interface.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/add.h>
#include <ATen/ops/any.h>
#include <ATen/ops/div.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/le.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cstring>
#include <exception>

#include "ckpt/tensor/tensor_view.hpp"
#include "torch_plugin_abi.h"

namespace ckpt::torch_impl {

namespace {

at::Tensor view(at::ScalarType type, const void* data, std::int64_t numel) {
  // from_blob neither copies nor frees; callers only read through it.
  return at::from_blob(const_cast<void*>(data), {numel}, at::TensorOptions().dtype(type));
}

at::ScalarType same_size_int(std::uint32_t itemsize) {
  switch (itemsize) {
    case 1: return at::kByte;
    case 2: return at::kShort;
    case 4: return at::kInt;
    default: return at::kLong;
  }
}

}  // namespace

void convert(DType from, DType to, const void* source, void* dest, std::uint64_t numel) {
  at::set_num_threads(1);  // called from our own worker threads
  auto n = static_cast<std::int64_t>(numel);
  view(to_scalar_type(to), dest, n).copy_(view(to_scalar_type(from), source, n));  // Tensor.to()'s cast kernels
}

void compare(DType dtype, const void* a, const void* b, std::uint64_t numel, double atol, double rtol,
             std::uint64_t max_positions, ckpt_torch_comparison* result, std::uint64_t* indices, double* values_a,
             double* values_b) {
  at::set_num_threads(1);
  *result = ckpt_torch_comparison{};
  const DTypeInfo& info = dtype_info(dtype);
  auto n = static_cast<std::int64_t>(numel);
  at::Tensor differs;
  at::Tensor x;
  at::Tensor y;
  if (dtype == DType::Complex64 || dtype == DType::Complex128) {  // (real, imaginary) bit patterns
    at::ScalarType part = same_size_int(info.itemsize / 2);
    differs = at::any(at::ne(view(part, a, 2 * n), view(part, b, 2 * n)).view({n, 2}), 1);
    x = view(part, a, 2 * n).view({n, 2}).select(1, 0).to(at::kDouble);
    y = view(part, b, 2 * n).view({n, 2}).select(1, 0).to(at::kDouble);
  } else {
    x = view(to_scalar_type(dtype), a, n).to(at::kDouble);
    y = view(to_scalar_type(dtype), b, n).to(at::kDouble);
    // Integers and bool compare exactly whatever the tolerance: through doubles,
    // 2**60 and 2**60 + 100 would be one value.
    if ((atol == 0.0 && rtol == 0.0) || !info.floating) {
      differs = at::ne(view(same_size_int(info.itemsize), a, n), view(same_size_int(info.itemsize), b, n));
    } else {
      at::Tensor close = at::le(at::abs(at::sub(x, y)), at::add(at::mul(at::abs(y), rtol), atol));
      at::Tensor same = at::logical_or(at::eq(x, y), at::logical_and(at::isnan(x), at::isnan(y)));
      differs = at::logical_not(at::logical_or(close, same));
    }
  }
  result->count = static_cast<std::uint64_t>(at::sum(differs).item<std::int64_t>());
  if (result->count == 0) return;
  at::Tensor abs_diff = at::where(differs, at::abs(at::sub(x, y)), at::zeros_like(x));
  abs_diff = at::where(at::isnan(abs_diff), at::zeros_like(abs_diff), abs_diff);
  result->max_abs = at::max(abs_diff).item<double>();
  at::Tensor rel = at::div(abs_diff, at::abs(y));
  rel = at::where(at::logical_or(at::isnan(rel), at::logical_not(differs)), at::zeros_like(rel), rel);
  result->max_rel = at::max(rel).item<double>();
  at::Tensor where = at::nonzero(differs).flatten();
  auto keep = std::min<std::int64_t>(where.numel(), static_cast<std::int64_t>(max_positions));
  at::Tensor xs = x.contiguous();
  at::Tensor ys = y.contiguous();
  const auto* where_data = where.data_ptr<std::int64_t>();
  for (std::int64_t i = 0; i < keep; ++i) {
    indices[i] = static_cast<std::uint64_t>(where_data[i]);
    values_a[i] = xs.data_ptr<double>()[where_data[i]];
    values_b[i] = ys.data_ptr<double>()[where_data[i]];
  }
  result->positions = static_cast<std::uint64_t>(keep);
}

}  // namespace ckpt::torch_impl

namespace {

int report(const std::exception& e, char* error, std::size_t error_len) {
  if (error != nullptr && error_len > 0) {
    std::strncpy(error, e.what(), error_len - 1);
    error[error_len - 1] = '\0';
  }
  return 1;
}

}  // namespace

extern "C" int ckpt_torch_abi_version(void) {
  return CKPT_TORCH_PLUGIN_VERSION;
}

extern "C" int ckpt_torch_convert(int from, int to, const void* source, void* dest, std::uint64_t numel, char* error,
                                  std::size_t error_len) {
  try {
    ckpt::torch_impl::convert(static_cast<ckpt::DType>(from), static_cast<ckpt::DType>(to), source, dest, numel);
    return 0;
  } catch (const std::exception& e) {
    return report(e, error, error_len);
  }
}

extern "C" int ckpt_torch_compare(int dtype, const void* a, const void* b, std::uint64_t numel, double atol,
                                  double rtol, std::uint64_t max_positions, ckpt_torch_comparison* result,
                                  std::uint64_t* indices, double* values_a, double* values_b, char* error,
                                  std::size_t error_len) {
  try {
    ckpt::torch_impl::compare(static_cast<ckpt::DType>(dtype), a, b, numel, atol, rtol, max_positions, result, indices,
                              values_a, values_b);
    return 0;
  } catch (const std::exception& e) {
    return report(e, error, error_len);
  }
}
