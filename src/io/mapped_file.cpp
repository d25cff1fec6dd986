#include "ckpt/mapped_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/interprocess/file_mapping.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <cerrno>
#include <cstring>

namespace ckpt {

namespace bip = boost::interprocess;

struct MappedFile::Impl {
  bip::file_mapping mapping;
  bip::mapped_region region;
};

MappedFile::MappedFile(std::string path) : path_(std::move(path)) {
  struct stat info {};
  if (::stat(path_.c_str(), &info) != 0) {
    throw Error(Location{path_, "", std::nullopt}, std::string("cannot open: ") + std::strerror(errno));
  }
  if (!S_ISREG(info.st_mode)) throw Error(Location{path_, "", std::nullopt}, "not a regular file");
  mtime_ns_ = static_cast<std::int64_t>(info.st_mtim.tv_sec) * 1'000'000'000 + info.st_mtim.tv_nsec;
  device_ = static_cast<std::uint64_t>(info.st_dev);
  inode_ = static_cast<std::uint64_t>(info.st_ino);
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw Error(Location{path_, "", std::nullopt}, std::string("cannot open: ") + std::strerror(errno));
  if (info.st_size == 0) return;
  try {
    impl_ = std::make_unique<Impl>();
    impl_->mapping = bip::file_mapping(path_.c_str(), bip::read_only);
    impl_->region = bip::mapped_region(impl_->mapping, bip::read_only);
  } catch (const bip::interprocess_exception& e) {
    throw Error(Location{path_, "", std::nullopt}, std::string("cannot map: ") + e.what());
  }
  bytes_ = Bytes(static_cast<const std::byte*>(impl_->region.get_address()), impl_->region.get_size());
}

MappedFile::~MappedFile() {
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::read_at(std::uint64_t byte_offset, std::byte* out, std::uint64_t nbytes) const {
  while (nbytes > 0) {
    ssize_t n = ::pread(fd_, out, nbytes, static_cast<off_t>(byte_offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      throw Error(Location{path_, "", byte_offset},
                  n == 0 ? "file shrank while being read" : std::string("read failed: ") + std::strerror(errno));
    }
    out += n;
    nbytes -= static_cast<std::uint64_t>(n);
    byte_offset += static_cast<std::uint64_t>(n);
  }
}

}  // namespace ckpt
