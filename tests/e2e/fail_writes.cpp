// LD_PRELOAD shim for the end-to-end tests: a disk that fills up while the
// outputs are written, and a rename that fails half-way through a set.
// - Once the pwrites of the process have written more than
//   CKPT_FAIL_WRITES_AFTER_BYTES bytes in all, every further pwrite fails with
//   ENOSPC. The up-front free-space check cannot see this coming (another
//   process took the space), so it exercises the executor's cleanup after some
//   outputs are complete and others half-written.
// - The CKPT_FAIL_RENAME_AT-th rename (1 for the first; rename or renameat2)
//   fails with EIO: the executor must take back the outputs renamed before it.
//
// Built without _FILE_OFFSET_BITS=64 (which renames pwrite to pwrite64 in the
// headers) so that both names can be defined here.
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>

namespace {

using PwriteFn = ssize_t (*)(int, const void*, std::size_t, off64_t);

ssize_t fail_or_forward(const char* name, int fd, const void* buf, std::size_t count, off64_t offset) {
  static const unsigned long long budget = [] {
    const char* text = std::getenv("CKPT_FAIL_WRITES_AFTER_BYTES");
    return text != nullptr ? std::strtoull(text, nullptr, 10) : ~0ull;
  }();
  static std::atomic<unsigned long long> written{0};
  if (written.fetch_add(count) + count > budget) {
    errno = ENOSPC;
    return -1;
  }
  auto real = reinterpret_cast<PwriteFn>(::dlsym(RTLD_NEXT, name));
  return real(fd, buf, count, offset);
}

}  // namespace

// Both names: callers built with _FILE_OFFSET_BITS=64 link against pwrite64.
extern "C" ssize_t pwrite(int fd, const void* buf, std::size_t count, off_t offset) {
  return fail_or_forward("pwrite", fd, buf, count, offset);
}

extern "C" ssize_t pwrite64(int fd, const void* buf, std::size_t count, off64_t offset) {
  return fail_or_forward("pwrite64", fd, buf, count, offset);
}

namespace {

bool fail_this_rename() {
  static const long fail_at = [] {
    const char* text = std::getenv("CKPT_FAIL_RENAME_AT");
    return text != nullptr ? std::strtol(text, nullptr, 10) : 0L;
  }();
  static std::atomic<long> renames{0};
  if (renames.fetch_add(1) + 1 != fail_at) return false;
  errno = EIO;
  return true;
}

}  // namespace

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
