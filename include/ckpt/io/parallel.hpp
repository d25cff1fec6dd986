// The one parallel loop, shared by the executor, diff, verify and the manifest
// builder: indices handed out one at a time to a small pool of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ckpt {

// Runs body(i) for every i in [0, count) on up to `threads` threads, the
// caller's among them. `make_body()` runs once on each thread and returns that
// thread's body, so per-thread buffers live in it. The first exception (from
// either) stops handing out indices and is rethrown once every thread has joined;
// a body that must go on after a failure catches it itself.
template <typename MakeBody>
void parallel_for(std::size_t count, unsigned threads, MakeBody make_body) {
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    try {
      auto body = make_body();
      for (std::size_t i; (i = next.fetch_add(1)) < count;) body(i);
    } catch (...) {
      std::lock_guard lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next.store(count);
    }
  };
  std::size_t workers = std::min<std::size_t>(std::max(1u, threads), count);
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(worker);
  if (workers > 0) worker();
  for (std::thread& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace ckpt
