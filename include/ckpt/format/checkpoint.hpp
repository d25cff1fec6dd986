// A torch.save file opened for reading: its zip records, its decoded object graph,
// and every tensor as a reference into the mapped bytes.
//
// A tensor is `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`
// where the storage is a persistent id `('storage', torch.<Type>Storage, key,
// location, numel)` naming the record `<archive>/data/<key>`. Opening a checkpoint
// checks every tensor's byte range against its record and never reads tensor data.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/format/stored_tensor.hpp"
#include "ckpt/format/torch_pickle.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/mapped_file.hpp"

namespace ckpt {

// A storage, under its key in Checkpoint::storages() ("17" names the record
// <archive>/data/17).
struct StorageRef {
  DType dtype = DType::UInt8;
  std::uint64_t numel = 0;  // elements of `dtype`
  std::string location;     // "cpu", "cuda:0"
  const ZipRecord* record = nullptr;
};

// The pickle nodes of a tensor: the _rebuild_tensor_v2 object, and the
// nn.Parameter wrapping it, if any.
struct TensorNodes {
  pickle::NodeId node = pickle::kNoNode;
  pickle::NodeId wrapper = pickle::kNoNode;
};

// A torch.save zip's archive name ("checkpoint_last-model_part-0-shard0") and
// its pickle record, checked: the pickle is there, and the byte order, if
// recorded, is little-endian. Throws Error naming the file.
struct TorchZip {
  std::string archive_name;
  const ZipRecord* pickle = nullptr;
};
TorchZip locate_torch_zip(const ZipArchive& zip);

// The record `<archive_name>/data/<key>` holding a storage of `numel` elements
// of `dtype`, checked to be there and exactly that long. Throws Error naming
// the file and the record.
const ZipRecord& storage_record(const ZipArchive& zip, const std::string& archive_name, const std::string& key,
                                DType dtype, std::uint64_t numel);

// Where `tensor` is in a file whose record of its storage is `storage_record`:
// its first element's absolute offset, and the record's CRC.
TensorPlace place_in(const StoredTensor& tensor, const ZipRecord& storage_record);

class Checkpoint {
 public:
  // Parses `file`, which must outlive the Checkpoint. Throws Error naming the
  // file, the record or tensor and the byte offset of anything malformed.
  explicit Checkpoint(const MappedFile& file);
  // The same, with `file`'s zip directory `zip` already parsed.
  Checkpoint(const MappedFile& file, ZipArchive zip);
  // `file` (its zip directory `zip`, already parsed), whose pickle bytes are
  // those of `same_pickle` (the caller compared them; an internal error
  // otherwise): the decoded graph is shared, only the storages are bound to
  // `file`'s own records (checked as above). What lets hundreds of shards of
  // one model part be opened for the cost of one decode.
  Checkpoint(const MappedFile& file, ZipArchive zip, const Checkpoint& same_pickle);

  const MappedFile& file() const { return file_; }
  const std::string& path() const { return file_.path(); }
  const ZipArchive& zip() const { return zip_; }
  const std::string& archive_name() const { return archive_name_; }
  const ZipRecord& pickle_record() const { return *pickle_record_; }
  const pickle::Graph& graph() const { return *graph_; }
  // The same graph, for a Graph::over it that outlives this checkpoint.
  std::shared_ptr<const pickle::Graph> shared_graph() const { return graph_; }
  // Every tensor, in the order a depth-first walk meets its path, ties
  // included (alias_of); places()[i] and tensor_nodes()[i] belong to tensors()[i].
  const TensorList& tensors() const { return tensors_; }
  const std::vector<TensorPlace>& places() const { return places_; }
  const std::vector<TensorNodes>& tensor_nodes() const { return nodes_; }
  const std::map<std::string, StorageRef>& storages() const { return storages_; }
  // The tensor at `path`, or null; its index, if any.
  const StoredTensor* find_tensor(std::string_view path) const;
  std::optional<std::size_t> tensor_index(std::string_view path) const { return tensors_.find(path); }
  // The bytes of tensor `index` (its span: contiguous tensors are exactly their data).
  Bytes tensor_bytes(std::size_t index) const {
    return file_.bytes().subspan(places_.at(index).file_byte_offset, tensors_.at(index).nbytes);
  }

 private:
  void collect_storages();
  void collect_tensors();
  void fill_places();  // places_ from tensors_ and this file's storage records

