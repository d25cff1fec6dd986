/* The plugin libckpt_torch.so's C interface, shared by the plugin and its
 * loader (src/exec/torch_plugin.cpp). dtypes are ckpt::DType values. Each call
 * returns 0, or non-zero with a message in `error`.
 *
 * The plugin exports ckpt_torch_abi_version(), which returns the
 * CKPT_TORCH_PLUGIN_VERSION it was built with; the loader refuses a plugin
 * whose version differs from its own (a libckpt_torch.so of another ckpt-tool
 * build found first on the search path). Raise the version whenever a
 * signature below, or the meaning of a DType value, changes. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CKPT_TORCH_PLUGIN_VERSION 2

typedef int (*ckpt_torch_abi_version_fn)(void);

typedef int (*ckpt_torch_convert_fn)(int from, int to, const void* source, void* dest, uint64_t numel, char* error,
                                     size_t error_len);

#ifdef __cplusplus
}
#endif
