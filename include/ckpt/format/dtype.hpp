// Tensor element types as torch.save names them (`torch.<Type>Storage`) and as
// torch prints them (`torch.bfloat16` without the prefix).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ckpt {

enum class DType : std::uint8_t {
  Float64,
  Float32,
  Float16,
  BFloat16,
  Int64,
  Int32,
  Int16,
  Int8,
  UInt8,
  Bool,
  Complex64,
  Complex128,
};

struct DTypeInfo {
  DType dtype;
  std::string_view storage_name;  // "FloatStorage"
  std::string_view name;          // "float32", as str(torch.float32) without "torch."
  std::uint32_t itemsize;         // bytes per element
  bool floating;                  // a real floating-point type (conversion target/source)
};

const DTypeInfo& dtype_info(DType dtype);
std::optional<DType> dtype_from_storage_name(std::string_view storage_name);
std::optional<DType> dtype_from_name(std::string_view name);  // also accepts fp16/bf16/fp32

}  // namespace ckpt
