// Opening a torch.save file: archive name, pickle, storages and tensor references.
#include "ckpt/format/checkpoint.hpp"

#include <numeric>

#include "ckpt/io/crc32.hpp"
#include "ckpt/io/error.hpp"

#include "ckpt/format/pyobject.hpp"
#include "ckpt/format/python_globals.hpp"

#include <fmt/format.h>

#include <algorithm>

#include <functional>
#include <tuple>
#include <unordered_set>

namespace ckpt {

using pickle::Graph;
using pickle::Kind;
using pickle::NodeId;

ViewExtent view_extent(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& stride,
                       std::uint64_t itemsize) {
  if (shape.size() != stride.size()) throw Error("shape and stride have different lengths");
  if (shape.size() > kMaxTensorDims) {
    throw Error(fmt::format("{} dimensions (at most {} accepted)", shape.size(), kMaxTensorDims));
  }
  ViewExtent extent;
  extent.numel = 1;
  std::uint64_t last = 0;  // element index of the last element, from the first
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0 || stride[i] < 0) throw Error("negative size or stride");
    extent.numel = checked_mul(extent.numel, static_cast<std::uint64_t>(shape[i]), "tensor elements");
    if (shape[i] > 0) {
      last = checked_add(
          last,
          checked_mul(static_cast<std::uint64_t>(shape[i] - 1), static_cast<std::uint64_t>(stride[i]), "tensor span"),
          "tensor span");
    }
  }
  extent.span_elements = extent.numel == 0 ? 0 : checked_add(last, 1, "tensor span");
  (void)checked_mul(extent.numel, itemsize, "tensor bytes");
  (void)checked_mul(extent.span_elements, itemsize, "tensor span");
  return extent;
}

