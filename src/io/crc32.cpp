#include "ckpt/io/crc32.hpp"

#include <algorithm>

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

std::uint32_t crc32_update_from(std::uint32_t crc, const MappedFile& file, std::uint64_t offset, std::uint64_t nbytes,
                                std::vector<std::byte>& buffer) {
  constexpr std::uint64_t kChunkBytes = 8u << 20;
  if (buffer.size() < std::min(kChunkBytes, nbytes)) buffer.resize(std::min(kChunkBytes, nbytes));
  for (std::uint64_t done = 0; done < nbytes;) {
    std::uint64_t n = std::min<std::uint64_t>(buffer.size(), nbytes - done);
    file.read_at(offset + done, buffer.data(), n);
    crc = crc32_update(crc, Bytes(buffer.data(), n));
    done += n;
  }
  return crc;
}

}  // namespace ckpt
