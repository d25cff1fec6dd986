// CRC-32 as zip uses it (reflected, polynomial 0xEDB88320), computed with isa-l
// (several times zlib's speed on one core), and zlib's
// crc32_combine to join the CRCs of pieces copied by different threads.
#pragma once

#include <cstdint>

#include <vector>

#include "ckpt/io/byte_reader.hpp"
#include "ckpt/io/mapped_file.hpp"

namespace ckpt {

// CRC of `bytes` continuing from `crc` (0 for a fresh CRC).
std::uint32_t crc32_update(std::uint32_t crc, Bytes bytes);
inline std::uint32_t crc32(Bytes bytes) {
  return crc32_update(0, bytes);
}

// CRC of A followed by B, given crc(A), crc(B) and the length of B.
std::uint32_t crc32_concat(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t length_b);

// `crc` updated with bytes [offset, offset + nbytes) of `file`, read with pread in
// chunks of at most 8 MiB through `buffer` (rather than from the mapping: the
// resident set stays one buffer whatever the size). Throws Error when a read fails.
std::uint32_t crc32_update_from(std::uint32_t crc, const MappedFile& file, std::uint64_t offset, std::uint64_t nbytes,
                                std::vector<std::byte>& buffer);

}  // namespace ckpt
