// libFuzzer target: the safetensors header reader on arbitrary bytes, and what
// it accepts written again by our renderer and read back. See fuzz_entry.hpp.
#include <cstddef>
#include <cstdint>

#include "fuzz_entry.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ckpt::fuzz::run_safetensors(ckpt::Bytes(reinterpret_cast<const std::byte*>(data), size));
  return 0;
}
