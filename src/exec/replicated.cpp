#include "ckpt/exec/replicated.hpp"

#include <fmt/format.h>

#include <cstring>

#include "ckpt/exec/exec.hpp"
#include "ckpt/exec/tensor_math.hpp"

namespace ckpt {

// Compares the parts of every replicated tensor in chunks; returns one message
// per tensor whose parts differ.
std::vector<std::string> compare_replicated(const std::vector<ReplicatedCheck>& checks,
                                            const std::vector<const MappedFile*>& files) {
  constexpr std::uint64_t kChunkBytes = 4 << 20;
  std::vector<std::string> problems;
  std::vector<std::byte> first(kChunkBytes);
  std::vector<std::byte> other(kChunkBytes);
  for (const ReplicatedCheck& check : checks) {
    const TensorSource& head = check.parts.front();
    std::uint64_t itemsize = dtype_info(head.dtype).itemsize;
    std::uint64_t step = kChunkBytes / itemsize * itemsize;
    for (std::size_t m = 1; m < check.parts.size(); ++m) {
      ElementComparison total;
      for (std::uint64_t begin = 0; begin < head.nbytes(); begin += step) {
        std::uint64_t count = std::min(step, head.nbytes() - begin);
        read_source_bytes(head, files, begin, count, first.data());
        read_source_bytes(check.parts[m], files, begin, count, other.data());
        if (std::memcmp(first.data(), other.data(), count) == 0) continue;
        ElementComparison d = compare_elements(head.dtype, other.data(), first.data(), count / itemsize, 0.0, 0.0, 0);
        total.count += d.count;
        total.max_abs = std::max(total.max_abs, d.max_abs);
      }
      if (total.count > 0) {
        problems.push_back(fmt::format("{}: model part {} differs from part 0 in {} element(s), max |difference| {:g}",
                                       check.key, m, total.count, total.max_abs));
      }
    }
  }
  return problems;
}

}  // namespace ckpt
