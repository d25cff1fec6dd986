// The one executor: runs a validated Plan.
//
// Per output file: lay out the zip (every offset is known), create the temporary
// file at its final size, and cut it into aligned units of 8 MiB. A pool of
// threads assembles each unit in an aligned buffer (one pread for a plain range;
// gathered rows, dtype conversion, zeros and inline bytes otherwise), computes
// the CRC-32 of each record's part of it, and writes the unit whole, with direct
// I/O where the file system allows: the data goes to the disk while it is copied
// instead of piling up as dirty pages for fsync (4 GiB here: 2.9 s direct against
// 4.6-6.1 s buffered plus fsync, with dd). The CRCs are then combined per record,
// the local headers and the central directory written, the file fsynced and
// renamed. It makes no decisions: the same plan gives the same bytes for any
// thread count and either I/O mode.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "ckpt/exec/gather.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

// A file whose zip headers touch more 4 KiB blocks than this (64 MiB of them
// kept in memory until the CRCs are known) is written buffered instead.
inline constexpr std::size_t kMaxKeptHeaderBlocks = 16384;

// Told the bytes copied so far and in all, from any thread, one call at a time.
using ProgressFn = std::function<void(std::uint64_t done, std::uint64_t total)>;

struct ExecOptions {
  unsigned threads = 0;    // 0: all cores
  bool overwrite = false;  // --force
  // Other files the run read (a manifest): never an output, like the sources.
  std::vector<std::string> also_read;
  ProgressFn progress;  // none: no progress reports
  // Write around the page cache (O_DIRECT) where the file system allows, at every
  // size: a stitch of 2 x 4 shards on this 2-core VM (ext4, 7 interleaved runs,
  // medians) took 0.18 s direct against 0.75 s buffered at 0.25 GiB, 0.86 s
  // against 3.4 s at 1 GiB, 1.6 s against 6.8 s at 2 GiB (cp + sync: 0.19, 1.04,
  // 2.38 s): buffered pages still have to reach the disk at fsync, after the copy
  // instead of during it, even where the page cache takes them at memory speed.
  bool direct_io = true;
  bool check_crc = true;  // every input byte copied checked against its record's CRC-32 (source_check.hpp)
  // Told what was cleaned up on the way (temporary files of a killed run).
  std::function<void(const std::string&)> notice;
  // Converts `numel` elements between dtypes exactly as torch's `.to()` does;
  // needed by plans with converting copies (LibTorch lives in the caller).
  ConvertFn convert;
};

struct ExecStats {
  std::uint64_t bytes_written = 0;
  double seconds = 0.0;
  double create_seconds = 0.0;         // temp files created at their final size (fallocate), units cut
  double copy_seconds = 0.0;           // the parallel copy
  double commit_seconds = 0.0;         // headers, fsync, rename
  double crc_seconds = 0.0;            // the inputs' CRCs joined, unread bytes read
  std::size_t direct_files = 0;        // files written with direct I/O
  bool crc_checked = false;            // inputs checked against their CRCs
  std::uint64_t crc_reread_bytes = 0;  // input bytes read again for that (not read by any copy)
};

// All or nothing: every output is checked before the first is created
// (check_output_targets), all are written to temporary files and fsynced, the
// inputs' CRCs are checked, and only then are they renamed into place, one after
// the other with SIGINT/SIGTERM/SIGHUP deferred. On any error every temporary
// file is removed and nothing is renamed. Should a rename itself fail, the
// outputs already renamed are removed again when they replaced nothing, and
// the error lists those it could not take back (replaced with --force).
ExecStats execute(const Plan& plan, const ExecOptions& options);

}  // namespace ckpt
