// The one bounds-checked reader through which every untrusted byte is parsed.
//
// A ByteReader walks a span that is a window of a file starting at absolute offset
// `base_offset`; every read checks the bytes remaining and throws an Error that
// names the file, the member being parsed and the absolute byte offset. Integers
// are little-endian, as in both zip and pickle. The reader keeps views of the
// file and member names (a reader is made per zip record): they must outlive it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "ckpt/io/error.hpp"

namespace ckpt {

using Bytes = std::span<const std::byte>;

inline std::string_view as_chars(Bytes bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

class ByteReader {
 public:
  ByteReader(Bytes bytes, std::string_view file, std::string_view member, std::uint64_t base_offset = 0)
      : bytes_(bytes), file_(file), member_(member), base_offset_(base_offset) {}

  std::size_t position() const { return position_; }
  std::uint64_t absolute_offset() const { return base_offset_ + position_; }
  std::size_t remaining() const { return bytes_.size() - position_; }
  bool at_end() const { return position_ == bytes_.size(); }

  void seek(std::size_t position) {
    if (position > bytes_.size()) fail(position, "offset lies past the end of the data");
    position_ = position;
  }
  void skip(std::size_t count) { take(count); }

  std::uint8_t u8() { return static_cast<std::uint8_t>(take(1)[0]); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(little_endian(take(2))); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(little_endian(take(4))); }
  std::uint64_t u64() { return little_endian(take(8)); }
  std::int32_t i32() { return static_cast<std::int32_t>(u32()); }

  Bytes take(std::size_t count) {
    if (count > remaining()) {
      fail(position_, "truncated: needs " + std::to_string(count) + " bytes, " + std::to_string(remaining()) + " left");
    }
    Bytes out = bytes_.subspan(position_, count);
    position_ += count;
    return out;
  }
  std::string_view text(std::size_t count) { return as_chars(take(count)); }
  Bytes rest() const { return bytes_.subspan(position_); }

  // Throws an Error located at `position` (relative to this reader's window).
  [[noreturn]] void fail(std::size_t position, const std::string& message) const {
    throw Error(Location{std::string(file_), std::string(member_), base_offset_ + position}, message);
  }
  [[noreturn]] void fail_here(const std::string& message) const { fail(position_, message); }

 private:
  static std::uint64_t little_endian(Bytes bytes) {
    std::uint64_t value = 0;
    for (std::size_t i = bytes.size(); i-- > 0;) value = (value << 8) | static_cast<std::uint8_t>(bytes[i]);
    return value;
  }

  Bytes bytes_;
  std::string_view file_;
  std::string_view member_;
  std::uint64_t base_offset_;
  std::size_t position_ = 0;
};

}  // namespace ckpt
