// Output files that appear under their names only when complete, and never
// in place of an input.
//
// Data goes to a temporary file beside the target (`.NAME.ckpt-tmp-PID`), created
// at its final size (the blocks reserved, so a full disk fails before any copy);
// `finish()` fsyncs and closes it, `commit()` renames it into place (refusing to
// replace an existing file unless `overwrite`) and fsyncs the directory. A file
// that is never committed is removed by the destructor, and by the SIGINT,
// SIGTERM and SIGHUP handlers installed with `install_cleanup_handlers()`, so a
// failed or interrupted run leaves nothing behind and never clobbers an existing
// output. A run killed with SIGKILL leaves its temporary files: the pid in their
// name tells the next run over the same outputs that they are stale
// (`check_output_targets` removes them and says so).
//
// Direct I/O (O_DIRECT) is opt-in per file: the executor writes whole aligned
// blocks around the page cache, so the data reaches the disk while it is copied
// and fsync has nothing left to flush. Where the file system refuses O_DIRECT,
// when it is switched on or at any write (EINVAL), the file goes on buffered.
#pragma once

#include <signal.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/io/byte_reader.hpp"
#include "ckpt/io/mapped_file.hpp"

namespace ckpt {

class OutputFile {
 public:
  // Throws Error when the target exists (and !overwrite), or its directory is
  // missing or not writable, or the blocks cannot be reserved.
  OutputFile(std::string target_path, std::uint64_t size_bytes, bool overwrite);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  // Offsets, lengths and buffer addresses of direct writes are multiples of this.
  static constexpr std::uint64_t kDirectAlignment = 4096;

  // The same temporary file, created by another process of a job (job.hpp):
  // attach() opens it to write a part of it (finish() then makes that part
  // durable, leaving the size to the creator); adopt() takes it finished, to
  // rename it into place. Neither removes it: its creator does, unless told
  // that it was committed (release()).
  static std::unique_ptr<OutputFile> attach(std::string target_path, std::string temp_path, std::uint64_t size_bytes);
  static std::unique_ptr<OutputFile> adopt(std::string target_path, std::string temp_path, std::uint64_t size_bytes,
                                           bool overwrite);
  // Another process renamed the file into place: it is no longer removed.
  void release();

  const std::string& target_path() const { return target_path_; }
  const std::string& temp_path() const { return temp_path_; }
  // Switches the file to direct I/O; false (and still buffered) where refused.
  bool enable_direct_io();
  void disable_direct_io() const;
  bool direct_io() const { return direct_.load(); }
  // Thread-safe positional write of all of `bytes` (pwrite loop). In direct mode
  // the write must be aligned. Only a write ending at padded_size() with an
  // aligned start (a whole last block) may run past the planned size; finish()
  // cuts the file to its size.
  void write_at(std::uint64_t byte_offset, Bytes bytes) const;
  // Cuts the temporary file to its size, fsyncs and closes it: its data is
  // durable, under the temporary name. No more writes. With `sync` false, the
  // fsync is left to sync_finished() (a caller finishing hundreds of files
  // syncs them together, without holding hundreds of descriptors open).
  void finish(bool sync = true);
  // After finish(false): makes the temporary file durable (fsync through a new
  // read-only descriptor). Thread-safe across files.
  void sync_finished() const;
  // Renames the finished file into place; with `sync_directory`, fsyncs the
  // directory too (a caller renaming many files into one directory does that once).
  void commit(bool sync_directory = true);
  bool committed() const { return committed_; }
  // The planned size rounded up to kDirectAlignment (reserved at creation).
  std::uint64_t padded_size() const;

 private:
  std::string target_path_;
  std::string temp_path_;
  std::uint64_t size_bytes_ = 0;
  bool overwrite_ = false;
  int fd_ = -1;
  void* cleanup_ = nullptr;  // its entry in the signal handler's list
  bool committed_ = false;
  bool creator_ = true;  // created the temporary file: removes it unless committed
  mutable std::atomic<bool> direct_{false};
  OutputFile() = default;
};

// Folders made for a run's outputs (and their missing parents), removed again
// by the destructor, deepest first and only while empty, unless kept: a failed
// run leaves no folder it made behind, nor does one ended by SIGINT, SIGTERM
// or SIGHUP (the cleanup handlers remove them after the temporary files).
class MadeDirectories {
 public:
  MadeDirectories() = default;
  // Makes each folder; throws Error naming the first that cannot be made.
  explicit MadeDirectories(const std::vector<std::string>& paths);
  ~MadeDirectories();
  MadeDirectories(MadeDirectories&& other) noexcept
      : made_(std::move(other.made_)), cleanup_(std::move(other.cleanup_)) {
    other.made_.clear();
    other.cleanup_.clear();
  }
  MadeDirectories& operator=(MadeDirectories&&) = delete;
  MadeDirectories(const MadeDirectories&) = delete;
  MadeDirectories& operator=(const MadeDirectories&) = delete;
  void keep();

 private:
  std::vector<std::string> made_;  // in the order made: parents first
  std::vector<void*> cleanup_;     // their entries in the signal handler's list
};

// fsyncs a directory, making the renames in it durable; a failure loses no data
// already synced, so it is not reported.
void sync_directory(const std::string& path);

// Installs handlers that remove uncommitted temporary files on SIGINT, SIGTERM
// and SIGHUP, then end the process by the same signal.
void install_cleanup_handlers();

// Blocks those signals in the calling thread while it lives, so that a set of
// renames runs to its end: a signal that arrives meanwhile is delivered (and
// ends the process) once every file is in place.
class DeferSignals {
 public:
  DeferSignals();
  ~DeferSignals();
  DeferSignals(const DeferSignals&) = delete;
  DeferSignals& operator=(const DeferSignals&) = delete;

 private:
  sigset_t saved_;
};

struct OutputTarget {
  std::string path;
  std::uint64_t size_bytes = 0;
};

// A file's identity (st_dev, st_ino): an output path that names an input,
// through whatever link or spelling, has the input's identity.
using FileIdentity = std::pair<std::uint64_t, std::uint64_t>;
FileIdentity identity_of(const MappedFile& file);
// nullopt when `path` cannot be stat'ed.
std::optional<FileIdentity> identity_of(const std::string& path);

// Everything that can be known about a set of outputs before the first one is
// created, checked for all of them together: each path is not empty, not a
// directory, not one of `inputs` (the same device and inode: a link to an input
// counts), in an existing writable directory, named once, and absent unless
// `overwrite`; and the free space of each file system holds all the outputs
// written to it. Temporary files left there for the same outputs by a run that
// no longer exists (killed with SIGKILL) are removed, each passed to `notice`.
// Throws Error naming the output and the reason.
void check_output_targets(const std::vector<OutputTarget>& targets, const std::vector<FileIdentity>& inputs,
                          bool overwrite, const std::function<void(const std::string&)>& notice);

}  // namespace ckpt
