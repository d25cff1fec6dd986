// Loading libckpt_torch.so on first use (see tensor_math.hpp for why).
#include <dlfcn.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "../tensor/torch_plugin_abi.h"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

struct Plugin {
  ckpt_torch_convert_fn convert = nullptr;
};

std::vector<std::string>& given_paths() {
  static std::vector<std::string> paths;
  return paths;
}

std::vector<std::string> candidates() {
  std::vector<std::string> out;
  if (const char* explicit_path = std::getenv("CKPT_TORCH_PLUGIN")) out.emplace_back(explicit_path);
  out.insert(out.end(), given_paths().begin(), given_paths().end());
  std::error_code ec;
  std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    std::filesystem::path dir = exe.parent_path();
    out.push_back((dir / "libckpt_torch.so").string());
    out.push_back((dir / ".." / "lib" / "ckpt-tool" / "libckpt_torch.so").string());
    out.push_back((dir / ".." / "lib" / "x86_64-linux-gnu" / "ckpt-tool" / "libckpt_torch.so").string());
  }
  return out;
}

const Plugin& plugin() {
  static Plugin loaded;
  static std::once_flag once;
  static std::string failure;
  std::call_once(once, [] {
    // The first that loads and has this ckpt-tool's interface; past one that
    // does not (a stale build tree beside an installed module), the next.
    std::string tried;
    std::string refused;
    for (const std::string& path : candidates()) {
      if (!std::filesystem::exists(path)) {
        tried += (tried.empty() ? "" : ", ") + path;
        continue;
      }
      void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (handle == nullptr) {
        if (refused.empty()) refused = fmt::format("cannot load {}: {}", path, ::dlerror());
        continue;
      }
      auto abi_version = reinterpret_cast<ckpt_torch_abi_version_fn>(::dlsym(handle, "ckpt_torch_abi_version"));
      auto convert = reinterpret_cast<ckpt_torch_convert_fn>(::dlsym(handle, "ckpt_torch_convert"));
      if (abi_version == nullptr || convert == nullptr) {
        if (refused.empty()) refused = path + " is not ckpt-tool's LibTorch plugin";
        continue;
      }
      if (int version = abi_version(); version != CKPT_TORCH_PLUGIN_VERSION) {
        if (refused.empty()) {
          refused = fmt::format(
              "{} is ckpt-tool's LibTorch plugin of interface version {}, this ckpt-tool needs version {}: install "
              "the libckpt_torch.so built with it (or point CKPT_TORCH_PLUGIN at it)",
              path, version, CKPT_TORCH_PLUGIN_VERSION);
        }
        continue;
      }
      loaded.convert = convert;
      return;
    }
    failure = !refused.empty()
                  ? refused
                  : "this needs LibTorch, through libckpt_torch.so, which is not installed (looked for " + tried + ")";
  });
  if (!failure.empty()) throw Error(failure);
  return loaded;
}

}  // namespace

void add_torch_plugin_paths(const std::vector<std::string>& paths) {
  given_paths().insert(given_paths().end(), paths.begin(), paths.end());
}

namespace {

template <typename From, typename To>
void cast_each(const std::byte* source, std::byte* dest, std::uint64_t numel) {
  for (std::uint64_t i = 0; i < numel; ++i) {
    From value;
    std::memcpy(&value, source + i * sizeof(From), sizeof(From));
    To cast = static_cast<To>(value);
    std::memcpy(dest + i * sizeof(To), &cast, sizeof(To));
  }
}

template <typename To>
bool integer_to_float(DType from, const std::byte* source, std::byte* dest, std::uint64_t numel) {
  switch (from) {
    case DType::Int64: cast_each<std::int64_t, To>(source, dest, numel); return true;
    case DType::Int32: cast_each<std::int32_t, To>(source, dest, numel); return true;
    case DType::Int16: cast_each<std::int16_t, To>(source, dest, numel); return true;
    case DType::Int8: cast_each<std::int8_t, To>(source, dest, numel); return true;
    case DType::UInt8: cast_each<std::uint8_t, To>(source, dest, numel); return true;
    case DType::Bool:
      for (std::uint64_t i = 0; i < numel; ++i) {
        To cast = source[i] != std::byte{0} ? To(1) : To(0);
        std::memcpy(dest + i * sizeof(To), &cast, sizeof(To));
      }
      return true;
    default: return false;
  }
}

// Integers (and bool) to float32 or float64, here: a C++ cast rounds to nearest
// as torch's own copy kernel does (static_cast), and a DeepSpeed stitch, whose
// int64 buffers zero_to_fp32 makes fp32, would otherwise load LibTorch for a few
// bytes (0.4 s of a 1.3 s stitch of 1 GiB, measured).
bool convert_natively(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel) {
  if (to == DType::Float32) return integer_to_float<float>(from, source, dest, numel);
  if (to == DType::Float64) return integer_to_float<double>(from, source, dest, numel);
  return false;
}

}  // namespace

void convert_elements(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel) {
  if (convert_natively(from, to, source, dest, numel)) return;
  char error[512] = {};
  if (plugin().convert(static_cast<int>(from), static_cast<int>(to), source, dest, numel, error, sizeof error) != 0) {
    throw Error(fmt::format("LibTorch: converting {} to {}: {}", dtype_info(from).name, dtype_info(to).name, error));
  }
}

}  // namespace ckpt
