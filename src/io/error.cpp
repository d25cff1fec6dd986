#include "ckpt/io/error.hpp"

#include <fmt/format.h>

#include <cerrno>

namespace ckpt {

namespace {

// The length of the valid UTF-8 sequence starting at text[i] (2 to 4 bytes: no
// overlong form, no surrogate, at most U+10FFFF), or 0.
std::size_t utf8_sequence(std::string_view text, std::size_t i) {
  auto at = [&](std::size_t k) { return i + k < text.size() ? static_cast<unsigned char>(text[i + k]) : 0u; };
  unsigned char lead = at(0);
  std::size_t length = lead >= 0xc2 && lead <= 0xdf   ? 2
                       : lead >= 0xe0 && lead <= 0xef ? 3
                       : lead >= 0xf0 && lead <= 0xf4 ? 4
                                                      : 0;
  for (std::size_t k = 1; k < length; ++k) {
    if ((at(k) & 0xc0) != 0x80) return 0;
  }
  if ((lead == 0xe0 && at(1) < 0xa0) || (lead == 0xed && at(1) > 0x9f) || (lead == 0xf0 && at(1) < 0x90) ||
      (lead == 0xf4 && at(1) > 0x8f)) {
    return 0;
  }
  return length;
}

}  // namespace

std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    auto byte = static_cast<unsigned char>(text[i]);
    const auto next = i + 1 < text.size() ? static_cast<unsigned char>(text[i + 1]) : 0u;
    if (byte >= 0x80 && !(byte == 0xc2 && next >= 0x80 && next <= 0x9f)) {  // (C1 controls: below)
      // Text as found in a file or a name: bytes that are not UTF-8 are escaped too.
      std::size_t length = utf8_sequence(text, i);
      if (length == 0) {
        out += fmt::format("\\x{:02x}", byte);
      } else {
        out.append(text.substr(i, length));
        i += length - 1;
      }
      continue;
    }
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

ErrorKind kind_of_errno(int error_number) {
  return error_number == ENOSPC || error_number == EDQUOT || error_number == EFBIG ? ErrorKind::NoSpace : ErrorKind::Io;
}

Error::Error(ErrorKind kind, Location where, std::string message)
    : std::runtime_error(printable(render(where, message))),
      kind_(kind),
      where_(std::move(where)),
      message_(std::move(message)) {}

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