std::string escape_label(std::string_view label) {
  std::string out;
  out.reserve(label.size());
  for (char c : label) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

std::string unescape_label(std::string_view label) {
  if (label == kEmptyKeyLabel) return "";
  std::string out;
  out.reserve(label.size());
  for (std::size_t i = 0; i < label.size(); ++i) {
    if (label[i] == '~' && i + 1 < label.size() && (label[i + 1] == '0' || label[i + 1] == '1')) {
      out += label[i + 1] == '0' ? '~' : '/';
      ++i;
    } else {
      out += label[i];
    }
  }
  return out;
}

std::vector<std::string> path_labels(std::string_view path) {
  std::vector<std::string> out;
  for (std::size_t start = 0; start <= path.size();) {
    const std::size_t slash = std::min(path.find('/', start), path.size());
    out.push_back(unescape_label(path.substr(start, slash - start)));
    start = slash + 1;
  }
  return out;
}

bool all_distinct(const std::vector<MappingKey>& keys, std::string MappingKey::*field) {
  std::unordered_set<std::string_view> seen;
  seen.reserve(keys.size());
  for (const MappingKey& key : keys) {
    if (!seen.insert(key.*field).second) return false;
  }
  return true;
}

std::string ChildLabels::unique(std::string label) {
  int& times = seen_[label];
  ++times;
  if (times == 1) return label;
  // Unescaped texts (object-tree keys) may hold "~~N" themselves: take the
  // first suffix no label of this container has.
  for (int n = times;; ++n) {
    std::string renamed = label + "~~" + std::to_string(n);
    if (seen_.emplace(renamed, 1).second) return renamed;
  }
}

std::string path_label(std::string_view key) {
  return key.empty() ? std::string(kEmptyKeyLabel) : escape_label(key);
}

std::string join_path(const std::string& prefix, const std::string& label) {
  // Bounded, so that hostile nesting of long keys cannot make paths take memory
  // quadratic in the pickle's size.
  constexpr std::size_t kPathBytes = 1024;
  if (prefix.ends_with(kCutPathLabel)) return prefix;  // already cut: deeper paths share it
  const std::string& last = prefix.size() + 1 + label.size() > kPathBytes ? std::string(kCutPathLabel) : label;
  return prefix.empty() ? last : prefix + "/" + last;
}

std::string append_path(const std::string& prefix, const std::string& key) {
  return join_path(prefix, path_label(key));
}

namespace {

// Python's repr of a key that is not a str or an int, for its label: True,
// None, 1.5, (1, 'a'); "?" for anything else (bytes, objects).
std::string key_repr(const Graph& graph, NodeId key, int depth) {
  const pickle::NodeView node = graph[key];
  switch (node.kind) {
    case Kind::Str: return fmt::format("'{}'", node.text);
    case Kind::Int: return std::to_string(node.integer);
    case Kind::Bool: return node.boolean ? "True" : "False";
    case Kind::None: return "None";
    case Kind::Float: return fmt::format("{}", node.real);
    case Kind::Tuple: {
      if (depth >= 4) return "?";
      std::vector<std::string> items;
      for (NodeId item : node.items) items.push_back(key_repr(graph, item, depth + 1));
      return fmt::format("({}{})", fmt::join(items, ", "), items.size() == 1 ? "," : "");
    }
    default: return "?";
  }
}

}  // namespace

std::vector<MappingKey> mapping_keys(const Graph& graph, std::span<const pickle::Entry> entries) {
  std::unordered_set<std::string_view> str_keys;
  for (const auto& [k, v] : entries) {
    if (graph[k].kind == Kind::Str) str_keys.insert(graph[k].text);
  }
  std::vector<MappingKey> out;
  out.reserve(entries.size());
  for (const auto& [k, v] : entries) {
    const pickle::NodeView node = graph[k];
    if (node.kind == Kind::Str) {
      out.push_back({std::string(node.text), path_label(node.text)});
    } else if (node.kind == Kind::Int) {
      // Beside the str of its digits, an int key is told apart by its type,
      // not by which of the two comes first (two files may order them apart).
      std::string digits = std::to_string(node.integer);
      if (str_keys.contains(digits)) digits += kIntBesideStrSuffix;
      out.push_back({digits, digits});
    } else {
      std::string repr = key_repr(graph, k, 0);
      out.push_back({"~~" + repr, "~~" + escape_label(repr)});
    }
  }
  return out;
}

std::string key_label(const Graph& graph, NodeId key) {
  const pickle::NodeView node = graph[key];
  if (node.kind == Kind::Str) return std::string(node.text);
  if (node.kind == Kind::Int) return std::to_string(node.integer);
  return "~~" + key_repr(graph, key, 0);
}

namespace {

bool is_scalar(Kind kind) {
  return kind == Kind::None || kind == Kind::Bool || kind == Kind::Int || kind == Kind::Float;
}

bool is_tensor_wrapper(const Graph& graph, NodeId id) {
  std::optional<pickle::NodeView> cls = graph.object_class(id);
  if (!cls) return false;
  return is_global(*cls, py::kRebuildParameter) || is_global(*cls, py::kRebuildParameterWithState) ||
         is_global(*cls, py::kRebuildFromTypeV2);
}

bool is_rebuild_tensor(const Graph& graph, NodeId id) {
  std::optional<pickle::NodeView> cls = graph.object_class(id);
  return cls.has_value() && is_global(*cls, py::kRebuildTensorV2);
}

// nn.Parameter's wrapper, with or without Python attributes; Tensor for
// anything else (a tensor subclass).
TensorWrap parameter_wrap(const Graph& graph, NodeId id) {
  std::optional<pickle::NodeView> cls = graph.object_class(id);
  if (!cls) return TensorWrap::Tensor;
  if (is_global(*cls, py::kRebuildParameter)) return TensorWrap::Parameter;
  if (is_global(*cls, py::kRebuildParameterWithState)) return TensorWrap::ParameterWithState;
  return TensorWrap::Tensor;
}

// The layout of a sparse tensor's rebuild call ("torch.sparse_csr"), or
// nullopt when `id` is none.
std::optional<std::string> sparse_layout(const Graph& graph, NodeId id) {
  std::optional<pickle::NodeView> cls = graph.object_class(id);
  if (!cls || !(is_global(*cls, py::kRebuildSparseTensor) || is_global(*cls, py::kRebuildSparseCsrTensor))) {
    return std::nullopt;
  }
  const auto& args = graph[graph[id].args].items;
  if (!args.empty()) {
    const pickle::NodeView layout = graph[args[0]];
    if (layout.kind == Kind::Global) return fmt::format("{}.{}", layout.text, layout.name);
    if (layout.kind == Kind::Object && layout.args != pickle::kNoNode) {
      const auto& layout_args = graph[layout.args].items;
      if (layout_args.size() == 1 && graph[layout_args[0]].kind == Kind::Str) {
        return std::string(graph[layout_args[0]].text);
      }
    }
  }
  return "a sparse layout";
}

class PathWalker {
 public:
  PathWalker(const Graph& graph, const PathVisitor& visit, const PathVisitor& revisit)
      : graph_(graph), visit_(visit), revisit_(revisit) {}

  void walk(NodeId id, const std::string& path, int depth) {
    if (id >= graph_.size()) return;
    check_depth(depth);
    // A scalar is a value met anywhere (the decoder keeps one node per small
    // int); an object met again is shared, and walked once.
    if (!is_scalar(graph_[id].kind)) {
      if (!first_visit(id)) {
        if (revisit_) revisit_(id, path);
        return;
      }
    }
    visit_(id, path);
    const pickle::NodeView node = graph_[id];
    ++depth;
    if (node.kind == Kind::Object && is_tensor_wrapper(graph_, id)) {
      // nn.Parameter and tensor subclasses: the tensor inside has the same path.
      for (NodeId arg : graph_[node.args].items) walk_transparent(arg, path, depth);
      if (node.state != pickle::kNoNode) walk(node.state, append_path(path, "state"), depth);
      return;
    }
    switch (node.kind) {
      case Kind::Dict: walk_entries(node.entries, path, nullptr, depth); return;
      case Kind::List:
      case Kind::Tuple:
      case Kind::Set:
      case Kind::FrozenSet:
        for (std::size_t i = 0; i < node.items.size(); ++i)
          walk(node.items[i], append_path(path, std::to_string(i)), depth);
        return;
      case Kind::Object: {
        // Entries, items, the state's attributes and the arguments share one level.
        ChildLabels labels;
        walk_entries(node.entries, path, &labels, depth);
        for (std::size_t i = 0; i < node.items.size(); ++i)
          walk(node.items[i], child_path(path, labels, std::to_string(i)), depth);
        if (node.state != pickle::kNoNode) walk_state(node.state, path, labels, depth);
        if (!is_rebuild_tensor(graph_, id)) {
          const auto& args = graph_[node.args].items;
          for (std::size_t i = 0; i < args.size(); ++i)
            walk(args[i], child_path(path, labels, fmt::format("args.{}", i)), depth);
        }
        return;
      }
      default: return;
    }
  }

 private:
  static void check_depth(int depth) {
    if (depth > pickle::kMaxDepth) throw Error(fmt::format("objects nested deeper than {} levels", pickle::kMaxDepth));
  }

  void walk_transparent(NodeId id, const std::string& path, int depth) {
    check_depth(depth);
    if (id < graph_.size() && graph_[id].kind == Kind::Tuple && !first_visit(id)) return;  // a DAG of tuples
    if (id < graph_.size() && (is_rebuild_tensor(graph_, id) || is_tensor_wrapper(graph_, id))) {
      walk(id, path, depth);
    } else if (id < graph_.size() && graph_[id].kind == Kind::Tuple) {
      for (NodeId item : graph_[id].items) walk_transparent(item, path, depth + 1);
    }
  }
  void walk_state(NodeId state, const std::string& path, ChildLabels& labels, int depth) {
    check_depth(depth);
    const pickle::NodeView node = graph_[state];
    if (node.kind == Kind::Dict && first_visit(state)) {
      // An instance dict: its keys are attribute names of the object.
      walk_entries(node.entries, path, &labels, depth);
    } else if (node.kind == Kind::Tuple && node.items.size() == 2 && first_visit(state)) {
      for (NodeId part : node.items) walk_state(part, path, labels, depth + 1);
    } else {
      walk(state, child_path(path, labels, "state"), depth);
    }
  }

  // A mapping's values, each under its key's label, unique among `labels`, or
  // among the mapping's own when `labels` is null (a dict).
  void walk_entries(std::span<const pickle::Entry> entries, const std::string& path, ChildLabels* labels, int depth) {
    std::vector<MappingKey> keys = mapping_keys(graph_, entries);
    ChildLabels own;
    if (labels == nullptr && !all_distinct(keys, &MappingKey::label)) labels = &own;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      walk(entries[i].second, join_path(path, labels ? labels->unique(keys[i].label) : keys[i].label), depth);
    }
  }

  static std::string child_path(const std::string& path, ChildLabels& labels, const std::string& key) {
    return join_path(path, labels.unique(path_label(key)));
  }

  const Graph& graph_;
  const PathVisitor& visit_;
  // Marks `id` seen; false when it was already.
  bool first_visit(NodeId id) {
    if (seen_[id]) return false;
    seen_[id] = true;
    return true;
  }

  const PathVisitor& revisit_;
  std::vector<bool> seen_ = std::vector<bool>(graph_.size(), false);
};

}  // namespace

