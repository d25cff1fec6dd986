#include "ckpt/io/error.hpp"

#include <fmt/format.h>

namespace ckpt {

std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    auto byte = static_cast<unsigned char>(text[i]);
    if (byte == 0xc2 && i + 1 < text.size()) {
      auto next = static_cast<unsigned char>(text[i + 1]);
      if (next >= 0x80 && next <= 0x9f) {
        out += fmt::format("\\u{:04x}", next);
        ++i;
        continue;
      }
    }
    if (byte >= 0x20 && byte != 0x7f) {
      out += static_cast<char>(byte);
    } else if (byte == '\n') {
      out += "\\n";
    } else if (byte == '\t') {
      out += "\\t";
    } else if (byte == '\r') {
      out += "\\r";
    } else {
      out += fmt::format("\\x{:02x}", byte);
    }
  }
  return out;
}

Error::Error(Location where, std::string message)
    : std::runtime_error(printable(render(where, message))), where_(std::move(where)), message_(std::move(message)) {}

std::string Error::render(const Location& where, const std::string& message) {
  std::string out;
  if (!where.file.empty()) out += where.file + ": ";
  if (!where.member.empty()) out += where.member + ": ";
  if (where.byte_offset) out += fmt::format("at byte 0x{:x}: ", *where.byte_offset);
  return out + message;
}

void internal_error(std::string_view what, SourceLocation where) {
  std::string_view file = where.file_name();
  if (auto src = file.rfind("src/"); src != std::string_view::npos) file.remove_prefix(src);
  throw InternalError(fmt::format("{} ({}:{})", what, file, where.line()));
}

std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, const char* what) {
  std::uint64_t sum = 0;
  if (__builtin_add_overflow(a, b, &sum)) throw Error(fmt::format("{}: size overflows 64 bits", what));
  return sum;
}

std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what) {
  std::uint64_t product = 0;
  if (__builtin_mul_overflow(a, b, &product)) throw Error(fmt::format("{}: size overflows 64 bits", what));
  return product;
}

}  // namespace ckpt
