// Read-only memory mapping of an input file (Boost.Interprocess).
//
// Inputs are never read with read(2): the zip reader, the pickle decoder and the
// executor all look at the same mapping, so a tensor is only a byte range of it
// until the moment it is copied. An empty file is valid and maps to an empty span.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "ckpt/byte_reader.hpp"

namespace ckpt {

class MappedFile {
 public:
  // Throws Error naming `path` when it cannot be opened or mapped.
  explicit MappedFile(std::string path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  Bytes bytes() const { return bytes_; }
  std::uint64_t size() const { return bytes_.size(); }
  std::int64_t mtime_ns() const { return mtime_ns_; }

  // Tells the kernel a byte range is no longer needed (MADV_DONTNEED on the
  // read-only mapping just drops our page-table entries; the page cache stays).
  void release(std::uint64_t byte_offset, std::uint64_t nbytes) const;
  // pread: copying data through a buffer costs no page faults (see exec.cpp).
  void read_at(std::uint64_t byte_offset, std::byte* out, std::uint64_t nbytes) const;


 private:
  struct Impl;
  std::string path_;
  std::unique_ptr<Impl> impl_;
  Bytes bytes_;
  std::int64_t mtime_ns_ = 0;
  int fd_ = -1;
};

}  // namespace ckpt