void walk_paths(const Graph& graph, NodeId from, const std::string& prefix, const PathVisitor& visit,
                const PathVisitor& revisit) {
  PathWalker(graph, visit, revisit).walk(from, prefix, 0);
}

std::optional<StorageId> parse_storage_id(const Graph& graph, NodeId persid) {
  if (persid >= graph.size() || graph[persid].kind != Kind::PersId) return std::nullopt;
  NodeId pid = graph[persid].callable;
  if (pid >= graph.size() || graph[pid].kind != Kind::Tuple) return std::nullopt;
  const auto& items = graph[pid].items;
  if (items.size() != 5 || !graph.is_str(items[0], "storage")) return std::nullopt;
  const pickle::NodeView type = graph[items[1]];
  const pickle::NodeView key = graph[items[2]];
  const pickle::NodeView location = graph[items[3]];
  auto numel = as_int(graph, items[4]);
  if (type.kind != Kind::Global || type.text != py::kStorageModule || key.kind != Kind::Str || !numel || *numel < 0) {
    return std::nullopt;
  }
  StorageId id;
  id.key = std::string(key.text);
  id.numel = static_cast<std::uint64_t>(*numel);
  id.location = location.kind == Kind::Str ? std::string(location.text) : "";
  if (type.name == py::kUntypedStorage.name) {
    id.dtype = DType::UInt8;
  } else if (auto dtype = dtype_from_storage_name(type.name)) {
    id.dtype = *dtype;
  } else {
    throw Error(fmt::format("unsupported storage type torch.{}", type.name));
  }
  return id;
}

