// libFuzzer target: the pickle decoder on arbitrary bytes, then what ckpt-tool
// does with a graph (walk_paths, to_json, config lookups) and the encode ->
// decode -> encode round trip. See fuzz_entry.hpp for the invariants; pickle.dict
// holds the opcodes and the torch names that steer it.
#include <cstddef>
#include <cstdint>

#include "fuzz_entry.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ckpt::fuzz::run_pickle(ckpt::Bytes(reinterpret_cast<const std::byte*>(data), size));
  return 0;
}