  const MappedFile& file_;
  ZipArchive zip_;
  std::string archive_name_;
  const ZipRecord* pickle_record_ = nullptr;
  std::shared_ptr<const pickle::Graph> graph_;  // shared by checkpoints of the same pickle bytes
  std::map<std::string, StorageRef> storages_;
  TensorList tensors_;  // shared by checkpoints of the same pickle bytes
  std::vector<TensorPlace> places_;
  std::vector<TensorNodes> nodes_;
};

// A strided view's extent, checked once by each reader of untrusted shapes (the
// checkpoint reader, the manifest reader) so that later arithmetic on them
// (numel(), byte counts, piece offsets) cannot overflow.
inline constexpr std::size_t kMaxTensorDims = 64;
struct ViewExtent {
  std::uint64_t numel = 0;          // elements of the shape
  std::uint64_t span_elements = 0;  // from the first element to the last, inclusive; 0 when numel is 0
};
// Throws Error (no location: callers add it) when shape and stride differ in
// length or have more than kMaxTensorDims dimensions, a size or stride is
// negative, or numel or the span, in elements or in bytes of `itemsize`, passes 64 bits.
ViewExtent view_extent(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& stride,
                       std::uint64_t itemsize);

// The storage a PersId node refers to, if it is a torch storage id.
struct StorageId {
  std::string key;
  DType dtype;
  std::uint64_t numel;
  std::string location;
};
std::optional<StorageId> parse_storage_id(const pickle::Graph& graph, pickle::NodeId persid);

// Object paths: the labels from the root joined with '/' ("model/decoder.layers.0.fc1.weight"),
// escaped as in JSON Pointer, "~~" marking the labels no str key spells ("~~empty",
// "3~~int", "~~..."), unique within a file: docs/design.md, "Object paths".
//
// Visits every node reachable from `from`, depth first, with its path;
// wrappers such as nn.Parameter are transparent. Each node is visited once, at
// the first path that reaches it; `revisit`, when given, is called for every
// later path that reaches a node.
using PathVisitor = std::function<void(pickle::NodeId, const std::string&)>;
void walk_paths(const pickle::Graph& graph, pickle::NodeId from, const std::string& prefix, const PathVisitor& visit,
                const PathVisitor& revisit = nullptr);

inline constexpr std::string_view kEmptyKeyLabel = "~~empty";
inline constexpr std::string_view kIntBesideStrSuffix = "~~int";
inline constexpr std::string_view kCutPathLabel = "~~...";

// A key as a path label: escaped, kEmptyKeyLabel when empty.
std::string path_label(std::string_view key);
// `prefix/label` (a label already escaped); past 1024 bytes `prefix/~~...`.
std::string join_path(const std::string& prefix, const std::string& label);
// join_path(prefix, path_label(key)).
std::string append_path(const std::string& prefix, const std::string& key);

// '~' -> "~0", '/' -> "~1", and back (unescape_label("a~1b") == "a/b";
// unescape_label("~~empty") == "").
std::string escape_label(std::string_view label);
std::string unescape_label(std::string_view label);
// An object path's labels, split at every '/' and unescaped
// (path_labels("a/b~1c") == {"a", "b/c"}; path_labels("") == {""}).
std::vector<std::string> path_labels(std::string_view path);

// The labels of one container's children, made unique (see above).
class ChildLabels {
 public:
  // `label` (a path label), or it with "~~N" when met before here.
  std::string unique(std::string label);

 private:
  std::unordered_map<std::string, int> seen_;
};

// A key as text: a str as it is, an int in decimal, any other key "~~" and
// Python's repr of it ("~~True", "~~None", "~~1.5", "~~(1, 2)", "~~?").
std::string key_label(const pickle::Graph& graph, pickle::NodeId key);

// The keys of one mapping, in order: `text` as key_label gives it (an object
// tree's key), `label` as a path label (escaped). An int key beside a str key
// of its digits (3 and "3") is "3~~int", whatever their order.
struct MappingKey {
  std::string text;
  std::string label;
};
std::vector<MappingKey> mapping_keys(const pickle::Graph& graph, std::span<const pickle::Entry> entries);
// True when no two of `keys` have the same `field` (text or label): then a
// ChildLabels of them alone would return each unchanged, and is not needed
// (a state dict of 200,000 keys would copy each into it).
bool all_distinct(const std::vector<MappingKey>& keys, std::string MappingKey::*field);

}  // namespace ckpt
