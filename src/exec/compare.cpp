#include "ckpt/exec/compare.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "ckpt/exec/gather.hpp"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/parallel.hpp"

namespace ckpt {

namespace {

// Chunks of at most 16 MiB of a's bytes: enough to keep both threads busy on
// one large tensor, small enough for the read buffers.
constexpr std::uint64_t kChunkBytes = 16ull << 20;

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

// Two tensors of the same name, dtype and shape, to compare element by element.
// Each side is compared as written (NamedTensor::dtype()): a source of another
// dtype (a DeepSpeed buffer, int64, written as float32) is converted as read.
struct Pair {
  const TensorSource* a;
  const TensorSource* b;
  std::size_t diff;  // index into the diffs
  DType dtype_a;
  DType dtype_b;
};

// A chunk of a pair: elements [begin, begin + numel) of both.
struct Item {
  std::size_t pair;
  std::uint64_t begin;
  std::uint64_t numel;
};

// A tied tensor resolved to the tensor it shares; null when that is missing.
const NamedTensor* resolve(const NamedTensor* t, const std::map<std::string, const NamedTensor*>& by_name) {
  while (t != nullptr && t->alias_of) {
    auto it = by_name.find(*t->alias_of);
    t = it == by_name.end() ? nullptr : it->second;
  }
  return t;
}

// Pairs the tensors of `a` and `b` by name, in a's order: names on one side only
// go to the report, dtype and shape mismatches to `diffs` with no pair.
std::vector<Pair> pair_tensors(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b,
                               const Tolerance& tolerance, DiffReport& report, std::vector<TensorDiff>& diffs) {
  std::map<std::string, const NamedTensor*> by_name_a;
  for (const NamedTensor& t : a) by_name_a[t.name] = &t;
  std::map<std::string, const NamedTensor*> by_name_b;
  for (const NamedTensor& t : b) by_name_b[t.name] = &t;
  for (const NamedTensor& t : b) {
    if (by_name_a.count(t.name) == 0) report.only_in_b.push_back(t.name);
  }
  std::vector<Pair> pairs;
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
    std::string_view dtype_x = dtype_info(x->dtype()).name;
    std::string_view dtype_y = dtype_info(y->dtype()).name;
    if (!comparable_dtypes(x->dtype(), y->dtype(), tolerance)) {
      diff.mismatch = fmt::format("dtype {} != {}", dtype_x, dtype_y);
    } else if (x->source.shape != y->source.shape) {
      diff.mismatch = fmt::format("shape {} != {}", shape_text(x->source.shape), shape_text(y->source.shape));
    } else if (x->dtype() != y->dtype()) {
      diff.note = fmt::format("dtype {} != {}, compared by value", dtype_x, dtype_y);
    }
    diffs.push_back(std::move(diff));
    if (diffs.back().mismatch.empty())
      pairs.push_back({&x->source, &y->source, diffs.size() - 1, x->dtype(), y->dtype()});
  }
  return pairs;
}

// Every pair cut into chunks of at most kChunkBytes of a.
std::vector<Item> cut_chunks(const std::vector<Pair>& pairs, DiffReport& report) {
  std::vector<Item> items;
  std::set<const TensorSource*> counted;  // a tie's two names are one tensor
  for (std::size_t p = 0; p < pairs.size(); ++p) {
    std::uint64_t step = kChunkBytes / dtype_info(pairs[p].dtype_a).itemsize;
    std::uint64_t numel = pairs[p].a->numel();
    if (counted.insert(pairs[p].a).second)
      report.compared_tensor_bytes += numel * dtype_info(pairs[p].dtype_a).itemsize;
    for (std::uint64_t begin = 0; begin < numel; begin += step)
      items.push_back({p, begin, std::min(step, numel - begin)});
  }
  return items;
}

// Compares the chunks on a pool of threads, each read through buffers (pread:
// the resident set stays at their size); equal chunks of one dtype are
// recognised with memcmp. Positions are held only as many as the report
// lists: each tensor's first chunk collects up to max_positions of them, and
// only where it found fewer are the later chunks that differ compared again,
// in order, for the rest (every chunk collecting its own would hold up to
// max_positions per 16 MiB chunk: 7 GB for 76 MiB of float32 that all differ).
std::vector<ElementComparison> compare_chunks(const std::vector<Item>& items, const std::vector<Pair>& pairs,
                                              const std::vector<const MappedFile*>& files_a,
                                              const std::vector<const MappedFile*>& files_b,
                                              const CompareOptions& options) {
  std::vector<ElementComparison> results(items.size());
  unsigned threads = resolve_threads(options.threads);
  struct Buffers {
    std::vector<std::byte> a;
    std::vector<std::byte> b;
    std::vector<std::byte> read;  // a source's bytes before conversion
  };
  // Elements [begin, begin + numel) of `source` as `dtype` into `out`.
  auto read_as = [&](const TensorSource& source, DType dtype, const std::vector<const MappedFile*>& files,
                     SourceCrcCheck* check, const Item& item, std::vector<std::byte>& out,
                     std::vector<std::byte>& read) {
    out.resize(item.numel * dtype_info(dtype).itemsize);
    const std::uint64_t itemsize = dtype_info(source.dtype).itemsize;
    if (source.dtype == dtype) {
      read_source_bytes(source, files, item.begin * itemsize, out.size(), out.data(), check);
      return;
    }
    read.resize(item.numel * itemsize);
    read_source_bytes(source, files, item.begin * itemsize, read.size(), read.data(), check);
    convert_elements(source.dtype, dtype, read.data(), out.data(), item.numel);
  };
  // Chunk i compared, keeping at most `positions` of its differing elements;
  // nullopt when its bytes are equal.
  auto compare_item = [&](std::size_t i, std::size_t positions, Buffers& buffers) -> std::optional<ElementComparison> {
    const Item& item = items[i];
    const Pair& pair = pairs[item.pair];
    read_as(*pair.a, pair.dtype_a, files_a, options.check_a, item, buffers.a, buffers.read);
    read_as(*pair.b, pair.dtype_b, files_b, options.check_b, item, buffers.b, buffers.read);
    if (pair.dtype_a == pair.dtype_b && std::memcmp(buffers.a.data(), buffers.b.data(), buffers.a.size()) == 0) {
      return std::nullopt;
    }
    return compare_elements(pair.dtype_a, buffers.a.data(), pair.dtype_b, buffers.b.data(), item.numel,
                            options.tolerance, positions);
  };
  parallel_for(items.size(), threads, [&] {
    return [&, buffers = Buffers()](std::size_t i) mutable {
      if (auto result = compare_item(i, items[i].begin == 0 ? options.max_positions : 0, buffers))
        results[i] = std::move(*result);
    };
  });
  // The positions the first chunks did not find, from the chunks after them.
  std::vector<std::size_t> firsts;  // each pair's first item (items are in pair order)
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (items[i].begin == 0) firsts.push_back(i);
  }
  parallel_for(firsts.size(), threads, [&] {
    return [&, buffers = Buffers()](std::size_t k) mutable {
      std::size_t found = results[firsts[k]].first.size();
      for (std::size_t i = firsts[k] + 1; i < items.size() && items[i].begin != 0; ++i) {
        if (found >= options.max_positions) return;
        if (results[i].count == 0) continue;
        if (auto again = compare_item(i, options.max_positions - found, buffers)) {
          results[i].first = std::move(again->first);
          found += results[i].first.size();
        }
      }
    };
  });
  return results;
}

