// Values keyed by the bytes of a pickle. The shards of one model part have
// byte-identical pickles (all but the padded last ones), so what was made from
// one file's pickle (its decoded checkpoint, its description) is found again for
// the next file instead of being made again. A copy of each pickle's bytes is
// kept and compared whole: a hash alone could collide.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "ckpt/io/byte_reader.hpp"

namespace ckpt {

// Thread-safe.
template <typename T>
class ByPickleBytes {
 public:
  // The value added for these very bytes, or null.
  std::shared_ptr<const T> find(Bytes pickle) const {
    std::lock_guard lock(mutex_);
    auto range = entries_.equal_range(hash(pickle));
    for (auto it = range.first; it != range.second; ++it) {
      const std::vector<std::byte>& known = it->second.pickle;
      if (std::equal(known.begin(), known.end(), pickle.begin(), pickle.end())) return it->second.value;
    }
    return nullptr;
  }
  // Remembers `value` for `pickle` (two threads may add for equal bytes: either is found).
  void add(Bytes pickle, std::shared_ptr<const T> value) {
    Entry entry{std::vector<std::byte>(pickle.begin(), pickle.end()), std::move(value)};
    std::lock_guard lock(mutex_);
    entries_.emplace(hash(pickle), std::move(entry));
  }

 private:
  struct Entry {
    std::vector<std::byte> pickle;
    std::shared_ptr<const T> value;
  };
  static std::size_t hash(Bytes pickle) { return std::hash<std::string_view>{}(as_chars(pickle)); }

  mutable std::mutex mutex_;
  std::unordered_multimap<std::size_t, Entry> entries_;
};

}  // namespace ckpt
