// The one little-endian writer, the counterpart of byte_reader.hpp: zip headers
// and pickles are rendered through it into a growing byte vector.
//
// Each integer writer stores the low bytes of its argument, so a caller passes
// any unsigned value and gets exactly the field width the format defines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace ckpt {

class ByteWriter {
 public:
  void u8(std::uint64_t value) { out_.push_back(static_cast<std::byte>(value & 0xFF)); }
  void u16(std::uint64_t value) { le(value, 2); }
  void u32(std::uint64_t value) { le(value, 4); }
  void u64(std::uint64_t value) { le(value, 8); }
  // The low `nbytes` bytes of `value` (at most 8), least significant first.
  void le(std::uint64_t value, int nbytes) {
    for (int i = 0; i < nbytes; ++i) u8(value >> (8 * i));
  }
  // Big-endian, most significant first (pickle's BINFLOAT).
  void u64_big_endian(std::uint64_t value) {
    for (int i = 7; i >= 0; --i) u8(value >> (8 * i));
  }
  void text(std::string_view bytes) {
    for (char c : bytes) u8(static_cast<unsigned char>(c));
  }

  std::size_t size() const { return out_.size(); }
  std::span<const std::byte> bytes() const { return out_; }
  void clear() { out_.clear(); }
  std::vector<std::byte> take() { return std::move(out_); }

 private:
  std::vector<std::byte> out_;
};

}  // namespace ckpt
