#include "ckpt/tensor/tensor_view.hpp"

#include <ATen/ops/from_blob.h>

namespace ckpt {

at::ScalarType to_scalar_type(DType dtype) {
  switch (dtype) {
    case DType::Float64: return at::kDouble;
    case DType::Float32: return at::kFloat;
    case DType::Float16: return at::kHalf;
    case DType::BFloat16: return at::kBFloat16;
    case DType::Int64: return at::kLong;
    case DType::Int32: return at::kInt;
    case DType::Int16: return at::kShort;
    case DType::Int8: return at::kChar;
    case DType::UInt8: return at::kByte;
    case DType::Bool: return at::kBool;
    case DType::Complex64: return at::kComplexFloat;
    case DType::Complex128: return at::kComplexDouble;
  }
  return at::kByte;
}

at::Tensor tensor_view(const Checkpoint& checkpoint, std::size_t index) {
  const StoredTensor& tensor = checkpoint.tensors().at(index);
  Bytes bytes = checkpoint.tensor_bytes(index);
  // from_blob never frees or copies; the const_cast is safe because callers
  // only read (the mapping itself is read-only and would fault on a write).
  void* data = const_cast<std::byte*>(bytes.data());
  return at::from_blob(data, tensor.shape, tensor.stride, at::TensorOptions().dtype(to_scalar_type(tensor.dtype)));
}

}  // namespace ckpt
