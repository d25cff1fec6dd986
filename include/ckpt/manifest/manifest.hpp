// The manifest: every input file, every tensor as a byte range, and the decoded
// FSDP x MP layout. This header is the data; describe.hpp builds it from files,
// manifest_json.hpp writes and reads its versioned JSON form (schema in
// README.md, "Manifest schema"), input_layouts.hpp says what each kind of
// input set is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/dtype.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/layout/metaseq.hpp"

namespace ckpt {

// Limits on what a manifest may claim. A manifest is input like any other
// (edited by hand, truncated, crafted): manifest_from_json checks every field
// against these and against the other fields before anything uses it.
inline constexpr int kMaxGridSide = 1 << 20;             // part and shard numbers in a grid are below this
inline constexpr std::uint64_t kMaxGridCells = 1 << 20;  // parts x shards that detect_grid allocates

// A tensor as the files that hold it describe it. Shards of one model part hold
// the same tensors (paths, dtypes, shapes), so a list of them is shared by every
// file that holds exactly that list (TensorList); where each one is in a given
// file is that file's TensorPlace.
struct ManifestTensor {
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
  // Whether `other` is the same view of the same storage: a tie that was
  // pickled as two tensor objects (model.state_dict() does that), or one tensor
  // under two paths (alias_of).
  bool same_view(const ManifestTensor& other) const;
  // "model", "optimizer_state" or "other", from the top-level key of `path`.
  std::string section() const;
  bool operator==(const ManifestTensor&) const = default;
};

// The tensors of one file seen so far, by view: insert() is false for a tensor
// that is the same view of the same storage as one inserted before (a tie).
// The tensors must outlive the set.
class DistinctViews {
 public:
  bool insert(const ManifestTensor& tensor) { return tied_to(tensor) == nullptr; }
  // The tensor inserted before that `tensor` is the same view as (a tie), or
  // null, and then `tensor` is inserted.
  const ManifestTensor* tied_to(const ManifestTensor& tensor);

 private:
  std::map<std::pair<std::string_view, std::int64_t>, std::vector<const ManifestTensor*>> seen_;
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
  explicit TensorList(std::vector<ManifestTensor> tensors);

  std::size_t size() const { return data_->tensors.size(); }
  bool empty() const { return data_->tensors.empty(); }
  const ManifestTensor& operator[](std::size_t i) const { return data_->tensors[i]; }
  const ManifestTensor& at(std::size_t i) const { return data_->tensors.at(i); }
  const ManifestTensor& front() const { return data_->tensors.front(); }
  const ManifestTensor& back() const { return data_->tensors.back(); }
  std::vector<ManifestTensor>::const_iterator begin() const { return data_->tensors.begin(); }
  std::vector<ManifestTensor>::const_iterator end() const { return data_->tensors.end(); }
  // The index of the tensor at `path`, if any. Thread-safe.
  std::optional<std::size_t> find(std::string_view path) const;
  // The index of `tensor`, which must be an element of this list.
  std::size_t index_of(const ManifestTensor& tensor) const;
  // True when both are the same shared list (then they are equal too).
  bool same_list(const TensorList& other) const { return data_ == other.data_; }
  // The same for every copy of one shared list.
  const void* identity() const { return data_.get(); }
  bool operator==(const TensorList& other) const { return same_list(other) || data_->tensors == other.data_->tensors; }
  // This list's own tensors, copied first when shared, to change in place.
  std::vector<ManifestTensor>& edit();

 private:
  struct Data {
    std::vector<ManifestTensor> tensors;
    mutable std::mutex mutex;  // guards the index, built on the first find()
    mutable bool indexed = false;
    mutable std::unordered_map<std::string_view, std::size_t> by_path;  // views of tensors[i].path
  };
  std::shared_ptr<Data> data_;
};

// A value shared by the files that hold an equal one, such as one part's
// shard_metadata: copying the handle copies a pointer. edit() gives a value of
// its own to change (readers, tests); nothing else changes it.
template <typename T>
class Shared {
 public:
  Shared() = default;
  Shared(T value) : value_(std::make_shared<T>(std::move(value))) {}  // NOLINT: implicit, as an optional's
  explicit operator bool() const { return value_ != nullptr; }
  const T& operator*() const { return *value_; }
  const T* operator->() const { return value_.get(); }
  // True when both are the same shared value (or both empty).
  bool same_value(const Shared& other) const { return value_ == other.value_; }
  const void* identity() const { return value_.get(); }
  void reset() { value_.reset(); }
  T& edit() {
    if (value_.use_count() > 1) value_ = std::make_shared<T>(*value_);
    return *value_;
  }

