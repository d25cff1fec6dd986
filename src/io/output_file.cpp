#include "ckpt/output_file.hpp"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>

#include <fmt/format.h>

namespace ckpt {

namespace {

// Temp paths the signal handler may unlink: fixed buffers, written before the
// slot is published, so the handler only reads stable memory.
constexpr int kCleanupSlots = 64;
constexpr std::size_t kPathMax = 4096;
std::array<std::array<char, kPathMax>, kCleanupSlots> g_cleanup_paths;
std::array<std::atomic<bool>, kCleanupSlots> g_cleanup_used;
std::mutex g_cleanup_mutex;

int register_cleanup(const std::string& path) {
  if (path.size() >= kPathMax) return -1;
  std::lock_guard lock(g_cleanup_mutex);
  for (int i = 0; i < kCleanupSlots; ++i) {
    if (!g_cleanup_used[i].load()) {
      std::memcpy(g_cleanup_paths[i].data(), path.c_str(), path.size() + 1);
      g_cleanup_used[i].store(true);
      return i;
    }
  }
  return -1;
}

void unregister_cleanup(int slot) {
  if (slot >= 0) g_cleanup_used[slot].store(false);
}

extern "C" void remove_temp_files_and_exit(int signal_number) {
  for (int i = 0; i < kCleanupSlots; ++i) {
    if (g_cleanup_used[i].load()) ::unlink(g_cleanup_paths[i].data());
  }
  ::signal(signal_number, SIG_DFL);
  ::raise(signal_number);
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

void install_cleanup_handlers() {
  struct sigaction action {};
  action.sa_handler = remove_temp_files_and_exit;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGTERM, &action, nullptr);
  ::sigaction(SIGHUP, &action, nullptr);
}

OutputFile::OutputFile(std::string target_path, std::uint64_t size_bytes, bool overwrite)
    : target_path_(std::move(target_path)), size_bytes_(size_bytes), overwrite_(overwrite) {
  namespace fs = std::filesystem;
  Location where{target_path_, "", std::nullopt};
  if (!overwrite_ && fs::exists(fs::symlink_status(target_path_))) {
    throw Error(where, "output already exists (use --force to overwrite)");
  }
  fs::path target(target_path_);
  fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(where, "output directory does not exist: " + dir.string());
  temp_path_ = (dir / fmt::format(".{}.ckpt-tmp-{}", target.filename().string(), ::getpid())).string();
  cleanup_slot_ = register_cleanup(temp_path_);
  fd_ = ::open(temp_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    std::string reason = errno_text();
    unregister_cleanup(cleanup_slot_);
    throw Error(where, "cannot create temporary output " + temp_path_ + ": " + reason);
  }
  // Reserve the blocks now so that a full disk fails here, not half-way through;
  // up to the padded end, which a whole last block may be written to.
  auto reserved = static_cast<off_t>(padded_size());
  int rc = ::posix_fallocate(fd_, 0, reserved);
  if (rc == EOPNOTSUPP || rc == EINVAL) rc = ::ftruncate(fd_, reserved) == 0 ? 0 : errno;
  if (rc != 0) {
    std::string reason = std::strerror(rc);
    ::close(fd_);
    ::unlink(temp_path_.c_str());
    unregister_cleanup(cleanup_slot_);
    fd_ = -1;
    throw Error(where, fmt::format("cannot allocate {} bytes for the output: {}", size_bytes_, reason));
  }
}

OutputFile::~OutputFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temp_path_.c_str());
  unregister_cleanup(cleanup_slot_);
}

bool OutputFile::enable_direct_io() {
  int flags = ::fcntl(fd_, F_GETFL);
  if (flags < 0 || ::fcntl(fd_, F_SETFL, flags | O_DIRECT) != 0) return false;
  direct_.store(true);
  return true;
}

void OutputFile::disable_direct_io() const {
  int flags = ::fcntl(fd_, F_GETFL);
  if (flags >= 0) ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT);
  direct_.store(false);
}

std::uint64_t OutputFile::padded_size() const {
  return (size_bytes_ + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
}

void OutputFile::write_at(std::uint64_t byte_offset, Bytes bytes) const {
  std::uint64_t end = byte_offset + bytes.size();
  bool whole_last_block = byte_offset % kDirectAlignment == 0 && end == padded_size();
  if (end > size_bytes_ && !whole_last_block) {
    throw Error(Location{target_path_, "", byte_offset}, "write past the planned end of the output (a bug)");
  }
  while (!bytes.empty()) {
    bool direct = direct_.load();  // before the write: another thread may switch it meanwhile
    ssize_t written = ::pwrite(fd_, bytes.data(), bytes.size(), static_cast<off_t>(byte_offset));
    if (written < 0 && errno == EINTR) continue;
    if (written < 0 && errno == EINVAL && direct) {
      disable_direct_io();  // a file system that takes the flag but not this alignment
      continue;
    }
    if (written <= 0) throw Error(Location{target_path_, "", byte_offset}, "write failed: " + errno_text());
    bytes = bytes.subspan(static_cast<std::size_t>(written));
    byte_offset += static_cast<std::uint64_t>(written);
  }
}

void OutputFile::commit() {
  Location where{target_path_, "", std::nullopt};
  // A whole last block may have been written past the planned size.
  if (::ftruncate(fd_, static_cast<off_t>(size_bytes_)) != 0) throw Error(where, "truncate failed: " + errno_text());
  if (::fsync(fd_) != 0) throw Error(where, "fsync failed: " + errno_text());
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw Error(where, "close failed: " + errno_text());
  }
  fd_ = -1;
  int rc = overwrite_ ? ::rename(temp_path_.c_str(), target_path_.c_str())
                      : ::renameat2(AT_FDCWD, temp_path_.c_str(), AT_FDCWD, target_path_.c_str(), RENAME_NOREPLACE);
  if (rc != 0) {
    if (errno == EEXIST) throw Error(where, "output appeared while writing (use --force to overwrite)");
    throw Error(where, "cannot rename the temporary output into place: " + errno_text());
  }
  committed_ = true;
  std::filesystem::path target(target_path_);
  std::string dir = target.has_parent_path() ? target.parent_path().string() : ".";
  int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);  // make the rename durable; failure here loses no data already synced
    ::close(dir_fd);
  }
}

}  // namespace ckpt
