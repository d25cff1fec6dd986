#include "ckpt/io/output_file.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>

#include <fmt/format.h>

namespace ckpt {

namespace {

namespace fs = std::filesystem;

// Temporary paths the signal handler may unlink: a list that only grows, each
// entry written before it is published, so the handler reads only stable memory
// and needs no lock. An entry is never reused (a handler may be reading it);
// one leaked entry per output file a process creates is a few bytes.
struct CleanupEntry {
  char* path = nullptr;
  bool directory = false;  // a folder made for the outputs: removed (after the files in it) while empty
  std::atomic<bool> active{false};
  CleanupEntry* next = nullptr;
};
std::atomic<CleanupEntry*> g_cleanup_head{nullptr};
std::mutex g_cleanup_mutex;

// (the list is walked newest first: files go before the folders made before
// them, and a folder before the parent made before it)
CleanupEntry* register_cleanup(const std::string& path, bool directory = false) {
  auto* entry = new CleanupEntry;
  entry->directory = directory;
  entry->path = new char[path.size() + 1];
  std::memcpy(entry->path, path.c_str(), path.size() + 1);
  entry->active.store(true);
  std::lock_guard lock(g_cleanup_mutex);
  entry->next = g_cleanup_head.load();
  g_cleanup_head.store(entry);
  return entry;
}

void unregister_cleanup(void* entry) {
  if (entry != nullptr) static_cast<CleanupEntry*>(entry)->active.store(false);
}

extern "C" void remove_temp_files_and_exit(int signal_number) {
  for (CleanupEntry* entry = g_cleanup_head.load(); entry != nullptr; entry = entry->next) {
    if (!entry->active.load()) continue;
    if (entry->directory) {
      ::rmdir(entry->path);
    } else {
      ::unlink(entry->path);
    }
  }
  ::signal(signal_number, SIG_DFL);
  ::raise(signal_number);
}

constexpr int kCleanupSignals[] = {SIGINT, SIGTERM, SIGHUP};

// A failed system call: "WHAT: <strerror>", of kind NoSpace or Io by `error`.
[[noreturn]] void fail_call(const Location& where, std::string_view what, int error = errno) {
  throw Error(kind_of_errno(error), where, fmt::format("{}: {}", what, std::strerror(error)));
}

fs::path parent_of(const std::string& path) {
  fs::path target(path);
  return target.has_parent_path() ? target.parent_path() : fs::path(".");
}

// `.NAME.ckpt-tmp-` : what every temporary file of target NAME starts with.
std::string temp_prefix(const std::string& target_path) {
  return fmt::format(".{}.ckpt-tmp-", fs::path(target_path).filename().string());
}

// True while a process with this pid runs ckpt-tool's code on this machine:
// the command line, or a Python process with the module _ckpt_tool loaded.
bool writer_alive(long pid) {
  if (pid <= 0 || (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)) return false;
  std::ifstream comm(fmt::format("/proc/{}/comm", pid));
  std::string name;
  if (!std::getline(comm, name)) return true;  // cannot tell: leave it
  if (name.starts_with("ckpt-tool")) return true;
  std::ifstream maps(fmt::format("/proc/{}/maps", pid));
  if (!maps) return true;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("/_ckpt_tool.") != std::string::npos) return true;
  }
  return false;
}

// True while another run of this process (a thread of a Python program) writes `path`.
bool written_here(const std::string& path) {
  std::lock_guard lock(g_cleanup_mutex);
  for (CleanupEntry* entry = g_cleanup_head.load(); entry != nullptr; entry = entry->next) {
    if (entry->active.load() && !entry->directory && path == entry->path) return true;
  }
  return false;
}

