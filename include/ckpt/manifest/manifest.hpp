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
#include "ckpt/format/stored_tensor.hpp"
#include "ckpt/layout/metaseq.hpp"

namespace ckpt {

// Limits on what a manifest may claim. A manifest is input like any other
// (edited by hand, truncated, crafted): manifest_from_json checks every field
// against these and against the other fields before anything uses it.
inline constexpr int kMaxGridSide = 1 << 20;             // part and shard numbers in a grid are below this
inline constexpr std::uint64_t kMaxGridCells = 1 << 20;  // parts x shards that detect_grid allocates

// The tensors of one file seen so far, by view: insert() is false for a tensor
// that is the same view of the same storage as one inserted before (a tie).
// The tensors must outlive the set.
class DistinctViews {
 public:
  bool insert(const StoredTensor& tensor) { return tied_to(tensor) == nullptr; }
  // The tensor inserted before that `tensor` is the same view as (a tie), or
  // null, and then `tensor` is inserted.
  const StoredTensor* tied_to(const StoredTensor& tensor);

 private:
  std::map<std::pair<std::string_view, std::int64_t>, std::vector<const StoredTensor*>> seen_;
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
enum class FileFormat : std::uint8_t { Torch, Safetensors, Dcp, DeepSpeed };

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
  const TensorPlace& place(const StoredTensor& tensor) const { return places.at(tensors.index_of(tensor)); }
  // The first byte of tensor i's storage record in this file (its place is
  // storage_offset elements further on).
  std::uint64_t storage_start(std::size_t i) const;
  // Appends a tensor and its place (readers of hand-made manifests, tests).
  void add_tensor(StoredTensor tensor, TensorPlace place);
  // Removes the tensors for which `remove` is true, with their places.
  template <typename Predicate>
  void remove_tensors_if(Predicate remove) {
    std::vector<StoredTensor>& all = tensors.edit();
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
const StoredTensor* find_tensor(const ManifestFile& file, std::string_view path);
// "model", "optimizer_state" or "other", from the top-level key of the tensor's path.
std::string tensor_section(const StoredTensor& tensor);
// A tensor inside a container inside the state dict at `prefix` ("model/a/b"
// under "model/"), which a state dict (flat: key -> tensor) cannot hold; null
// when there is none.
const StoredTensor* nested_tensor(const ManifestFile& file, const std::string& prefix);
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
