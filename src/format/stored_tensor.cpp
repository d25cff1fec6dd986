// The one tensor descriptor and the shared list of them (stored_tensor.hpp).
#include "ckpt/format/stored_tensor.hpp"

#include "ckpt/io/error.hpp"

namespace ckpt {

std::uint64_t StoredTensor::numel() const {
  std::uint64_t count = 1;
  for (std::int64_t d : shape) count *= static_cast<std::uint64_t>(d);
  return count;
}

bool StoredTensor::is_contiguous() const {
  if (numel() == 0) return true;
  std::uint64_t expected = 1;  // numel() fits: Checkpoint checked it when it read the tensor
  for (std::size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && static_cast<std::uint64_t>(stride[i]) != expected) return false;
    expected *= static_cast<std::uint64_t>(shape[i]);
  }
  return true;
}

bool StoredTensor::same_view(const StoredTensor& other) const {
  return storage_key == other.storage_key && storage_offset == other.storage_offset && dtype == other.dtype &&
         shape == other.shape && stride == other.stride;
}

TensorList::TensorList() : TensorList(std::vector<StoredTensor>{}) {}

TensorList::TensorList(std::vector<StoredTensor> tensors) : data_(std::make_shared<Data>()) {
  data_->tensors = std::move(tensors);
}

std::optional<std::size_t> TensorList::find(std::string_view path) const {
  const Data& data = *data_;
  std::lock_guard lock(data.mutex);
  if (!data.indexed) {
    data.by_path.clear();
    data.by_path.reserve(data.tensors.size());
    for (std::size_t i = 0; i < data.tensors.size(); ++i) data.by_path.emplace(data.tensors[i].path, i);
    data.indexed = true;
  }
  auto it = data.by_path.find(path);
  if (it == data.by_path.end()) return std::nullopt;
  return it->second;
}

std::vector<StoredTensor>& TensorList::edit() {
  if (data_.use_count() > 1) {
    auto own = std::make_shared<Data>();
    own->tensors = data_->tensors;
    data_ = std::move(own);
  }
  std::lock_guard lock(data_->mutex);
  data_->indexed = false;  // the paths may change
  return data_->tensors;
}

std::size_t TensorList::index_of(const StoredTensor& tensor) const {
  const std::vector<StoredTensor>& all = data_->tensors;
  if (all.empty() || &tensor < all.data() || &tensor >= all.data() + all.size()) {
    internal_error("index_of: the tensor " + tensor.path + " is not an element of this list");
  }
  return static_cast<std::size_t>(&tensor - all.data());
}

}  // namespace ckpt