// Removes the temporary files of `target_path` whose writer no longer runs.
void remove_stale_temps(const std::string& target_path, const std::function<void(const std::string&)>& notice) {
  std::string prefix = temp_prefix(target_path);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(parent_of(target_path), ec)) {
    std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    std::string pid_text = name.substr(prefix.size());
    if (pid_text.empty() || pid_text.find_first_not_of("0123456789") != std::string::npos || pid_text.size() > 9) {
      continue;
    }
    // One with this process's pid and no run of this process writing it was
    // left by an earlier process that had the same pid.
    long pid = std::stol(pid_text);
    if (pid == ::getpid() && written_here(entry.path().string())) {
      throw Error(ErrorKind::Usage, Location{target_path, "", std::nullopt},
                  "another run of this process is writing this output now");
    }
    if (pid != ::getpid() && writer_alive(pid)) continue;
    if (::unlink(entry.path().c_str()) == 0 && notice) {
      notice(fmt::format("removed {}, left by an interrupted run (process {} is no ckpt-tool run now)",
                         entry.path().string(), pid));
    }
  }
}

}  // namespace

void install_cleanup_handlers() {
  struct sigaction action {};
  action.sa_handler = remove_temp_files_and_exit;
  sigemptyset(&action.sa_mask);
  for (int signal_number : kCleanupSignals) ::sigaction(signal_number, &action, nullptr);
}

DeferSignals::DeferSignals() {
  sigset_t block;
  sigemptyset(&block);
  for (int signal_number : kCleanupSignals) sigaddset(&block, signal_number);
  ::pthread_sigmask(SIG_BLOCK, &block, &saved_);
}

DeferSignals::~DeferSignals() {
  ::pthread_sigmask(SIG_SETMASK, &saved_, nullptr);
}

FileIdentity identity_of(const MappedFile& file) {
  return {file.device(), file.inode()};
}

std::optional<FileIdentity> identity_of(const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) return std::nullopt;
  return FileIdentity{static_cast<std::uint64_t>(info.st_dev), static_cast<std::uint64_t>(info.st_ino)};
}

namespace {

const char* file_kind(mode_t mode) {
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISCHR(mode) || S_ISBLK(mode)) return "a device";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISDIR(mode)) return "a directory";
  return "not a regular file";
}

}  // namespace

void check_output_targets(const std::vector<OutputTarget>& targets, const std::vector<FileIdentity>& inputs,
                          bool overwrite, const std::function<void(const std::string&)>& notice) {
  std::set<FileIdentity> input_ids(inputs.begin(), inputs.end());
  std::set<std::tuple<std::uint64_t, std::uint64_t, std::string>> names;  // (device, directory inode, file name)
  struct Need {
    std::uint64_t nbytes = 0;
    std::string directory;  // one on the file system
    std::string first_output;
  };
  std::map<std::uint64_t, Need> needed;  // by device
  // Leftovers of a killed run first: a run that then stops at an existing output
  // has still cleaned up after the one before.
  for (const OutputTarget& target : targets) {
    if (!target.path.empty()) remove_stale_temps(target.path, notice);
  }
  for (const OutputTarget& target : targets) {
    Location where{target.path, "", std::nullopt};
    if (target.path.empty()) throw Error("an output path is empty");
    fs::path dir = parent_of(target.path);
    struct stat dir_info {};
    if (::stat(dir.c_str(), &dir_info) != 0 || !S_ISDIR(dir_info.st_mode)) {
      throw Error(where, "output directory does not exist: " + dir.string());
    }
    if (::access(dir.c_str(), W_OK | X_OK) != 0) {
      throw Error(where, "output directory is not writable: " + dir.string());
    }
    std::string name = fs::path(target.path).filename().string();
    if (name.empty() || name == "." || name == "..") throw Error(where, "output path names a directory");
    if (!names.emplace(static_cast<std::uint64_t>(dir_info.st_dev), static_cast<std::uint64_t>(dir_info.st_ino), name)
             .second) {
      throw Error(where, "two outputs of this run have the same path");
    }
    struct stat info {};
    bool exists = ::lstat(target.path.c_str(), &info) == 0;
    if (exists) {
      struct stat followed {};
      if (::stat(target.path.c_str(), &followed) == 0) {
        if (S_ISDIR(followed.st_mode)) throw Error(where, "output path is a directory");
        if (input_ids.count(
                {static_cast<std::uint64_t>(followed.st_dev), static_cast<std::uint64_t>(followed.st_ino)}) != 0) {
          throw Error(where,
                      "output path is one of this run's input files: inputs are never written, "
                      "not even with --force; write the output elsewhere");
        }
      }
      // --force replaces a file: renaming over /dev/null, a FIFO or a link
      // would replace the node itself (found replacing /dev/null).
      if (!S_ISREG(info.st_mode)) {
        throw Error(where, fmt::format("output path is {}, not a regular file: outputs replace regular files only, "
                                       "not even with --force; write the output elsewhere",
                                       file_kind(info.st_mode)));
      }
      if (!overwrite) throw Error(where, "output already exists (use --force to overwrite)");
    }
    Need& need = needed[static_cast<std::uint64_t>(dir_info.st_dev)];
    std::uint64_t blocks = (target.size_bytes + OutputFile::kDirectAlignment - 1) / OutputFile::kDirectAlignment;
    need.nbytes = checked_add(need.nbytes, blocks * OutputFile::kDirectAlignment, "output size");
    if (need.directory.empty()) need = Need{need.nbytes, dir.string(), target.path};
  }
  for (const auto& [device, need] : needed) {
    struct statvfs space {};
    if (::statvfs(need.directory.c_str(), &space) != 0) continue;  // cannot tell: fallocate will
    std::uint64_t available = static_cast<std::uint64_t>(space.f_bavail) * space.f_frsize;
    if (need.nbytes > available) {
      throw Error(ErrorKind::NoSpace, Location{need.first_output, "", std::nullopt},
                  fmt::format("not enough free space in {} for the output{}: {} bytes needed, {} available",
                              need.directory, targets.size() > 1 ? "s" : "", need.nbytes, available));
    }
  }
}

