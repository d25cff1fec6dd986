#include "ckpt/exec/compare.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "ckpt/exec/exec.hpp"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/io/parallel.hpp"

namespace ckpt {

namespace {

constexpr std::uint64_t kChunkBytes = 16ull << 20;

struct ChunkResult {
  std::uint64_t count = 0;
  double max_abs = 0.0;
  double max_rel = 0.0;
  std::vector<std::tuple<std::uint64_t, double, double>> first;  // flat index, a, b
};

std::vector<std::int64_t> unravel(std::uint64_t flat, const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> index(shape.size(), 0);
  for (std::size_t d = shape.size(); d-- > 0;) {
    auto size = static_cast<std::uint64_t>(shape[d]);
    if (size == 0) break;
    index[d] = static_cast<std::int64_t>(flat % size);
    flat /= size;
  }
  return index;
}

}  // namespace

DiffReport diff_tensors(const std::vector<NamedTensor>& a, const std::vector<const MappedFile*>& files_a,
                        const std::vector<NamedTensor>& b, const std::vector<const MappedFile*>& files_b,
                        const CompareOptions& options) {
  DiffReport report;
  std::map<std::string, const NamedTensor*> by_name_b;
  for (const NamedTensor& t : b) by_name_b[t.name] = &t;
  std::map<std::string, const NamedTensor*> by_name_a;
  for (const NamedTensor& t : a) by_name_a[t.name] = &t;
  for (const NamedTensor& t : b) {
    if (by_name_a.count(t.name) == 0) report.only_in_b.push_back(t.name);
  }
  // Resolve ties to the tensors they share.
  auto resolve = [](const NamedTensor* t, const std::map<std::string, const NamedTensor*>& by_name) {
    while (t != nullptr && t->alias_of) {
      auto it = by_name.find(*t->alias_of);
      t = it == by_name.end() ? nullptr : it->second;
    }
    return t;
  };
  struct Pair {
    const TensorSource* a;
    const TensorSource* b;
    std::size_t diff;  // index into diffs
  };
  std::vector<Pair> pairs;
  std::vector<TensorDiff> diffs;
  for (const NamedTensor& ta : a) {
    auto it = by_name_b.find(ta.name);
    if (it == by_name_b.end()) {
      report.only_in_a.push_back(ta.name);
      continue;
    }
    const NamedTensor* x = resolve(&ta, by_name_a);
    const NamedTensor* y = resolve(it->second, by_name_b);
    if (x == nullptr || y == nullptr) continue;
    TensorDiff diff;
    diff.name = ta.name;
    diff.numel = x->source.numel();
    if (x->source.dtype != y->source.dtype) {
      diff.mismatch = fmt::format("dtype {} != {}", dtype_info(x->source.dtype).name, dtype_info(y->source.dtype).name);
    } else if (x->source.shape != y->source.shape) {
      diff.mismatch =
          fmt::format("shape [{}] != [{}]", fmt::join(x->source.shape, ", "), fmt::join(y->source.shape, ", "));
    }
    diffs.push_back(std::move(diff));
    if (diffs.back().mismatch.empty()) pairs.push_back({&x->source, &y->source, diffs.size() - 1});
  }

  // Work items: chunks of every pair, compared on a pool of threads.
  struct Item {
    std::size_t pair;
    std::uint64_t begin;
    std::uint64_t count;
  };
  std::vector<Item> items;
  for (std::size_t p = 0; p < pairs.size(); ++p) {
    std::uint64_t itemsize = dtype_info(pairs[p].a->dtype).itemsize;
    std::uint64_t step = kChunkBytes / itemsize * itemsize;
    std::uint64_t total = pairs[p].a->nbytes();
    report.compared_bytes += total;
    for (std::uint64_t begin = 0; begin < total; begin += step)
      items.push_back({p, begin, std::min(step, total - begin)});
  }
  std::vector<ChunkResult> results(items.size());
  unsigned threads = options.threads != 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  parallel_for(items.size(), threads, [&] {
    return [&, buffer_a = std::vector<std::byte>(), buffer_b = std::vector<std::byte>()](std::size_t i) mutable {
      const Item& item = items[i];
      const Pair& pair = pairs[item.pair];
      // Read through buffers (pread): the resident set stays at their size.
      buffer_a.resize(item.count);
      buffer_b.resize(item.count);
      read_source_bytes(*pair.a, files_a, item.begin, item.count, buffer_a.data());
      read_source_bytes(*pair.b, files_b, item.begin, item.count, buffer_b.data());
      const std::byte* x = buffer_a.data();
      const std::byte* y = buffer_b.data();
      if (std::memcmp(x, y, item.count) == 0) return;
      std::uint64_t itemsize = dtype_info(pair.a->dtype).itemsize;
      ElementComparison chunk = compare_elements(pair.a->dtype, x, y, item.count / itemsize, options.atol, options.rtol,
                                                 options.max_positions);
      results[i].count = chunk.count;
      results[i].max_abs = chunk.max_abs;
      results[i].max_rel = chunk.max_rel;
      for (const auto& p : chunk.first) results[i].first.emplace_back(item.begin / itemsize + p.index, p.a, p.b);
    };
  });

  // Chunks of a tensor are in order: merge counts, maxima and first positions.
  for (std::size_t i = 0; i < items.size(); ++i) {
    TensorDiff& diff = diffs[pairs[items[i].pair].diff];
    const ChunkResult& chunk = results[i];
    diff.count += chunk.count;
    diff.max_abs = std::max(diff.max_abs, chunk.max_abs);
    diff.max_rel = std::max(diff.max_rel, chunk.max_rel);
    for (const auto& [flat, x, y] : chunk.first) {
      if (diff.positions.size() < options.max_positions) {
        diff.positions.push_back({unravel(flat, pairs[items[i].pair].a->shape), x, y});
      }
    }
  }
  report.compared = pairs.size();
  for (TensorDiff& diff : diffs) {
    if (!diff.mismatch.empty() || diff.count > 0) report.differing.push_back(std::move(diff));
  }
  return report;
}

}  // namespace ckpt