TorchZip locate_torch_zip(const ZipArchive& zip) {
  const std::string& path = zip.path();
  if (zip.records().empty()) throw Error(Location{path, "", std::nullopt}, "empty zip archive: not a torch.save file");
  TorchZip out;
  const std::string& first = zip.records().front().name;
  out.archive_name = first.substr(0, first.find('/'));
  out.pickle = zip.find(out.archive_name + "/data.pkl");
  if (out.pickle == nullptr) {
    throw Error(Location{path, "", std::nullopt},
                fmt::format("zip archive has no {}/data.pkl record: not a torch.save file", out.archive_name));
  }
  if (const ZipRecord* order = zip.find(out.archive_name + "/byteorder")) {
    std::string_view value = as_chars(zip.data(*order));
    if (value != "little") {
      throw Error(Location{path, order->name, order->data_offset},
                  fmt::format("byte order '{}' is not supported (only little-endian)", value));
    }
  }
  return out;
}

const ZipRecord& storage_record(const ZipArchive& zip, const std::string& archive_name, const std::string& key,
                                DType dtype, std::uint64_t numel) {
  std::string record_name = archive_name + "/data/" + key;
  const ZipRecord* record = zip.find(record_name);
  if (record == nullptr) {
    throw Error(Location{zip.path(), record_name, std::nullopt}, "storage record referenced by the pickle is missing");
  }
  if (numel > UINT64_MAX / dtype_info(dtype).itemsize) {
    throw Error(Location{zip.path(), record_name, record->data_offset},
                fmt::format("storage of {} {} elements: its size passes 64 bits (the record holds {} bytes)", numel,
                            dtype_info(dtype).name, record->nbytes));
  }
  std::uint64_t expected = numel * dtype_info(dtype).itemsize;
  if (record->nbytes != expected) {
    throw Error(Location{zip.path(), record_name, record->data_offset},
                fmt::format("storage of {} {} elements needs {} bytes, record holds {}", numel, dtype_info(dtype).name,
                            expected, record->nbytes));
  }
  return *record;
}