OutputFile::OutputFile(std::string target_path, std::uint64_t size_bytes, bool overwrite)
    : target_path_(std::move(target_path)), size_bytes_(size_bytes), overwrite_(overwrite) {
  Location where{target_path_, "", std::nullopt};
  if (!overwrite_ && fs::exists(fs::symlink_status(target_path_))) {
    throw Error(where, "output already exists (use --force to overwrite)");
  }
  fs::path dir = parent_of(target_path_);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(where, "output directory does not exist: " + dir.string());
  temp_path_ = (dir / (temp_prefix(target_path_) + std::to_string(::getpid()))).string();
  cleanup_ = register_cleanup(temp_path_);
  fd_ = ::open(temp_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    const int error = errno;
    unregister_cleanup(cleanup_);
    fail_call(where, "cannot create temporary output " + temp_path_, error);
  }
  // Reserve the blocks now so that a full disk fails here, not half-way through;
  // up to the padded end, which a whole last block may be written to.
  auto reserved = static_cast<off_t>(padded_size());
  int rc = ::posix_fallocate(fd_, 0, reserved);
  if (rc == EOPNOTSUPP || rc == EINVAL) rc = ::ftruncate(fd_, reserved) == 0 ? 0 : errno;
  if (rc != 0) {
    ::close(fd_);
    ::unlink(temp_path_.c_str());
    unregister_cleanup(cleanup_);
    fd_ = -1;
    fail_call(where, fmt::format("cannot allocate {} bytes for the output", size_bytes_), rc);
  }
}

OutputFile::~OutputFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && creator_) ::unlink(temp_path_.c_str());
  unregister_cleanup(cleanup_);
}

std::unique_ptr<OutputFile> OutputFile::attach(std::string target_path, std::string temp_path,
                                               std::uint64_t size_bytes) {
  std::unique_ptr<OutputFile> out(new OutputFile());
  out->target_path_ = std::move(target_path);
  out->temp_path_ = std::move(temp_path);
  out->size_bytes_ = size_bytes;
  out->creator_ = false;
  out->fd_ = ::open(out->temp_path_.c_str(), O_WRONLY | O_CLOEXEC);
  if (out->fd_ < 0) {
    fail_call(Location{out->target_path_, "", std::nullopt},
              "cannot open the temporary output " + out->temp_path_ + " another process created");
  }
  return out;
}

std::unique_ptr<OutputFile> OutputFile::adopt(std::string target_path, std::string temp_path, std::uint64_t size_bytes,
                                              bool overwrite) {
  std::unique_ptr<OutputFile> out(new OutputFile());
  out->target_path_ = std::move(target_path);
  out->temp_path_ = std::move(temp_path);
  out->size_bytes_ = size_bytes;
  out->overwrite_ = overwrite;
  out->creator_ = false;
  return out;
}