// Chunks of a tensor are in order: their counts, maxima and first positions
// merge into the tensor's diff.
void merge_chunks(const std::vector<Item>& items, std::vector<ElementComparison>&& results,
                  const std::vector<Pair>& pairs, const CompareOptions& options, std::vector<TensorDiff>& diffs) {
  std::vector<ElementComparison> merged(diffs.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    merge_comparison(merged[pairs[items[i].pair].diff], std::move(results[i]), items[i].begin, options.max_positions);
  }
  for (const Pair& pair : pairs) {
    TensorDiff& diff = diffs[pair.diff];
    ElementComparison& comparison = merged[pair.diff];
    diff.count = comparison.count;
    diff.max_abs = comparison.max_abs;
    diff.max_rel = comparison.max_rel;
    for (ElementComparison::Position& p : comparison.first)
      diff.positions.push_back({unravel(p.index, pair.a->shape), std::move(p.a), std::move(p.b)});
  }
}

}  // namespace

DiffReport diff_tensors(const std::vector<NamedTensor>& a, const std::vector<const MappedFile*>& files_a,
                        const std::vector<NamedTensor>& b, const std::vector<const MappedFile*>& files_b,
                        const CompareOptions& options) {
  DiffReport report;
  std::vector<TensorDiff> diffs;
  std::vector<Pair> pairs = pair_tensors(a, b, options.tolerance, report, diffs);
  std::vector<Item> items = cut_chunks(pairs, report);
  merge_chunks(items, compare_chunks(items, pairs, files_a, files_b, options), pairs, options, diffs);
  report.compared = pairs.size();
  for (TensorDiff& diff : diffs) {
    if (diff.differs()) {
      report.differing.push_back(std::move(diff));
    } else if (!diff.note.empty()) {
      report.noted.push_back(std::move(diff));
    }
  }
  return report;
}

