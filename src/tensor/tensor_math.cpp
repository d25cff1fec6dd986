#include "ckpt/tensor_math.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/max.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/div.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>

#include "ckpt/tensor_view.hpp"

namespace ckpt {

namespace {

at::Tensor view(DType dtype, const std::byte* data, std::uint64_t numel) {
  // from_blob neither copies nor frees; the caller only reads through it.
  return at::from_blob(const_cast<std::byte*>(data), {static_cast<std::int64_t>(numel)},
                       at::TensorOptions().dtype(to_scalar_type(dtype)));
}

}  // namespace

void convert_elements(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel) {
  at::Tensor out = view(to, dest, numel);
  out.copy_(view(from, source, numel));  // the same cast kernels as Tensor.to()
}

Difference compare_elements(DType dtype, const std::byte* a, const std::byte* b, std::uint64_t numel) {
  Difference result;
  if (numel == 0) return result;
  at::Tensor x = view(dtype, a, numel).to(at::kDouble);
  at::Tensor y = view(dtype, b, numel).to(at::kDouble);
  at::Tensor both_nan = at::logical_and(at::isnan(x), at::isnan(y));
  at::Tensor differs = at::logical_and(at::ne(x, y), at::logical_not(both_nan));
  result.count = static_cast<std::uint64_t>(at::sum(differs).item<std::int64_t>());
  if (result.count == 0) return result;
  at::Tensor abs_diff = at::where(differs, at::abs(at::sub(x, y)), at::zeros_like(x));
  result.max_abs = at::max(abs_diff).item<double>();
  at::Tensor rel = at::where(differs, at::div(abs_diff, at::abs(y)), at::zeros_like(x));
  result.max_rel = at::max(rel).item<double>();
  return result;
}

}  // namespace ckpt
