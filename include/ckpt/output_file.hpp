// An output file that appears under its name only when complete.
//
// Data goes to a temporary file beside the target (`.NAME.ckpt-tmp-PID`), created
// at its final size; `commit()` fsyncs it, renames it into place (refusing to
// replace an existing file unless `overwrite`) and fsyncs the directory. A file
// that is never committed is removed by the destructor, and by the SIGINT/SIGTERM
// handler installed with `install_cleanup_handlers()`, so a failed or interrupted
// run leaves nothing behind and never clobbers an existing output.
//
// Direct I/O (O_DIRECT) is opt-in per file: the executor writes whole aligned
// blocks around the page cache, so the data reaches the disk while it is copied
// and fsync has nothing left to flush. Where the file system refuses O_DIRECT,
// when it is switched on or at any write (EINVAL), the file goes on buffered.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "ckpt/byte_reader.hpp"

namespace ckpt {

class OutputFile {
 public:
  // Throws Error when the target exists (and !overwrite), or its directory is
  // missing or not writable.
  OutputFile(std::string target_path, std::uint64_t size_bytes, bool overwrite);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  // Offsets, lengths and buffer addresses of direct writes are multiples of this.
  static constexpr std::uint64_t kDirectAlignment = 4096;

  const std::string& target_path() const { return target_path_; }
  // Switches the file to direct I/O; false (and still buffered) where refused.
  bool enable_direct_io();
  void disable_direct_io() const;
  bool direct_io() const { return direct_.load(); }
  // Thread-safe positional write of all of `bytes` (pwrite loop). In direct mode
  // the write must be aligned. Only a write ending at padded_size() with an
  // aligned start (a whole last block) may run past the planned size; commit()
  // cuts the file to its size.
  void write_at(std::uint64_t byte_offset, Bytes bytes) const;
  void commit();
  // The planned size rounded up to kDirectAlignment (reserved at creation).
  std::uint64_t padded_size() const;

 private:
  std::string target_path_;
  std::string temp_path_;
  std::uint64_t size_bytes_ = 0;
  bool overwrite_ = false;
  int fd_ = -1;
  int cleanup_slot_ = -1;
  bool committed_ = false;
  mutable std::atomic<bool> direct_{false};
};

// Installs handlers that remove uncommitted temporary files on SIGINT/SIGTERM.
void install_cleanup_handlers();

}  // namespace ckpt
