// libFuzzer target: the zip reader (ZipArchive) on arbitrary bytes, every
// record's data span read, and the archive rewritten by our writer and parsed
// back. See fuzz_entry.hpp for the invariants.
#include <cstddef>
#include <cstdint>

#include "fuzz_entry.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ckpt::fuzz::run_zip(ckpt::Bytes(reinterpret_cast<const std::byte*>(data), size));
  return 0;
}
