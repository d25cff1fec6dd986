// zstd, for the files ckpt-tool writes and reads back (manifests, plans).
// Compressed bytes read back are untrusted: the size a frame declares is not
// believed, and decompression stops as soon as the output passes a limit.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "ckpt/io/byte_reader.hpp"
#include "ckpt/io/error.hpp"

namespace ckpt {

// One zstd frame of `bytes` (level 3). Throws Error at `where` when zstd fails.
std::string zstd_compress(std::string_view bytes, const Location& where);

// The bytes of a zstd stream (one frame or several). Throws Error at `where`
// for a stream that is malformed or truncated, or that expands past
// `max_bytes` ("decompresses to more than N MiB, the limit for <what>").
std::string zstd_decompress(Bytes bytes, const Location& where, std::uint64_t max_bytes, std::string_view what);

}  // namespace ckpt
