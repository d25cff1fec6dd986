// LD_PRELOAD shim for the end-to-end tests: every pwrite to a file descriptor in
// O_DIRECT mode fails with EINVAL, as on a file system that accepts the flag but
// not the executor's 4 KiB alignment. ckpt-tool must fall back to buffered
// writes (from whichever threads hit the error first) and write the same bytes.
// The first refusal takes 30 ms and later ones 60 ms: a second thread whose
// direct write began before the first switched the file to buffered gets its
// EINVAL after the switch, the race the executor must survive.
//
// Built without _FILE_OFFSET_BITS=64 (which renames pwrite to pwrite64 in the
// headers) so that both names can be defined here.
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>

namespace {

using PwriteFn = ssize_t (*)(int, const void*, std::size_t, off64_t);

ssize_t refuse_or_forward(const char* name, int fd, const void* buf, std::size_t count, off64_t offset) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0 && (flags & O_DIRECT) != 0) {
    static std::atomic<int> refusals{0};
    ::usleep(refusals.fetch_add(1) == 0 ? 30000 : 60000);
    errno = EINVAL;
    return -1;
  }
  auto real = reinterpret_cast<PwriteFn>(::dlsym(RTLD_NEXT, name));
  return real(fd, buf, count, offset);
}

}  // namespace

// Both names: callers built with _FILE_OFFSET_BITS=64 link against pwrite64.
extern "C" ssize_t pwrite(int fd, const void* buf, std::size_t count, off_t offset) {
  return refuse_or_forward("pwrite", fd, buf, count, offset);
}

extern "C" ssize_t pwrite64(int fd, const void* buf, std::size_t count, off64_t offset) {
  return refuse_or_forward("pwrite64", fd, buf, count, offset);
}
