// The one parallel loop, shared by the executor, diff, verify, the manifest
// builder and the reshard planner: indices handed out one at a time to a small
// pool of threads (parallel_map: the same, with results and errors in order).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace ckpt {

// A thread count as the flags give it: 0 is every core.
inline unsigned resolve_threads(unsigned requested) {
  return requested != 0 ? requested : std::max(1u, std::thread::hardware_concurrency());
}

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

// make(i) for every i in [0, count) on up to `threads` threads, the results in
// index order. Every index runs even when some throw; then the exception of the
// lowest index that threw is rethrown, so the error reported is the same
// whatever the thread count (the first bad file in the order given).
template <typename Make>
auto parallel_map(std::size_t count, unsigned threads, Make make) -> std::vector<decltype(make(std::size_t{}))> {
  using Result = decltype(make(std::size_t{}));
  std::vector<std::optional<Result>> results(count);
  std::vector<std::exception_ptr> failures(count);
  parallel_for(count, threads, [&] {
    return [&](std::size_t i) {
      try {
        results[i].emplace(make(i));
      } catch (...) {
        failures[i] = std::current_exception();
      }
    };
  });
  std::vector<Result> out;
  out.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (failures[i]) std::rethrow_exception(failures[i]);
    out.push_back(std::move(*results[i]));
  }
  return out;
}

}  // namespace ckpt
