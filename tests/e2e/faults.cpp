// LD_PRELOAD shim for the end-to-end tests: the faults of a real disk and file
// system, each switched on by an environment variable of the preloaded process.
// - CKPT_FAULT_REFUSE_DIRECT=1: every pwrite to a file descriptor in O_DIRECT
//   mode fails with EINVAL, as on a file system that accepts the flag but not
//   the executor's 4 KiB alignment. ckpt-tool must fall back to buffered writes
//   (from whichever threads hit the error first) and write the same bytes. The
//   first refusal takes 30 ms and later ones 60 ms: a second thread whose direct
//   write began before the first switched the file to buffered gets its EINVAL
//   after the switch, the race the executor must survive.
// - CKPT_FAIL_WRITES_AFTER_BYTES=N: once the pwrites of the process have
//   written more than N bytes in all, every further pwrite fails with ENOSPC. The
//   up-front free-space check cannot see this coming (another process took the
//   space), so it exercises the executor's cleanup after some outputs are
//   complete and others half-written.
// - CKPT_SLOW_WRITES_MS=N: every pwrite first sleeps N ms: a copy slow enough
//   for a test to kill the process in the middle of it.
// - CKPT_FAIL_RENAME_AT=K: the K-th rename (1 for the first; rename or
//   renameat2) fails with EIO: the executor must take back the outputs renamed
//   before it.
//
// Built without _FILE_OFFSET_BITS=64 (which renames pwrite to pwrite64 in the
// headers) so that both names can be defined here.
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>

namespace {

using PwriteFn = ssize_t (*)(int, const void*, std::size_t, off64_t);

// The number in environment variable `name`, or `absent`.
unsigned long long env_number(const char* name, unsigned long long absent) {
  const char* text = std::getenv(name);
  return text != nullptr ? std::strtoull(text, nullptr, 10) : absent;
}

bool refuse_direct_write(int fd) {
  static const bool enabled = env_number("CKPT_FAULT_REFUSE_DIRECT", 0) != 0;
  if (!enabled) return false;
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || (flags & O_DIRECT) == 0) return false;
  static std::atomic<int> refusals{0};
  ::usleep(refusals.fetch_add(1) == 0 ? 30000 : 60000);
  errno = EINVAL;
  return true;
}

void slow_write() {
  static const unsigned long long delay_ms = env_number("CKPT_SLOW_WRITES_MS", 0);
  if (delay_ms != 0) ::usleep(static_cast<useconds_t>(delay_ms * 1000));
}

bool disk_full(std::size_t count) {
  static const unsigned long long budget = env_number("CKPT_FAIL_WRITES_AFTER_BYTES", ~0ull);
  static std::atomic<unsigned long long> written{0};
  if (written.fetch_add(count) + count <= budget) return false;
  errno = ENOSPC;
  return true;
}

ssize_t fault_or_forward(const char* name, int fd, const void* buf, std::size_t count, off64_t offset) {
  slow_write();
  if (refuse_direct_write(fd) || disk_full(count)) return -1;
  auto real = reinterpret_cast<PwriteFn>(::dlsym(RTLD_NEXT, name));
  return real(fd, buf, count, offset);
}

bool fail_this_rename() {
  static const unsigned long long fail_at = env_number("CKPT_FAIL_RENAME_AT", 0);
  static std::atomic<unsigned long long> renames{0};
  if (renames.fetch_add(1) + 1 != fail_at) return false;
  errno = EIO;
  return true;
}

}  // namespace

// Both names: callers built with _FILE_OFFSET_BITS=64 link against pwrite64.
extern "C" ssize_t pwrite(int fd, const void* buf, std::size_t count, off_t offset) {
  return fault_or_forward("pwrite", fd, buf, count, offset);
}

extern "C" ssize_t pwrite64(int fd, const void* buf, std::size_t count, off64_t offset) {
  return fault_or_forward("pwrite64", fd, buf, count, offset);
}

extern "C" int rename(const char* from, const char* to) {
  if (fail_this_rename()) return -1;
  auto real = reinterpret_cast<int (*)(const char*, const char*)>(::dlsym(RTLD_NEXT, "rename"));
  return real(from, to);
}

extern "C" int renameat2(int from_dir, const char* from, int to_dir, const char* to, unsigned int flags) {
  if (fail_this_rename()) return -1;
  auto real =
      reinterpret_cast<int (*)(int, const char*, int, const char*, unsigned int)>(::dlsym(RTLD_NEXT, "renameat2"));
  return real(from_dir, from, to_dir, to, flags);
}