 private:
  std::shared_ptr<T> value_;
};

// What kind of file a ManifestFile describes. A safetensors file (read by
// inspect, diff and verify) is one state dict: its tensors are at
// "model/<key>", each its own storage (storage_key: its index), with no CRC
// (record_crc32 0); its object tree is {"model": {...}, "__metadata__": {...}}.
// Manifests (JSON) hold torch files only.
enum class FileFormat : std::uint8_t { Torch, Safetensors };

struct ManifestFile {
  std::string path;  // absolute
  FileFormat format = FileFormat::Torch;
  std::uint64_t size_bytes = 0;
  std::int64_t mtime_ns = 0;
  std::string archive_name;
  FileRole role;
  int pickle_protocol = 2;
  std::vector<std::string> top_level_keys;
  TensorList tensors;                           // shared with the files that hold the same tensors
  std::vector<TensorPlace> places;              // places[i]: where tensors[i] is in this file
  Shared<FsdpMetadata> fsdp;                    // shard_metadata; empty when the file has none
  std::optional<DeclaredParts> declared_parts;  // model_parallel_size in cfg or args
  Shared<nlohmann::ordered_json> objects;       // the object tree, tensors as {"$tensor": index}; never empty

  ManifestFile();
  // Where `tensor` (an element of `tensors`, found by find_tensor) is in this file.
  const TensorPlace& place(const ManifestTensor& tensor) const { return places.at(tensors.index_of(tensor)); }
  // Appends a tensor and its place (readers of hand-made manifests, tests).
  void add_tensor(ManifestTensor tensor, TensorPlace place);
  // Removes the tensors for which `remove` is true, with their places.
  template <typename Predicate>
  void remove_tensors_if(Predicate remove) {
    std::vector<ManifestTensor>& all = tensors.edit();
    std::size_t kept = 0;
    for (std::size_t i = 0; i < all.size(); ++i) {
      if (remove(std::as_const(all[i]))) continue;
      if (kept != i) {
        all[kept] = std::move(all[i]);
        places[kept] = places[i];
      }
      ++kept;
    }
    all.resize(kept);
    places.resize(kept);
  }
};

// The MP x DP grid of a set of files, and everything that makes it unfit for
// stitch, reshard or diff. The one set check: inspect and verify report the
// same problems that those commands refuse.
struct Grid {
  int mp = 0;                           // model parts: the highest found + 1, or what cfg declares if more
  int dp = 0;                           // FSDP shards per part: the highest found + 1, or what the flat
                                        // parameters' chunk rule implies if more
  std::vector<std::vector<int>> cells;  // [part][shard] -> file index, -1 when missing
  std::vector<std::string> problems;    // one line each: what is missing, duplicated or inconsistent
};

// The tensor at object path `path` ("model/decoder.layers.0.flat_param_0"), or null.
const ManifestTensor* find_tensor(const ManifestFile& file, std::string_view path);
// What a file holds, for a person, when it is not what a command needs: "a
// TorchScript archive (torch.jit.save)", "a pickled Python object of class
// __main__.Net (torch.save(model))", "a plain state dict of 12 tensors
// (torch.save(model.state_dict()))", "no 'model' state dict (top-level keys:
// ...)".
std::string describe_contents(const ManifestFile& file);
// Where a checkpoint's weights are: object paths under `model`.
inline constexpr std::string_view kModelPrefix = "model/";
// The object path of the state dict entry `key` under `prefix` ("model/"):
// the key escaped as a path label ("a/b" -> "model/a~1b"; checkpoint.hpp).
std::string state_dict_path(std::string_view prefix, std::string_view key);

struct Manifest {
  std::vector<ManifestFile> files;
  Grid grid;
};

// Complete when every model part that cfg's model_parallel_size names is
// there, every FSDP rank that the flat parameters' chunk rule (numel, chunk
// length) implies is there, and the files agree with each other: the same
// shard_metadata within a part, each rank's padding by the chunk rule, the same
// dtype for a tensor everywhere, the same tensors on every shard of a part,
// optimizer state in all files or none, one declared part count.
// `model_parts` (--model-parts) replaces the part count cfg declares, for files
// whose cfg is stale (metaseq's reshard_model_parallel copies it unchanged).
Grid detect_grid(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts = std::nullopt);

}  // namespace ckpt
