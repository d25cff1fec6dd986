// The one executor: runs a validated Plan.
//
// Per output file: lay out the zip (every offset is known), create the temporary
// file at its final size, and cut it into aligned units of 8 MiB. A pool of
// threads assembles each unit in an aligned buffer (one pread for a plain range;
// gathered rows, dtype conversion, zeros and inline bytes otherwise), computes
// the CRC-32 of each record's part of it, and writes the unit whole, with direct
// I/O where the file system allows: the data goes to the disk while it is copied
// instead of piling up as dirty pages for fsync. The CRCs are then combined per
// record, the local headers and the central directory written, the file fsynced
// (stage), and every file renamed into place (commit). It makes no decisions:
// the same plan gives the same bytes for any thread count, either I/O mode, and
// any split of its outputs between stages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ckpt/exec/gather.hpp"
#include "ckpt/exec/source_check.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

// Output files are written in units of 8 MiB at 8 MiB-aligned offsets: large
// enough that a direct write runs at the disk's speed (as dd's does with 8 MiB
// blocks), small enough to balance threads and bound memory.
inline constexpr std::uint64_t kUnitBytes = 8ull << 20;
// The units of a file of `file_size` bytes (its last block padded).
std::uint64_t unit_count(std::uint64_t file_size);

// A file whose zip headers touch more 4 KiB blocks than this (64 MiB of them
// kept in memory until the CRCs are known) is written buffered instead.
inline constexpr std::size_t kMaxKeptHeaderBlocks = 16384;

// Told the bytes copied so far and in all, from any thread, one call at a time.
using ProgressFn = std::function<void(std::uint64_t done, std::uint64_t total)>;

struct ExecOptions {
  unsigned threads = 0;    // 0: all cores
  bool overwrite = false;  // --force
  ProgressFn progress;     // none: no progress reports
  // Write around the page cache (O_DIRECT) where the file system allows, at every
  // size: buffered pages still have to reach the disk at fsync, after the copy
  // instead of during it, even where the page cache takes them at memory speed
  // (measured in bench/RESULTS.md).
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

// The protocol, in one process (execute) or split between processes:
//   prepare (once) -> stage (each process, a subset of the outputs) -> commit (once).

// Before anything is written: the outputs' folders made (Plan::directories),
// then everything that can be known about the outputs, for all of them
// together (check_output_targets): none is an input or a file read
// (Plan::read_only), each directory is writable, the space is there; and the files
// of another set (Plan::stale_files) are refused unless `overwrite`. The
// folders are removed again (while empty) unless the caller keeps them once
// committed.
MadeDirectories prepare(const Plan& plan, const ExecOptions& options);

// Outputs written under their temporary names, fsynced, and the input bytes
// they read checked against their CRCs: what commit() renames into place.
// Destroyed uncommitted, it removes them.
struct Staged {
  std::vector<std::unique_ptr<OutputFile>> outputs;
  ExecStats stats;
};

// Writes the outputs `files` (indices in plan.files) to temporary files beside
// their targets, makes them durable and checks the inputs they read; nothing
// is under an output's name yet. The plan must be valid (validate) and its
// outputs checked (check_outputs). Throws Error, leaving nothing behind, when
// an input changed since the plan was made (size, mtime, inode), fails its
// CRC, or a write fails.
Staged stage(const Plan& plan, const std::vector<std::size_t>& files, const ExecOptions& options);

// The steps of stage() for a process that is one of several writing a plan
// (job_exec.hpp), with inputs mapped once (map_sources) and one CRC check for
// all it writes, left to the caller to finish or to send to another process.
std::vector<std::unique_ptr<MappedFile>> map_sources(const Plan& plan);
Staged stage_files(const Plan& plan, const std::vector<std::size_t>& files,
                   const std::vector<const MappedFile*>& sources, const ExecOptions& options, SourceCrcCheck* check);

// The inputs' CRC check of a stage finished (check->finish()), its figures
// in `stats`; nothing but the time when `check` is null (--no-crc-check).
void finish_check(SourceCrcCheck* check, const ExecOptions& options, ExecStats& stats);

// Units [first_unit, end_unit) of output file `file`: a process's part of a
// file that several write at once.
struct FilePart {
  std::size_t file = 0;
  std::uint64_t first_unit = 0;
  std::uint64_t end_unit = 0;
  bool operator==(const FilePart&) const = default;
};
// Writes `part` into `out` (the file's one temporary file, created by the
// process that finishes it) and returns the record bytes written; `report`
// receives what finish_shared needs of it (the CRCs of the part's spans, the
// header blocks among its units). The caller makes the part durable
// (out.finish()).
std::uint64_t write_part(const Plan& plan, const FilePart& part, OutputFile& out,
                         const std::vector<const MappedFile*>& sources, const ExecOptions& options,
                         SourceCrcCheck* check, std::vector<std::byte>& report);
// Once every part of `file` is durable: the reports of all its parts taken
// in, its headers written, and `out` (its creator's) finished, fsynced.
void finish_shared(const Plan& plan, std::size_t file, OutputFile& out, const std::vector<const MappedFile*>& sources,
                   const ExecOptions& options, const std::vector<Bytes>& reports);

// Renames every staged output into place, one after the other with
// SIGINT/SIGTERM/SIGHUP deferred, then removes the plan's stale files (each
// told to `options.notice`). Should a rename fail, the outputs already renamed
// are removed again when they replaced nothing, and the error lists those it
// could not take back (replaced with --force).
void commit(const Plan& plan, Staged& staged, const ExecOptions& options);

// All or nothing, in one process: validate, prepare, stage every output,
// commit. On any error every temporary file and made folder is removed and
// nothing is renamed.
ExecStats execute(const Plan& plan, const ExecOptions& options);

}  // namespace ckpt
