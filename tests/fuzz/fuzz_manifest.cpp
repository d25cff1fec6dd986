// libFuzzer target: a manifest file (JSON, or zstd-compressed JSON when the input
// starts with the zstd magic) through parse_manifest, the path read_manifest
// takes, then what the commands do next with it: the grid, each tensor's byte
// range and its pieces (source_of), the consolidation of each part, the object
// tree as inspect walks it, and the JSON round trip. See fuzz_entry.hpp for the
// invariants; manifest.dict holds the schema's keys and values.
#include <cstddef>
#include <cstdint>

#include "ckpt/manifest/manifest_json.hpp"
#include "fuzz_entry.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ckpt::fuzz::run_manifest(ckpt::Bytes(reinterpret_cast<const std::byte*>(data), size));
  return 0;
}
