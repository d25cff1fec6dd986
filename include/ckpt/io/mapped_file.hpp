// Read-only memory mapping of an input file (Boost.Interprocess).
//
// The file is opened once and its size, mtime and identity come from fstat of
// that descriptor (which `read_at` reads through). Boost.Interprocess maps by
// name, so the name is checked afterwards to still be the same file (device
// and inode): the recorded size and mtime (what a manifest's freshness check
// compares) belong to the bytes mapped, or the file is refused as replaced
// while being opened. Exactly the fstat size is mapped.
//
// A tensor is only a byte range of its input until the moment it is copied. The
// zip directory and the pickle are parsed straight from the mapping; bulk bytes
// and scattered small reads go through `read_at` (pread) instead, because every
// touched page of a mapping counts in the resident set, and where the page cache
// holds the file in large folios one touch maps up to 2 MiB (see exec.cpp and
// zip.hpp). An empty file is valid and maps to an empty span.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "ckpt/io/byte_reader.hpp"

namespace ckpt {

class MappedFile {
 public:
  // ReadOnly: the pages are the page cache's, and a write to them faults.
  // CopyOnWrite (the Python module's tensors, which their users may change in
  // place): a page written becomes the process's own; the file never changes.
  enum class Access : std::uint8_t { ReadOnly, CopyOnWrite };
  // Throws Error naming `path` when it cannot be opened or mapped.
  explicit MappedFile(std::string path, Access access = Access::ReadOnly);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  Bytes bytes() const { return bytes_; }
  // The mapping's first byte, writable: a CopyOnWrite mapping's only (an
  // InternalError otherwise); null for an empty file.
  std::byte* copy_on_write_data() const;
  std::uint64_t size() const { return bytes_.size(); }
  std::int64_t mtime_ns() const { return mtime_ns_; }
  // The inode's change time: it moves with every write, whatever the mtime is set back to.
  std::int64_t ctime_ns() const { return ctime_ns_; }
  // The file's identity (st_dev, st_ino): what tells an output path that names
  // an input, through whatever link or spelling.
  std::uint64_t device() const { return device_; }
  std::uint64_t inode() const { return inode_; }

  // pread: copying data through a buffer costs no page faults and no resident
  // mapped pages (see exec.cpp).
  void read_at(std::uint64_t byte_offset, std::byte* out, std::uint64_t nbytes) const;
  // Drops the mapping's resident pages (madvise MADV_DONTNEED: the page cache
  // keeps them, a later touch maps them again): called after parsing a file's
  // zip directory, so that hundreds of inputs do not add up in the resident set.
  void drop_resident_pages() const;

 private:
  struct Region;
  std::string path_;
  std::unique_ptr<Region> region_;  // the Boost mapping; null for an empty file
  Bytes bytes_;                     // the whole mapping; empty (and nothing mapped) for an empty file
  std::int64_t mtime_ns_ = 0;
  std::int64_t ctime_ns_ = 0;
  std::uint64_t device_ = 0;
  std::uint64_t inode_ = 0;
  Access access_ = Access::ReadOnly;
  int fd_ = -1;
};

}  // namespace ckpt
