#include "ckpt/format/dtype.hpp"

#include <array>

namespace ckpt {

namespace {

constexpr std::array<DTypeInfo, 12> kTable{{
    {DType::Float64, "DoubleStorage", "float64", 8, true},
    {DType::Float32, "FloatStorage", "float32", 4, true},
    {DType::Float16, "HalfStorage", "float16", 2, true},
    {DType::BFloat16, "BFloat16Storage", "bfloat16", 2, true},
    {DType::Int64, "LongStorage", "int64", 8, false},
    {DType::Int32, "IntStorage", "int32", 4, false},
    {DType::Int16, "ShortStorage", "int16", 2, false},
    {DType::Int8, "CharStorage", "int8", 1, false},
    {DType::UInt8, "ByteStorage", "uint8", 1, false},
    {DType::Bool, "BoolStorage", "bool", 1, false},
    {DType::Complex64, "ComplexFloatStorage", "complex64", 8, false},
    {DType::Complex128, "ComplexDoubleStorage", "complex128", 16, false},
}};

}  // namespace

const DTypeInfo& dtype_info(DType dtype) {
  return kTable[static_cast<std::size_t>(dtype)];
}

std::optional<DType> dtype_from_storage_name(std::string_view storage_name) {
  for (const DTypeInfo& info : kTable) {
    if (info.storage_name == storage_name) return info.dtype;
  }
  return std::nullopt;
}

std::optional<DType> dtype_from_name(std::string_view name) {
  if (name == "fp16" || name == "half") return DType::Float16;
  if (name == "bf16") return DType::BFloat16;
  if (name == "fp32" || name == "float") return DType::Float32;
  if (name == "fp64" || name == "double") return DType::Float64;
  for (const DTypeInfo& info : kTable) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

}  // namespace ckpt
