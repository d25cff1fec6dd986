// A plan written down, to be run later or elsewhere (`--save-plan`, `ckpt-tool
// apply`, and the processes of a distributed run): every field of the Plan, by
// value, in a compact binary form.
//
//   "CKPTPLAN", u32 version, u32 CRC-32 of the expanded plan, then one zstd frame of:
//   sources: u64 count, each: str path, u64 size, i64 mtime_ns, u64 device,
//            u64 inode, u8 has_crcs, i64 ctime_ns, u64 count, each record: u64 offset,
//            u64 nbytes, u32 crc32
//   files:   u64 count, each: str path, u8 container, u8 packed, then
//            packed 0: its records (below)
//            packed 1: u64 file size, u64 record bytes, str: one zstd frame of its records
//   records: for container Archives: u64 count, each u64 first record; then u64
//            count, each record: str name, u64 nbytes, u8 inline_zstd, str
//            inline_bytes, u64 count, each copy: u32 source, u64 source_offset,
//            u64 offset, u64 nbytes, u64 rows, u64 source_stride, u64 stride,
//            u8 source_dtype, u8 dest_dtype
//   directories, stale_files, read_only: u64 count, each str
// Integers little-endian; str is u64 length + bytes. (Version 1 had no packed
// byte: plans saved by an older ckpt-tool are refused, to be made again.)
//
// A plan file is input like any other: reading one checks its CRC-32, every
// count against the bytes left, every enum value and path, and then the whole
// plan as validate does (validate_untrusted), before anything uses it. The CRC
// catches a damaged file, not a malicious one: a plan says which bytes to write
// where (an output's pickle among them), so a plan from someone else is to be
// trusted like a script from them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/io/byte_reader.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

inline constexpr std::uint32_t kPlanFileVersion = 2;
// What a plan may expand to: 1 GiB, about 50 times a plan of OPT-175B's 992 shards.
inline constexpr std::uint64_t kMaxPlanBytes = 1ull << 30;

// Puts `file`'s records away (PlannedFile::packed), in the encoding above;
// a packed file stays as it is.
void pack(PlannedFile& file);
// The records of packed `file`, read back. `origin` names where the file came
// from: a packed file of a plan file is checked like the rest of it (Error).
PlannedFile unpack(const PlannedFile& file, const std::string& origin = "a packed plan");

std::vector<std::byte> serialize_plan(const Plan& plan);
// The plan in `bytes` (read from `origin`), checked. Throws Error naming
// `origin`, the field and the byte offset in the expanded plan.
Plan parse_plan(Bytes bytes, const std::string& origin);

// Every path of `plan` made absolute: what parse_plan accepts.
void make_paths_absolute(Plan& plan);

// Writes the plan atomically (temp file, fsync, rename), every path in it made
// absolute (it may be applied from another directory); refuses to replace an
// existing file unless `overwrite`, and any of the plan's inputs.
void write_plan(Plan plan, const std::string& path, bool overwrite);
Plan read_plan(const std::string& path);

}  // namespace ckpt
