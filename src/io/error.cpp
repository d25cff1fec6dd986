#include "ckpt/error.hpp"

#include <fmt/format.h>

namespace ckpt {

Error::Error(Location where, std::string message)
    : std::runtime_error(render(where, message)),
      where_(std::move(where)),
      message_(std::move(message)) {}

std::string Error::render(const Location& where, const std::string& message) {
  std::string out;
  if (!where.file.empty()) out += where.file + ": ";
  if (!where.member.empty()) out += where.member + ": ";
  if (where.byte_offset) out += fmt::format("at byte 0x{:x}: ", *where.byte_offset);
  return out + message;
}

Error Error::with_file(const std::string& file) const {
  if (!where_.file.empty()) return *this;
  Location loc = where_;
  loc.file = file;
  return Error(std::move(loc), message_);
}

Error Error::with_member(const std::string& member) const {
  if (!where_.member.empty()) return *this;
  Location loc = where_;
  loc.member = member;
  return Error(std::move(loc), message_);
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
