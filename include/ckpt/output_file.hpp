// An output file that appears under its name only when complete.
//
// Data goes to a temporary file beside the target (`.NAME.ckpt-tmp-PID`), created
// at its final size; `commit()` fsyncs it, renames it into place (refusing to
// replace an existing file unless `overwrite`) and fsyncs the directory. A file
// that is never committed is removed by the destructor, and by the SIGINT/SIGTERM
// handler installed with `install_cleanup_handlers()`, so a failed or interrupted
// run leaves nothing behind and never clobbers an existing output.
#pragma once

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

  const std::string& target_path() const { return target_path_; }
  // Thread-safe positional write of all of `bytes` (pwrite loop).
  void write_at(std::uint64_t byte_offset, Bytes bytes) const;
  void commit();

 private:
  std::string target_path_;
  std::string temp_path_;
  std::uint64_t size_bytes_ = 0;
  bool overwrite_ = false;
  int fd_ = -1;
  int cleanup_slot_ = -1;
  bool committed_ = false;
};

// Installs handlers that remove uncommitted temporary files on SIGINT/SIGTERM.
void install_cleanup_handlers();

}  // namespace ckpt
