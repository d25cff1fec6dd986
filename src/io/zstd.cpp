#include "ckpt/io/zstd.hpp"

#include <fmt/format.h>
#include <zstd.h>

#include <memory>
#include <vector>

namespace ckpt {

std::string zstd_compress(std::string_view bytes, const Location& where) {
  std::string compressed(ZSTD_compressBound(bytes.size()), '\0');
  std::size_t n = ZSTD_compress(compressed.data(), compressed.size(), bytes.data(), bytes.size(), 3);
  if (ZSTD_isError(n)) throw Error(where, std::string("zstd: ") + ZSTD_getErrorName(n));
  compressed.resize(n);
  return compressed;
}

namespace {

struct FreeDecompressor {
  void operator()(ZSTD_DCtx* context) const { ZSTD_freeDCtx(context); }
};

}  // namespace

std::string zstd_decompress(Bytes bytes, const Location& where, std::uint64_t max_bytes, std::string_view what) {
  std::unique_ptr<ZSTD_DCtx, FreeDecompressor> context(ZSTD_createDCtx());
  if (!context) throw Error(where, "zstd: cannot create a decompression context");
  std::string text;
  ZSTD_inBuffer in{bytes.data(), bytes.size(), 0};
  std::vector<char> chunk(ZSTD_DStreamOutSize());
  std::size_t frame_left = 1;  // 0 once a frame is complete; zstd keeps the last input byte until it has flushed
  while (in.pos < in.size) {
    ZSTD_outBuffer out{chunk.data(), chunk.size(), 0};
    frame_left = ZSTD_decompressStream(context.get(), &out, &in);
    if (ZSTD_isError(frame_left)) throw Error(where, std::string("zstd: ") + ZSTD_getErrorName(frame_left));
    if (out.pos > max_bytes - text.size()) {
      throw Error(where,
                  fmt::format("zstd: decompresses to more than {} MiB, the limit for {}", max_bytes >> 20, what));
    }
    text.append(chunk.data(), out.pos);
  }
  if (frame_left != 0) throw Error(where, "zstd: truncated (the last frame is incomplete)");
  return text;
}

}  // namespace ckpt
