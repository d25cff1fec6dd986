// The one tensor descriptor: a tensor as a file stores it. The checkpoint
// reader (checkpoint.hpp) and the safetensors reader make it, the manifest lists
// it (manifest.hpp) and writes it as JSON, the planners read it. Where its bytes
// are in one file is a TensorPlace beside it, since the shards of one model
// part share one list of tensors (TensorList) and differ only in places.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/format/torch_pickle.hpp"

namespace ckpt {

// A tensor as the files that hold it describe it. Shards of one model part hold
// the same tensors (paths, dtypes, shapes), so a list of them is shared by every
// file that holds exactly that list (TensorList); where each one is in a given
// file is that file's TensorPlace.
struct StoredTensor {
  std::string path;  // object path: "model/decoder.layers.0.flat_param_0"
  DType dtype = DType::Float32;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::string storage_key;  // the record `<archive_name>/data/<storage_key>`
  std::int64_t storage_offset = 0;
  std::uint64_t nbytes = 0;              // bytes the view spans, from its first element to its last
  std::uint64_t storage_nbytes = 0;      // bytes of the whole storage (its record), shared by its views
  bool requires_grad = false;            // the nn.Parameter's when wrapped
  TensorWrap wrap = TensorWrap::Tensor;  // an nn.Parameter at this path, or the tensor itself
  std::optional<std::string> alias_of;   // another path holding this very tensor (tied)

  std::uint64_t numel() const;
  // Row-major and dense (strides of a fresh tensor of this shape).
  bool is_contiguous() const;
  // Whether `other` is the same view of the same storage: a tie that was
  // pickled as two tensor objects (model.state_dict() does that), or one tensor
  // under two paths (alias_of).
  bool same_view(const StoredTensor& other) const;
  bool operator==(const StoredTensor&) const = default;
};

// Where a tensor's bytes are in one file.
struct TensorPlace {
  std::uint64_t file_byte_offset = 0;  // of the first element
  std::uint32_t record_crc32 = 0;      // of its storage record, as the zip directory says
  bool operator==(const TensorPlace&) const = default;
};

// A list of tensors shared by the files that hold the same list (copying it
// copies a pointer), with an index by path. edit() gives a list of its own to
// change (readers of hand-made manifests, tests); nothing else changes it.
class TensorList {
 public:
  TensorList();
  explicit TensorList(std::vector<StoredTensor> tensors);

  std::size_t size() const { return data_->tensors.size(); }
  bool empty() const { return data_->tensors.empty(); }
  const StoredTensor& operator[](std::size_t i) const { return data_->tensors[i]; }
  const StoredTensor& at(std::size_t i) const { return data_->tensors.at(i); }
  const StoredTensor& front() const { return data_->tensors.front(); }
  const StoredTensor& back() const { return data_->tensors.back(); }
  std::vector<StoredTensor>::const_iterator begin() const { return data_->tensors.begin(); }
  std::vector<StoredTensor>::const_iterator end() const { return data_->tensors.end(); }
  // The index of the tensor at `path`, if any. Thread-safe.
  std::optional<std::size_t> find(std::string_view path) const;
  // The index of `tensor`, which must be an element of this list.
  std::size_t index_of(const StoredTensor& tensor) const;
  // True when both are the same shared list (then they are equal too).
  bool same_list(const TensorList& other) const { return data_ == other.data_; }
  // The same for every copy of one shared list.
  const void* identity() const { return data_.get(); }
  bool operator==(const TensorList& other) const { return same_list(other) || data_->tensors == other.data_->tensors; }
  // This list's own tensors, copied first when shared, to change in place.
  std::vector<StoredTensor>& edit();

 private:
  struct Data {
    std::vector<StoredTensor> tensors;
    mutable std::mutex mutex;  // guards the index, built on the first find()
    mutable bool indexed = false;
    mutable std::unordered_map<std::string_view, std::size_t> by_path;  // views of tensors[i].path
  };
  std::shared_ptr<Data> data_;
};

}  // namespace ckpt
