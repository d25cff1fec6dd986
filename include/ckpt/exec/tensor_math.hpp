// Element-wise work on mapped bytes that must round exactly as torch does:
// dtype conversion (torch's `.to()`), done by LibTorch.
//
// LibTorch costs time and resident code just to load, so ckpt-tool
// does not link it: convert_elements loads the plugin libckpt_torch.so (next to
// the executable, or $CKPT_TORCH_PLUGIN, or a path given) on first use. Commands that only copy
// bytes never load it, nor diff but where a side is converted as read (a
// DeepSpeed buffer); integers to float32 and float64 are cast here, without it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/format/dtype.hpp"

namespace ckpt {

// Converts `numel` elements from `source` (of `from`) into `dest` (of `to`).
void convert_elements(DType from, DType to, const std::byte* source, std::byte* dest, std::uint64_t numel);

// More places to look for the plugin, after $CKPT_TORCH_PLUGIN and before the
// executable's folder: a process that is not ckpt-tool (Python, with the module)
// knows where meson built and installed it. Call before the first conversion.
void add_torch_plugin_paths(const std::vector<std::string>& paths);

}  // namespace ckpt
