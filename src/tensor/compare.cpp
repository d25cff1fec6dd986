#include "ckpt/compare.hpp"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/add.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/le.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/max.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/div.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/any.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "ckpt/exec.hpp"
#include "ckpt/tensor_view.hpp"

namespace ckpt {

namespace {

constexpr std::uint64_t kChunkBytes = 16ull << 20;

struct ChunkResult {
  std::uint64_t count = 0;
  double max_abs = 0.0;
  double max_rel = 0.0;
  std::vector<std::tuple<std::uint64_t, double, double>> first;  // flat index, a, b
};

at::Tensor view(at::ScalarType type, const std::byte* data, std::int64_t numel) {
  return at::from_blob(const_cast<std::byte*>(data), {numel}, at::TensorOptions().dtype(type));
}

at::ScalarType same_size_int(std::uint32_t itemsize) {
  switch (itemsize) {
    case 1: return at::kByte;
    case 2: return at::kShort;
    case 4: return at::kInt;
    default: return at::kLong;
  }
}

ChunkResult compare_chunk(DType dtype, const std::byte* a, const std::byte* b, std::uint64_t numel,
                          std::uint64_t first_index, const CompareOptions& options) {
  ChunkResult result;
  const DTypeInfo& info = dtype_info(dtype);
  auto n = static_cast<std::int64_t>(numel);
  bool complex = dtype == DType::Complex64 || dtype == DType::Complex128;
  at::Tensor differs;
  at::Tensor x;
  at::Tensor y;
  if (complex) {  // compared as (real, imaginary) bit patterns per element
    at::ScalarType part = same_size_int(info.itemsize / 2);
    differs = at::any(at::ne(view(part, a, 2 * n), view(part, b, 2 * n)).view({n, 2}), 1);
    x = view(part, a, 2 * n).view({n, 2}).select(1, 0).to(at::kDouble);
    y = view(part, b, 2 * n).view({n, 2}).select(1, 0).to(at::kDouble);
  } else {
    x = view(to_scalar_type(dtype), a, n).to(at::kDouble);
    y = view(to_scalar_type(dtype), b, n).to(at::kDouble);
    if (options.atol == 0.0 && options.rtol == 0.0) {
      differs = at::ne(view(same_size_int(info.itemsize), a, n), view(same_size_int(info.itemsize), b, n));
    } else {
      at::Tensor close = at::le(at::abs(at::sub(x, y)), at::add(at::mul(at::abs(y), options.rtol), options.atol));
      at::Tensor same = at::logical_or(at::eq(x, y), at::logical_and(at::isnan(x), at::isnan(y)));
      differs = at::logical_not(at::logical_or(close, same));
    }
  }
  result.count = static_cast<std::uint64_t>(at::sum(differs).item<std::int64_t>());
  if (result.count == 0) return result;
  at::Tensor abs_diff = at::where(differs, at::abs(at::sub(x, y)), at::zeros_like(x));
  at::Tensor finite_abs = at::where(at::isnan(abs_diff), at::zeros_like(abs_diff), abs_diff);
  result.max_abs = at::max(finite_abs).item<double>();
  at::Tensor rel = at::div(finite_abs, at::abs(y));
  rel = at::where(at::logical_or(at::isnan(rel), at::logical_not(differs)), at::zeros_like(rel), rel);
  result.max_rel = at::max(rel).item<double>();
  at::Tensor indices = at::nonzero(differs).flatten();
  std::int64_t keep = std::min<std::int64_t>(indices.numel(), static_cast<std::int64_t>(options.max_positions));
  const auto* index_data = indices.data_ptr<std::int64_t>();
  at::Tensor xs = x.contiguous();
  at::Tensor ys = y.contiguous();
  const double* x_data = xs.data_ptr<double>();
  const double* y_data = ys.data_ptr<double>();
  for (std::int64_t i = 0; i < keep; ++i) {
    std::int64_t at_index = index_data[i];
    result.first.emplace_back(first_index + static_cast<std::uint64_t>(at_index), x_data[at_index], y_data[at_index]);
  }
  return result;
}

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

// A pointer to bytes [begin, begin + count) of `source`: straight into the
// mapping when one plain piece holds them all, else gathered into `buffer`.
const std::byte* bytes_of(const TensorSource& source, const std::vector<const MappedFile*>& files,
                          std::uint64_t begin, std::uint64_t count, std::vector<std::byte>& buffer) {
  for (const SourcePiece& piece : source.pieces) {
    if (piece.rows == 1 && piece.file != SourcePiece::kZeroFile && piece.offset <= begin &&
        piece.offset + piece.nbytes >= begin + count) {
      return files.at(piece.file)->bytes().data() + piece.source_offset + (begin - piece.offset);
    }
  }
  buffer.resize(count);
  read_source_bytes(source, files, begin, count, buffer.data());
  return buffer.data();
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
      diff.mismatch = fmt::format("shape [{}] != [{}]", fmt::join(x->source.shape, ", "), fmt::join(y->source.shape, ", "));
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
    for (std::uint64_t begin = 0; begin < total; begin += step) items.push_back({p, begin, std::min(step, total - begin)});
  }
  std::vector<ChunkResult> results(items.size());
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    std::vector<std::byte> buffer_a;
    std::vector<std::byte> buffer_b;
    for (std::size_t i; (i = next.fetch_add(1)) < items.size();) {
      try {
        const Item& item = items[i];
        const Pair& pair = pairs[item.pair];
        const std::byte* x = bytes_of(*pair.a, files_a, item.begin, item.count, buffer_a);
        const std::byte* y = bytes_of(*pair.b, files_b, item.begin, item.count, buffer_b);
        if (std::memcmp(x, y, item.count) == 0) continue;
        std::uint64_t itemsize = dtype_info(pair.a->dtype).itemsize;
        results[i] = compare_chunk(pair.a->dtype, x, y, item.count / itemsize, item.begin / itemsize, options);
      } catch (...) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next.store(items.size());
      }
    }
  };
  unsigned threads = options.threads != 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  at::set_num_threads(1);  // our threads split the work; LibTorch's would oversubscribe
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);

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