void OutputFile::release() {
  committed_ = true;
  unregister_cleanup(cleanup_);
  cleanup_ = nullptr;
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
    internal_error(fmt::format("{}: write at {} past the planned end of the output", target_path_, byte_offset));
  }
  while (!bytes.empty()) {
    bool direct = direct_.load();  // before the write: another thread may switch it meanwhile
    ssize_t written = ::pwrite(fd_, bytes.data(), bytes.size(), static_cast<off_t>(byte_offset));
    if (written < 0 && errno == EINTR) continue;
    if (written < 0 && errno == EINVAL && direct) {
      disable_direct_io();  // a file system that takes the flag but not this alignment
      continue;
    }
    if (written <= 0) fail_call(Location{target_path_, "", byte_offset}, "write failed");
    bytes = bytes.subspan(static_cast<std::size_t>(written));
    byte_offset += static_cast<std::uint64_t>(written);
  }
}

void OutputFile::finish(bool sync) {
  if (fd_ < 0) return;
  Location where{target_path_, "", std::nullopt};
  if (!creator_) {  // a part of the file: durable, its size its creator's to set
    if (::fdatasync(fd_) != 0) fail_call(where, "fdatasync failed");
    int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) fail_call(where, "close failed");
    return;
  }
  // A whole last block may have been written past the planned size.
  if (::ftruncate(fd_, static_cast<off_t>(size_bytes_)) != 0) fail_call(where, "truncate failed");
  if (sync && ::fsync(fd_) != 0) fail_call(where, "fsync failed");
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) fail_call(where, "close failed");
}

void OutputFile::sync_finished() const {
  Location where{target_path_, "", std::nullopt};
  int fd = ::open(temp_path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_call(where, "cannot open the temporary output to fsync it");
  int rc = ::fsync(fd);
  int error = errno;
  ::close(fd);
  if (rc != 0) fail_call(where, "fsync failed", error);
}

void OutputFile::commit(bool sync_directory) {
  finish();
  Location where{target_path_, "", std::nullopt};
  int rc = overwrite_ ? ::rename(temp_path_.c_str(), target_path_.c_str())
                      : ::renameat2(AT_FDCWD, temp_path_.c_str(), AT_FDCWD, target_path_.c_str(), RENAME_NOREPLACE);
  if (rc != 0) {
    if (errno == EEXIST) throw Error(where, "output appeared while writing (use --force to overwrite)");
    fail_call(where, "cannot rename the temporary output into place");
  }
  committed_ = true;
  unregister_cleanup(cleanup_);
  if (sync_directory) ckpt::sync_directory(parent_of(target_path_).string());
}

MadeDirectories::MadeDirectories(const std::vector<std::string>& paths) {
  for (const std::string& path : paths) {
    std::filesystem::path at = std::filesystem::absolute(path).lexically_normal();
    if (!at.has_filename()) at = at.parent_path();
    std::error_code ec;
    std::vector<std::string> missing;  // deepest first
    for (std::filesystem::path p = at; !std::filesystem::exists(p, ec); p = p.parent_path()) missing.push_back(p);
    std::filesystem::create_directories(at, ec);
    if (ec) {
      throw Error(kind_of_errno(ec.value()), Location{path, "", std::nullopt},
                  "cannot create the folder: " + ec.message());
    }
    for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
      made_.push_back(*it);
      cleanup_.push_back(register_cleanup(*it, /*directory=*/true));  // a signal removes it too
    }
  }
}

MadeDirectories::~MadeDirectories() {
  std::error_code ec;
  for (auto it = made_.rbegin(); it != made_.rend(); ++it) std::filesystem::remove(*it, ec);  // only while empty
  keep();
}

void MadeDirectories::keep() {
  made_.clear();
  for (void* entry : cleanup_) unregister_cleanup(entry);
  cleanup_.clear();
}

void sync_directory(const std::string& path) {
  int dir_fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

}  // namespace ckpt
