// The synthetic data of `ckpt-tool synth`: an endless, deterministic stream of
// plausible values (floats in [-0.05, 0.05), random integers), element i a pure
// function of i, so any slice can be generated alone, by any thread.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ckpt/format/dtype.hpp"

namespace ckpt {

// Writes the stream's bytes [byte_offset, byte_offset + count) for `dtype`;
// both must be multiples of the itemsize.
void synthesize(DType dtype, std::uint64_t byte_offset, std::uint64_t count, std::byte* out);

}  // namespace ckpt
