// DeepSpeed ZeRO's partition rules (zero.hpp). Every figure is in elements
// until a TensorSource is cut, which counts bytes.
#include "ckpt/layout/zero.hpp"

#include <fmt/format.h>

namespace ckpt {

namespace {

// Elements of a tensor, and of any sum of them here: its bytes (x 16 at most)
// stay far below 2^64, so no size computed from them wraps.
constexpr std::uint64_t kMaxNumel = std::uint64_t{1} << 56;

std::uint64_t round_up(std::uint64_t value, std::uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// The elements of `parts` together; nullopt past kMaxNumel.
std::optional<std::uint64_t> total_numel(const std::vector<TensorSource>& parts) {
  std::uint64_t total = 0;
  for (const TensorSource& part : parts) {
    std::optional<std::uint64_t> numel = shape_numel(part.shape);
    if (!numel || *numel > kMaxNumel - total) return std::nullopt;
    total += *numel;
  }
  return total;
}

constexpr std::string_view kTooLarge = "more than 2^56 elements together";

// The 1-D concatenation of `parts` (all of one dtype; `dtype` when empty),
// `numel` elements (total_numel's).
TensorSource flat(const std::vector<TensorSource>& parts, DType dtype, std::uint64_t numel) {
  if (parts.empty()) return zeros_source(dtype, {0});
  std::vector<TensorSource> flattened;
  for (const TensorSource& part : parts) {
    flattened.push_back(part.slice(0, part.nbytes(), {static_cast<std::int64_t>(part.numel())}));
  }
  return concat(flattened, {static_cast<std::int64_t>(numel)});
}

}  // namespace

std::optional<std::uint64_t> shape_numel(const std::vector<std::int64_t>& shape) {
  std::uint64_t numel = 1;
  for (std::int64_t extent : shape) {
    if (extent < 0) return std::nullopt;
    if (extent == 0) return 0;
    if (numel > kMaxNumel / static_cast<std::uint64_t>(extent)) return std::nullopt;
    numel *= static_cast<std::uint64_t>(extent);
  }
  return numel;
}

ZeroUnflattened zero12_group(const std::vector<TensorSource>& partitions, const std::vector<ZeroParam>& params,
                             std::int64_t world) {
  ZeroUnflattened out;
  const DType dtype = partitions.empty() ? DType::Float32 : partitions.front().dtype;
  for (const TensorSource& partition : partitions) {
    if (partition.dtype != dtype) {
      out.problem = fmt::format("the partitions are of different dtypes ({} and {})", dtype_info(dtype).name,
                                dtype_info(partition.dtype).name);
      return out;
    }
  }
  const std::optional<std::uint64_t> total = total_numel(partitions);
  if (!total) {
    out.problem = fmt::format("the partitions hold {}", kTooLarge);
    return out;
  }
  const TensorSource group = flat(partitions, dtype, *total);
  const std::uint64_t available = *total;
  const std::uint64_t itemsize = dtype_info(dtype).itemsize;
  std::uint64_t offset = 0;
  for (const ZeroParam& param : params) {
    std::optional<std::uint64_t> numel = shape_numel(param.shape);
    if (!numel) {
      out.problem = fmt::format("{} has the shape {}", param.name, shape_text(param.shape));
      return out;
    }
    if (*numel > available - offset) {
      out.problem = fmt::format("{} {} needs elements [{}, {}) of the group, which holds {}", param.name,
                                shape_text(param.shape), offset, offset + *numel, available);
      return out;
    }
    out.params.push_back(group.slice(offset * itemsize, *numel * itemsize, param.shape));
    offset += *numel;
  }
  const std::uint64_t align = 2 * static_cast<std::uint64_t>(world);
  if (round_up(offset, align) != round_up(available, align)) {
    out.problem = fmt::format(
        "the parameters take {} elements of the group's {} (padded to multiples of 2 x {} "
        "ranks: {} and {})",
        offset, available, world, round_up(offset, align), round_up(available, align));
  }
  return out;
}

ZeroUnflattened zero3_params(const std::vector<std::vector<TensorSource>>& ranks, const std::vector<ZeroParam>& params,
                             std::int64_t world) {
  ZeroUnflattened out;
  const auto ws = static_cast<std::uint64_t>(world);
  std::vector<std::uint64_t> per_rank;  // ceil(numel / world) of each parameter
  std::uint64_t partitioned = 0;
  for (const ZeroParam& param : params) {
    std::optional<std::uint64_t> numel = shape_numel(param.shape);
    if (!numel) {
      out.problem = fmt::format("{} has the shape {}", param.name, shape_text(param.shape));
      return out;
    }
    per_rank.push_back((*numel + ws - 1) / ws);
    partitioned += per_rank.back();
    if (partitioned > kMaxNumel) {
      out.problem = fmt::format("the parameters' slices hold {}", kTooLarge);
      return out;
    }
  }
  DType dtype = DType::Float32;
  if (!ranks.empty() && !ranks.front().empty()) dtype = ranks.front().front().dtype;
  std::vector<TensorSource> flats;
  for (std::size_t r = 0; r < ranks.size(); ++r) {
    for (const TensorSource& group : ranks[r]) {
      if (group.dtype != dtype) {
        out.problem = fmt::format("rank {} holds flat groups of {} and of {}: one dtype throughout", r,
                                  dtype_info(group.dtype).name, dtype_info(dtype).name);
        return out;
      }
    }
    const std::optional<std::uint64_t> held = total_numel(ranks[r]);
    if (!held || *held != partitioned) {
      out.problem = held ? fmt::format(
                               "rank {} holds {} elements, and the parameters' slices of ceil(numel / {}) "
                               "take {}",
                               r, *held, world, partitioned)
                         : fmt::format("rank {}'s flat groups hold {}", r, kTooLarge);
      return out;
    }
    flats.push_back(flat(ranks[r], dtype, *held));
  }
  const std::uint64_t itemsize = dtype_info(dtype).itemsize;
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    std::vector<TensorSource> slices;
    for (const TensorSource& rank : flats) {
      slices.push_back(rank.slice(offset * itemsize, per_rank[i] * itemsize, {static_cast<std::int64_t>(per_rank[i])}));
    }
    const std::uint64_t numel = *shape_numel(params[i].shape);
    TensorSource whole = concat(slices, {static_cast<std::int64_t>(per_rank[i] * ws)});
    out.params.push_back(whole.slice(0, numel * itemsize, params[i].shape));
    offset += per_rank[i];
  }
  return out;
}

ZeroUnflattened zero3_frozen(const std::vector<TensorSource>& fragments, const ZeroParam& param) {
  ZeroUnflattened out;
  std::optional<std::uint64_t> numel = shape_numel(param.shape);
  if (!numel) {
    out.problem = fmt::format("{} has the shape {}", param.name, shape_text(param.shape));
    return out;
  }
  const DType dtype = fragments.empty() ? DType::Float32 : fragments.front().dtype;
  for (const TensorSource& fragment : fragments) {
    if (fragment.dtype != dtype) {
      out.problem = fmt::format("{}'s fragments are of different dtypes", param.name);
      return out;
    }
  }
  const std::optional<std::uint64_t> held = total_numel(fragments);
  if (!held || *held < *numel) {
    out.problem = held ? fmt::format("{} {} needs {} elements, and its fragments hold {}", param.name,
                                     shape_text(param.shape), *numel, *held)
                       : fmt::format("{}'s fragments hold {}", param.name, kTooLarge);
    return out;
  }
  TensorSource whole = flat(fragments, dtype, *held);
  out.params.push_back(whole.slice(0, *numel * dtype_info(dtype).itemsize, param.shape));
  return out;
}

}  // namespace ckpt
