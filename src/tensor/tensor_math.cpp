// The LibTorch side of tensor_math.hpp, built into the plugin libckpt_torch.so
// (and linked directly by the tensor unit tests). The extern "C" entry points at
// the end are the plugin's whole interface.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

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

}  // namespace

void convert(DType from, DType to, const void* source, void* dest, std::uint64_t numel) {
  at::set_num_threads(1);  // called from our own worker threads
  auto n = static_cast<std::int64_t>(numel);
  view(to_scalar_type(to), dest, n).copy_(view(to_scalar_type(from), source, n));  // Tensor.to()'s cast kernels
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