Checkpoint::Checkpoint(const MappedFile& file) : Checkpoint(file, ZipArchive(file)) {}

Checkpoint::Checkpoint(const MappedFile& file, ZipArchive zip) : file_(file), zip_(std::move(zip)) {
  TorchZip located = locate_torch_zip(zip_);
  archive_name_ = std::move(located.archive_name);
  pickle_record_ = located.pickle;
  // A flipped byte in the pickle is told as what it is, before what it would
  // decode to is compared with the other files (cheap next to decoding it).
  if (std::uint32_t crc = crc32(zip_.data(*pickle_record_)); crc != pickle_record_->crc32) {
    throw Error(ErrorKind::CorruptData, Location{path(), pickle_record_->name, pickle_record_->data_offset},
                fmt::format("CRC-32 of the pickle is 0x{:08x}, the zip directory says 0x{:08x} (corrupted data)", crc,
                            pickle_record_->crc32));
  }
  graph_ = std::make_shared<const pickle::Graph>(
      pickle::decode(zip_.data(*pickle_record_), path(), pickle_record_->name, pickle_record_->data_offset));
  collect_storages();
  collect_tensors();
}

Checkpoint::Checkpoint(const MappedFile& file, ZipArchive zip, const Checkpoint& same_pickle)
    : file_(file), zip_(std::move(zip)), graph_(same_pickle.graph_) {
  TorchZip located = locate_torch_zip(zip_);
  archive_name_ = std::move(located.archive_name);
  pickle_record_ = located.pickle;
  Bytes mine = zip_.data(*pickle_record_);
  Bytes theirs = same_pickle.zip_.data(same_pickle.pickle_record());
  check_invariant(std::equal(mine.begin(), mine.end(), theirs.begin(), theirs.end()),
                  "Checkpoint: the pickle bytes differ from those of " + same_pickle.path());
  // The pickle's checks hold as they did for `same_pickle`; the records are this file's.
  for (const auto& [key, storage] : same_pickle.storages_) {
    StorageRef bound = storage;
    bound.record = &storage_record(zip_, archive_name_, key, storage.dtype, storage.numel);
    storages_.emplace(key, std::move(bound));
  }
  tensors_ = same_pickle.tensors_;
  nodes_ = same_pickle.nodes_;
  fill_places();
}

void Checkpoint::collect_storages() {
  for (NodeId id = 0; id < graph().size(); ++id) {
    if (graph()[id].kind != Kind::PersId) continue;
    std::optional<StorageId> sid;
    try {
      sid = parse_storage_id(graph(), id);
    } catch (const Error& e) {
      throw Error(e.kind(), Location{path(), pickle_record_->name, std::nullopt}, e.message());
    }
    if (!sid) {
      throw Error(Location{path(), pickle_record_->name, std::nullopt},
                  "persistent id that is not a torch storage ('storage', type, key, location, numel)");
    }
    const ZipRecord& record = storage_record(zip_, archive_name_, sid->key, sid->dtype, sid->numel);
    auto [it, inserted] = storages_.try_emplace(sid->key);
    if (!inserted) {
      if (it->second.dtype != sid->dtype || it->second.numel != sid->numel) {
        throw Error(Location{path(), record.name, std::nullopt}, "storage referenced with two different types");
      }
      continue;
    }
    it->second = StorageRef{sid->dtype, sid->numel, sid->location, &record};
  }
}

namespace {

// Puts `values[order[k]]` at position k, in place (following the cycles of `order`).
template <typename T>
void permute(std::vector<T>& values, std::vector<std::size_t> order) {
  for (std::size_t start = 0; start < order.size(); ++start) {
    if (order[start] == start) continue;
    T held = std::move(values[start]);
    std::size_t at = start;
    while (order[at] != start) {
      std::size_t next = order[at];
      values[at] = std::move(values[next]);
      order[at] = at;
      at = next;
    }
    values[at] = std::move(held);
    order[at] = at;
  }
}

}  // namespace