namespace {

// A replicated tensor that differs between parts may be a corrupted byte, and
// then that is the error to report: the zip record each piece of `source` is
// read from is checked against its CRC-32 (records of files that are not zips,
// safetensors, are not).
void check_records(const TensorSource& source, const std::vector<const MappedFile*>& files,
                   std::map<std::uint32_t, std::optional<ZipArchive>>& zips, const ReplicatedCheck& check) {
  std::vector<std::byte> buffer;
  for (const Piece& piece : source.pieces) {
    if (piece.source >= files.size()) continue;
    auto [it, added] = zips.try_emplace(piece.source);
    if (added) {
      try {
        it->second.emplace(*files[piece.source]);
      } catch (const Error&) {
        continue;
      }
    }
    if (!it->second) continue;
    for (const ZipRecord& record : it->second->records()) {
      if (piece.source_offset < record.data_offset || piece.source_offset >= record.data_offset + record.nbytes)
        continue;
      std::uint32_t crc = crc32_update_from(0, *files[piece.source], record.data_offset, record.nbytes, buffer);
      if (crc != record.crc32) {
        throw Error(ErrorKind::CorruptData, Location{files[piece.source]->path(), record.name, record.data_offset},
                    fmt::format("CRC-32 of the data is 0x{:08x}, the zip directory says 0x{:08x} (corrupted data; "
                                "found because {}, a replicated tensor read from this record, differs between the {}s: "
                                "checked whatever the CRC option)",
                                crc, record.crc32, printable(check.key), check.unit));
      }
    }
  }
}

}  // namespace

namespace {

// The file a tensor's first bytes are read from ("" when none is: zeros).
std::string file_of(const TensorSource& source, const std::vector<const MappedFile*>& files) {
  for (const Piece& piece : source.pieces) {
    if (piece.mapped() && piece.source < files.size()) return files[piece.source]->path();
  }
  return "";
}

}  // namespace

std::vector<std::string> compare_replicated(const std::vector<ReplicatedCheck>& checks,
                                            const std::vector<const MappedFile*>& files) {
  // Part m (m >= 1) of check i against its part 0, all in one diff.
  std::vector<NamedTensor> others;
  std::vector<NamedTensor> firsts;
  std::vector<std::pair<std::size_t, std::size_t>> which;  // (check, part) of each pair
  for (std::size_t i = 0; i < checks.size(); ++i) {
    for (std::size_t m = 1; m < checks[i].parts.size(); ++m) {
      std::string name = fmt::format("{}/{}", i, m);
      others.push_back({name, checks[i].parts[m], std::nullopt});
      firsts.push_back({name, checks[i].parts.front(), std::nullopt});
      which.emplace_back(i, m);
    }
  }
  CompareOptions options;
  options.max_positions = 1;
  DiffReport report = diff_tensors(others, files, firsts, files, options);
  std::map<std::string, const TensorDiff*> differing;
  for (const TensorDiff& diff : report.differing) differing[diff.name] = &diff;
  std::vector<std::string> problems;
  std::map<std::uint32_t, std::optional<ZipArchive>> zips;  // of the files read again
  for (std::size_t k = 0; k < others.size(); ++k) {
    auto it = differing.find(others[k].name);
    if (it == differing.end()) continue;
    const auto& [i, m] = which[k];
    const TensorDiff& diff = *it->second;
    check_records(checks[i].parts[m], files, zips, checks[i]);
    check_records(checks[i].parts.front(), files, zips, checks[i]);
    // "model part 1 differs from part 0", "data-parallel shard 1 differs from shard 0",
    // then the two files.
    std::string_view unit = checks[i].unit;
    std::string_view short_unit = unit.substr(unit.rfind(' ') + 1);
    std::string where =
        fmt::format(" ({} against {})", file_of(checks[i].parts[m], files), file_of(checks[i].parts.front(), files));
    if (!diff.mismatch.empty()) {
      problems.push_back(
          fmt::format("{}: {} {} differs from {} 0: {}{}", checks[i].key, unit, m, short_unit, diff.mismatch, where));
    } else {
      const DiffPosition& first = diff.positions.front();
      problems.push_back(fmt::format(
          "{}: replicated, but {} {} differs from {} 0 in {} element(s), first at [{}] ({} in {} {}, {} in {} 0), "
          "max |difference| {}{}",
          checks[i].key, unit, m, short_unit, diff.count, fmt::join(first.index, ", "), format_value(first.a),
          short_unit, m, format_value(first.b), short_unit, format_value(diff.max_abs), where));
    }
  }
  return problems;
}

std::string first_replicated_problem(const std::vector<std::string>& problems) {
  return fmt::format("{}{}", problems.front(),
                     problems.size() > 1 ? fmt::format(" (and {} more)", problems.size() - 1) : "");
}

}  // namespace ckpt
