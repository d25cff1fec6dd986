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

#define CKPT_TORCH_PLUGIN_VERSION 1

typedef int (*ckpt_torch_abi_version_fn)(void);

struct ckpt_torch_comparison {
  uint64_t count;
  double max_abs;
  double max_rel;
  uint64_t positions; /* filled entries of the position arrays */
};

typedef int (*ckpt_torch_convert_fn)(int from, int to, const void* source, void* dest, uint64_t numel, char* error,
                                     size_t error_len);
typedef int (*ckpt_torch_compare_fn)(int dtype, const void* a, const void* b, uint64_t numel, double atol, double rtol,
                                     uint64_t max_positions, struct ckpt_torch_comparison* result, uint64_t* indices,
                                     double* values_a, double* values_b, char* error, size_t error_len);

#ifdef __cplusplus
}
#endif
