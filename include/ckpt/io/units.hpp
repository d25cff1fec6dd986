// Byte counts for people: the one rendering every message and report uses.
#pragma once

#include <cstdint>
#include <string>

namespace ckpt {

// "12.3 MiB" (binary units; bytes below 1 KiB exactly: "512 B").
std::string human_bytes(std::uint64_t nbytes);

}  // namespace ckpt
