#include "ckpt/io/crc32.hpp"

#include <isa-l/crc.h>
#include <zlib.h>

namespace ckpt {

std::uint32_t crc32_update(std::uint32_t crc, Bytes bytes) {
  // isa-l takes a 64-bit length; no need to split.
  return crc32_gzip_refl(crc, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
}

std::uint32_t crc32_concat(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t length_b) {
  return static_cast<std::uint32_t>(::crc32_combine64(crc_a, crc_b, static_cast<z_off64_t>(length_b)));
}

}  // namespace ckpt