void Checkpoint::collect_tensors() {
  // Tensors are listed in the order a depth-first walk meets their paths (the
  // order of the dicts that hold them), ties included.
  std::unordered_map<NodeId, std::pair<std::size_t, std::string>> paths;
  std::vector<std::tuple<NodeId, std::size_t, std::string>> repeats;
  std::unordered_map<NodeId, NodeId> wrappers;                // tensor -> the nn.Parameter that wraps it
  std::optional<std::pair<std::string, std::string>> sparse;  // the first sparse tensor's path and layout
  std::size_t order = 0;
  try {
    walk_paths(
        graph(), graph().root, "",
        [&](NodeId id, const std::string& p) {
          ++order;
          if (is_rebuild_tensor(graph(), id)) paths.emplace(id, std::make_pair(order, p));
          if (parameter_wrap(graph(), id) != TensorWrap::Tensor) {
            const auto& args = graph()[graph()[id].args].items;
            if (!args.empty() && is_rebuild_tensor(graph(), args[0])) wrappers.emplace(args[0], id);
          }
          if (!sparse) {
            if (std::optional<std::string> layout = sparse_layout(graph(), id)) sparse.emplace(p, *layout);
          }
        },
        [&](NodeId id, const std::string& p) {
          ++order;
          if (is_rebuild_tensor(graph(), id) || is_tensor_wrapper(graph(), id)) repeats.emplace_back(id, order, p);
        });
  } catch (const Error& e) {  // objects nested too deeply
    throw Error(e.kind(), Location{path(), pickle_record_->name, std::nullopt}, e.message());
  }
  // Its indices and values would pass for strided tensors at other paths.
  if (sparse) {
    throw Error(Location{path(), pickle_record_->name + " (" + sparse->first + ")", std::nullopt},
                fmt::format("a sparse tensor ({}): sparse layouts are not supported, only strided tensors "
                            "(tensor.to_dense() before torch.save)",
                            sparse->second));
  }
  std::vector<StoredTensor> tensors;
  std::vector<TensorNodes> nodes;
  std::vector<std::size_t> rank;                   // per tensor: the order of its path in the walk
  tensors.reserve(paths.size() + repeats.size());  // unless some are unreachable
  nodes.reserve(paths.size() + repeats.size());
  rank.reserve(paths.size() + repeats.size());
  for (NodeId id = 0; id < graph().size(); ++id) {
    if (!is_rebuild_tensor(graph(), id)) continue;
    StoredTensor tensor;
    TensorNodes tensor_nodes{id, pickle::kNoNode};
    auto found = paths.find(id);
    tensor.path = found != paths.end() ? found->second.second : fmt::format("<unreachable #{}>", id);
    auto bad = [&](const std::string& message, ErrorKind kind = ErrorKind::BadInput) {
      return Error(kind, Location{path(), pickle_record_->name + " (" + tensor.path + ")", std::nullopt}, message);
    };
    rank.push_back(found != paths.end() ? found->second.first : SIZE_MAX);
    const auto& args = graph()[graph()[id].args].items;
    if (args.size() < 4) throw bad("_rebuild_tensor_v2 with fewer than 4 arguments");
    auto sid = parse_storage_id(graph(), args[0]);
    auto offset = as_int(graph(), args[1]);
    auto shape = as_int_list(graph(), args[2]);
    auto stride = as_int_list(graph(), args[3]);
    if (!sid || !offset || !shape || !stride)
      throw bad("_rebuild_tensor_v2 arguments are not (storage, int, size, stride)");
    if (*offset < 0) throw bad("negative storage offset");
    const StorageRef& storage = storages_.at(sid->key);
    std::uint64_t itemsize = dtype_info(storage.dtype).itemsize;
    ViewExtent extent;
    std::uint64_t last = 0;  // the storage element holding the view's last element
    try {
      extent = view_extent(*shape, *stride, itemsize);
      if (extent.span_elements > 0) {
        last = checked_add(static_cast<std::uint64_t>(*offset), extent.span_elements - 1, "tensor span");
      }
    } catch (const Error& e) {
      throw bad(e.message(), e.kind());
    }
    tensor.storage_key = sid->key;
    tensor.dtype = sid->dtype;
    tensor.shape = *shape;
    tensor.stride = *stride;
    tensor.storage_offset = *offset;
    tensor.requires_grad = args.size() > 4 && graph()[args[4]].kind == Kind::Bool && graph()[args[4]].boolean;
    if (auto wrapper = wrappers.find(id); wrapper != wrappers.end()) {
      // _rebuild_parameter(data, requires_grad, backward_hooks[, state]): the parameter's flag is what torch sees.
      const auto& wrapper_args = graph()[graph()[wrapper->second].args].items;
      tensor_nodes.wrapper = wrapper->second;
      tensor.wrap = parameter_wrap(graph(), wrapper->second);
      tensor.requires_grad =
          wrapper_args.size() > 1 && graph()[wrapper_args[1]].kind == Kind::Bool && graph()[wrapper_args[1]].boolean;
    }
    if (extent.span_elements > 0 && last >= storage.numel) {
      throw Error(Location{path(), storage.record->name + " (" + tensor.path + ")", storage.record->data_offset},
                  fmt::format("tensor reaches element {} of a storage of {} elements", last, storage.numel));
    }
    tensor.nbytes = extent.span_elements * itemsize;
    tensor.storage_nbytes = storage.numel * itemsize;  // storage_record checked the record holds it
    tensors.push_back(std::move(tensor));
    nodes.push_back(tensor_nodes);
  }
  // Tied weights: the same tensor object under a second path.
  std::unordered_map<NodeId, std::size_t> by_node;
  for (std::size_t i = 0; i < tensors.size(); ++i) by_node.emplace(nodes[i].node, i);
  for (const auto& [id, position, alias_path] : repeats) {
    NodeId tensor_node = id;
    // nn.Parameter wraps its tensor: an alias of the wrapper is an alias of the tensor.
    if (by_node.count(tensor_node) == 0 && is_tensor_wrapper(graph(), tensor_node)) {
      const auto& args = graph()[graph()[tensor_node].args].items;
      if (!args.empty()) tensor_node = args[0];
    }
    auto it = by_node.find(tensor_node);
    if (it == by_node.end()) continue;
    StoredTensor alias = tensors[it->second];
    alias.alias_of = alias.path;
    alias.path = alias_path;
    rank.push_back(position);
    tensors.push_back(std::move(alias));
    nodes.push_back(nodes[it->second]);
  }
  // Sorted by rank through an index: looking a path up per comparison cost
  // more than the rest of reading a file of 200,000 tensors.
  std::vector<std::size_t> by_rank(tensors.size());
  std::iota(by_rank.begin(), by_rank.end(), 0);
  std::stable_sort(by_rank.begin(), by_rank.end(), [&](std::size_t a, std::size_t b) { return rank[a] < rank[b]; });
  permute(tensors, by_rank);
  permute(nodes, by_rank);
  tensors_ = TensorList(std::move(tensors));
  nodes_ = std::move(nodes);
  fill_places();
  // A path names one tensor (in the manifest, in state dicts, in a diff of two
  // files): a tensor at a path cut at its bound has no name.
  std::unordered_set<std::string_view> seen;
  for (const StoredTensor& tensor : tensors_) {
    if (tensor.path.ends_with(kCutPathLabel) || !seen.insert(tensor.path).second) {
      throw Error(Location{path(), pickle_record_->name + " (" + tensor.path + ")", std::nullopt},
                  "a tensor whose object path is longer than 1024 bytes (keys too long or nested too deep)");
    }
  }
}

const StoredTensor* Checkpoint::find_tensor(std::string_view tensor_path) const {
  std::optional<std::size_t> index = tensors_.find(tensor_path);
  return index ? &tensors_[*index] : nullptr;
}

TensorPlace place_in(const StoredTensor& tensor, const ZipRecord& storage_record) {
  // The tensor's dtype is its storage's (collect_tensors).
  return {storage_record.data_offset +
              static_cast<std::uint64_t>(tensor.storage_offset) * dtype_info(tensor.dtype).itemsize,
          storage_record.crc32};
}

void Checkpoint::fill_places() {
  places_.clear();
  places_.reserve(tensors_.size());
  for (const StoredTensor& tensor : tensors_)
    places_.push_back(place_in(tensor, *storages_.at(tensor.storage_key).record));
}

}  // namespace ckpt
