// Tensor references as at::Tensors over the mapped bytes, without a copy.
//
// The only header that brings in LibTorch; include it only where tensor math
// happens (dtype conversion, comparison) and in tests. The returned tensor is
// read-only by contract and valid while the Checkpoint's MappedFile lives.
#pragma once

#include <ATen/core/Tensor.h>

#include "ckpt/format/checkpoint.hpp"

namespace ckpt {

at::ScalarType to_scalar_type(DType dtype);
at::Tensor tensor_view(const Checkpoint& checkpoint, std::size_t index);

}  // namespace ckpt
