#include "ckpt/io/mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/interprocess/file_mapping.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <cerrno>
#include <cstring>

namespace ckpt {

namespace bip = boost::interprocess;

struct MappedFile::Region {
  bip::mapped_region region;
};

MappedFile::MappedFile(std::string path, Access access) : path_(std::move(path)), access_(access) {
  const Location where{path_, "", std::nullopt};
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer; only regular
  // files pass the check below, for which the flag means nothing.
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) {
    const int error = errno;
    throw Error(kind_of_errno(error), where, std::string("cannot open: ") + std::strerror(error));
  }
  // The destructor does not run when the constructor throws: close here.
  auto fail = [&](ErrorKind kind, const std::string& message) {
    ::close(fd_);
    fd_ = -1;
    throw Error(kind, where, message);
  };
  struct stat info {};
  if (::fstat(fd_, &info) != 0) fail(ErrorKind::Io, std::string("cannot stat: ") + std::strerror(errno));
  if (!S_ISREG(info.st_mode)) fail(ErrorKind::BadInput, "not a regular file");
  mtime_ns_ = static_cast<std::int64_t>(info.st_mtim.tv_sec) * 1'000'000'000 + info.st_mtim.tv_nsec;
  ctime_ns_ = static_cast<std::int64_t>(info.st_ctim.tv_sec) * 1'000'000'000 + info.st_ctim.tv_nsec;
  device_ = static_cast<std::uint64_t>(info.st_dev);
  inode_ = static_cast<std::uint64_t>(info.st_ino);
  if (info.st_size == 0) return;
  auto nbytes = static_cast<std::uint64_t>(info.st_size);
  try {
    bip::file_mapping mapping(path_.c_str(), bip::read_only);  // its descriptor closes here; the mapping stays
    const bip::mode_t mode = access == Access::CopyOnWrite ? bip::copy_on_write : bip::read_only;
    region_ = std::make_unique<Region>(Region{bip::mapped_region(mapping, mode, 0, nbytes)});
  } catch (const bip::interprocess_exception& e) {
    fail(ErrorKind::Io, std::string("cannot map: ") + e.what());
  }
  struct stat now {};
  if (::stat(path_.c_str(), &now) != 0 || now.st_dev != info.st_dev || now.st_ino != info.st_ino ||
      now.st_size < info.st_size) {
    region_.reset();
    fail(ErrorKind::Io, "replaced or truncated by another process while being opened");
  }
  bytes_ = Bytes(static_cast<const std::byte*>(region_->region.get_address()), nbytes);
}

std::byte* MappedFile::copy_on_write_data() const {
  check_invariant(access_ == Access::CopyOnWrite, "a writable pointer into a read-only mapping");
  return region_ ? static_cast<std::byte*>(region_->region.get_address()) : nullptr;
}

void MappedFile::drop_resident_pages() const {
  if (bytes_.empty()) return;
  // The mapping starts on a page boundary; its end is rounded up by the kernel.
  // Advice only: a failure changes nothing but the resident set.
  ::madvise(const_cast<std::byte*>(bytes_.data()), bytes_.size(), MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::read_at(std::uint64_t byte_offset, std::byte* out, std::uint64_t nbytes) const {
  while (nbytes > 0) {
    ssize_t n = ::pread(fd_, out, nbytes, static_cast<off_t>(byte_offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int error = errno;
      throw Error(n == 0 ? ErrorKind::Io : kind_of_errno(error), Location{path_, "", byte_offset},
                  n == 0 ? "file shrank while being read" : std::string("read failed: ") + std::strerror(error));
    }
    out += n;
    nbytes -= static_cast<std::uint64_t>(n);
    byte_offset += static_cast<std::uint64_t>(n);
  }
}

}  // namespace ckpt
