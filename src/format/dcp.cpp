// DCP `.metadata`: the pickle decoded as data, then read as the classes of
// include/ckpt/format/dcp.hpp describe.
#include "ckpt/format/dcp.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <map>
#include <set>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/format/pyobject.hpp"
#include "ckpt/format/python_globals.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/mapped_file.hpp"

namespace ckpt {

namespace {

using pickle::Graph;
using pickle::Kind;
using pickle::NodeId;
using pickle::NodeView;

constexpr std::string_view kDcpModule = "torch.distributed.";

// Reads one `.metadata` graph; every failure names the file and where in it.
class MetadataReader {
 public:
  MetadataReader(const Graph& graph, const std::string& path) : graph_(graph), path_(path) {}

  DcpMetadata read() {
    DcpMetadata out;
    const NodeId root = graph_.root;
    out.metadata_class = class_name(graph_, root);
    if (dcp_class(root) != "Metadata") {
      fail("", fmt::format("not a DCP Metadata pickle (its root is {})",
                           out.metadata_class.empty() ? "not an object" : out.metadata_class));
    }
    const NodeId items = attribute(root, "state_dict_metadata", "");
    const NodeId storage = attribute(root, "storage_data", "");
    read_storage_data(storage);
    if (!graph_.is_mapping(items) || graph_[items].kind != Kind::Dict) fail("state_dict_metadata", "not a dict");
    for (const auto& [key_node, value] : graph_.mapping_entries(items)) {
      std::optional<std::string> key = as_str(graph_, key_node);
      if (!key) fail("state_dict_metadata", "a key that is not a str");
      std::string_view kind = dcp_class(value);
      if (kind == "TensorStorageMetadata") {
        out.tensors.push_back(read_tensor(*key, value));
        out.tensors.back().position = out.tensors.size() + out.objects.size() - 1;
      } else if (kind == "BytesStorageMetadata") {
        out.objects.push_back(
            {*key, place_of(*key, std::nullopt, std::nullopt), out.tensors.size() + out.objects.size()});
      } else {
        fail(*key, fmt::format("an item of class {} (neither TensorStorageMetadata nor BytesStorageMetadata)",
                               class_name(graph_, value).empty() ? "none" : class_name(graph_, value)));
      }
    }
    if (NodeId planner = optional_attribute(root, "planner_data"); planner != pickle::kNoNode) {
      read_planner_data(planner, out);
    }
    if (NodeId version = optional_attribute(root, "version"); version != pickle::kNoNode) {
      out.version = as_str(graph_, version);
    }
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& where, const std::string& message) const {
    throw Error(Location{path_, where.empty() ? std::string("Metadata") : where, std::nullopt}, message);
  }

  // The class name of object `id` when its class is in torch.distributed.
  std::string_view dcp_class(NodeId id) const {
    std::optional<NodeView> cls = graph_.object_class(id);
    if (!cls || !cls->text.starts_with(kDcpModule)) return {};
    return cls->name;
  }

  // Attribute `name` of a dataclass object: its BUILD state is the instance
  // dict, or (slots) a (dict or None, slots dict) pair. kNoNode when absent.
  NodeId optional_attribute(NodeId object, std::string_view name) const {
    if (object >= graph_.size() || graph_[object].kind != Kind::Object) return pickle::kNoNode;
    NodeId state = graph_[object].state;
    if (state == pickle::kNoNode) return pickle::kNoNode;
    if (graph_[state].kind == Kind::Dict) return graph_.lookup(state, name);
    if (graph_[state].kind == Kind::Tuple && graph_[state].items.size() == 2) {
      for (NodeId part : graph_[state].items) {
        if (graph_[part].kind == Kind::Dict) {
          if (NodeId found = graph_.lookup(part, name); found != pickle::kNoNode) return found;
        }
      }
    }
    return pickle::kNoNode;
  }
  NodeId attribute(NodeId object, std::string_view name, const std::string& where) const {
    NodeId found = optional_attribute(object, name);
    if (found == pickle::kNoNode) {
      std::string named = class_name(graph_, object);
      fail(where, fmt::format("{} without {}", named.empty() ? "a value that is no object" : named, name));
    }
    return found;
  }

  std::vector<std::int64_t> size_of(NodeId id, const std::string& where, std::string_view what) const {
    std::optional<std::vector<std::int64_t>> values = as_int_list(graph_, id);
    if (!values) fail(where, fmt::format("{} is not a torch.Size or a tuple of ints", what));
    for (std::int64_t value : *values) {
      if (value < 0) fail(where, fmt::format("{} {} has a negative entry", what, fmt::join(*values, ", ")));
    }
    return *values;
  }

  // (dtype, layout, requires_grad, ...): a tuple (torch >= 2.0 and 1.13's
  // __getstate__) or a dict of those names.
  void read_properties(NodeId properties, DcpTensor& tensor) const {
    const std::string& where = tensor.key;
    NodeId dtype = pickle::kNoNode;
    NodeId layout = pickle::kNoNode;
    NodeId requires_grad = pickle::kNoNode;
    NodeId state = properties < graph_.size() && graph_[properties].kind == Kind::Object ? graph_[properties].state
                                                                                         : pickle::kNoNode;
    if (state != pickle::kNoNode && graph_[state].kind == Kind::Tuple && graph_[state].items.size() >= 3) {
      dtype = graph_[state].items[0];
      layout = graph_[state].items[1];
      requires_grad = graph_[state].items[2];
    } else {
      dtype = attribute(properties, "dtype", where);
      layout = optional_attribute(properties, "layout");
      requires_grad = optional_attribute(properties, "requires_grad");
    }
    const NodeView dtype_node = graph_[dtype];
    std::optional<DType> parsed;
    if (dtype_node.kind == Kind::Global && dtype_node.text == "torch") parsed = dtype_from_name(dtype_node.name);
    if (!parsed) {
      fail(where, fmt::format("dtype {} is not a torch dtype ckpt-tool knows",
                              dtype_node.kind == Kind::Global ? fmt::format("{}.{}", dtype_node.text, dtype_node.name)
                                                              : "(not a global)"));
    }
    tensor.dtype = *parsed;
    if (layout != pickle::kNoNode && !is_strided(layout)) {
      fail(where, "a layout other than torch.strided (sparse tensors are not supported)");
    }
    tensor.requires_grad =
        requires_grad != pickle::kNoNode && graph_[requires_grad].kind == Kind::Bool && graph_[requires_grad].boolean;
  }

  // torch.strided: the global, or torch.serialization._get_layout('torch.strided').
  bool is_strided(NodeId layout) const {
    const NodeView node = graph_[layout];
    if (node.kind == Kind::None) return true;  // not recorded
    if (node.kind == Kind::Global) return node.text == "torch" && node.name == "strided";
    std::optional<NodeView> cls = graph_.object_class(layout);
    if (!cls || cls->text != "torch.serialization" || cls->name != "_get_layout") return false;
    const auto& args = graph_[node.args].items;
    return args.size() == 1 && as_str(graph_, args[0]) == "torch.strided";
  }

  DcpTensor read_tensor(const std::string& key, NodeId meta) {
    DcpTensor tensor;
    tensor.key = key;
    read_properties(attribute(meta, "properties", key), tensor);
    tensor.size = size_of(attribute(meta, "size", key), key, "size");
    auto chunks = as_sequence(graph_, attribute(meta, "chunks", key));
    if (!chunks) fail(key, "chunks is not a list");
    for (std::size_t i = 0; i < chunks->size(); ++i) {
      NodeId chunk = (*chunks)[i];
      const std::string where = fmt::format("{} chunk {}", key, i);
      if (dcp_class(chunk) != "ChunkStorageMetadata") fail(where, "not a ChunkStorageMetadata");
      DcpChunk out;
      out.offsets = size_of(attribute(chunk, "offsets", where), where, "offsets");
      out.sizes = size_of(attribute(chunk, "sizes", where), where, "sizes");
      if (out.offsets.size() != tensor.size.size() || out.sizes.size() != tensor.size.size()) {
        fail(where, fmt::format("a box of {} and {} dimensions in a tensor of {}", out.offsets.size(), out.sizes.size(),
                                tensor.size.size()));
      }
      out.place = place_of(key, out.offsets, i);
      tensor.chunks.push_back(std::move(out));
    }
    return tensor;
  }

  // storage_data: each MetadataIndex (fqn, offset, index) and where its item is.
  void read_storage_data(NodeId storage) {
    if (storage >= graph_.size() || graph_[storage].kind != Kind::Dict) fail("storage_data", "not a dict");
    for (const auto& [index, info] : graph_.mapping_entries(storage)) {
      if (dcp_class(index) != "MetadataIndex") fail("storage_data", "a key that is not a MetadataIndex");
      std::optional<std::string> fqn = as_str(graph_, attribute(index, "fqn", "storage_data"));
      if (!fqn) fail("storage_data", "a MetadataIndex whose fqn is not a str");
      const std::string& where = *fqn;
      std::optional<std::vector<std::int64_t>> offset;
      if (NodeId node = optional_attribute(index, "offset"); node != pickle::kNoNode && graph_[node].kind != Kind::None)
        offset = size_of(node, where, "MetadataIndex offset");
      if (dcp_class(info) != "_StorageInfo") fail(where, "storage_data value that is not a _StorageInfo");
      std::optional<std::string> file = as_str(graph_, attribute(info, "relative_path", where));
      std::optional<std::int64_t> at = as_int(graph_, attribute(info, "offset", where));
      std::optional<std::int64_t> length = as_int(graph_, attribute(info, "length", where));
      if (!file || !at || !length || *at < 0 || *length < 0) {
        fail(where, "a _StorageInfo that is not (relative_path str, offset int >= 0, length int >= 0)");
      }
      if (file->empty() || file->find_first_of(std::string_view("/\0", 2)) != std::string::npos || *file == "." ||
          *file == "..") {
        fail(where, fmt::format("relative_path '{}' is not a file name of the directory", *file));
      }
      // Newer torch can store an item transformed (compressed: "stream.zstd"), its
      // descriptors listed here; a plain item leaves the field out or None.
      if (NodeId transforms = optional_attribute(info, "transform_descriptors");
          transforms != pickle::kNoNode && graph_[transforms].kind != Kind::None && !graph_[transforms].items.empty()) {
        std::vector<std::string> names;
        for (NodeId item : graph_[transforms].items) names.push_back(as_str(graph_, item).value_or("?"));
        fail(where, fmt::format("the item is stored transformed ({}): ckpt-tool reads plain torch.save items only; "
                                "load and save the checkpoint without the transform first",
                                fmt::join(names, ", ")));
      }
      DcpItemPlace place{*file, static_cast<std::uint64_t>(*at), static_cast<std::uint64_t>(*length)};
      if (!places_.emplace(std::make_pair(*fqn, offset), place).second) {
        fail(where, "storage_data places one item twice");
      }
    }
  }

  DcpItemPlace place_of(const std::string& key, const std::optional<std::vector<std::int64_t>>& offsets,
                        std::optional<std::size_t> chunk) const {
    auto it = places_.find({key, offsets});
    if (it == places_.end()) {
      fail(chunk ? fmt::format("{} chunk {}", key, *chunk) : key,
           fmt::format("storage_data does not say where {} is",
                       offsets ? fmt::format("the box at ({})", fmt::join(*offsets, ", ")) : "the item"));
    }
    return it->second;
  }

  void read_planner_data(NodeId planner, DcpMetadata& out) const {
    if (graph_[planner].kind == Kind::None) return;
    if (graph_[planner].kind != Kind::Dict) fail("planner_data", "not a dict");
    for (const auto& [key_node, value] : graph_.mapping_entries(planner)) {
      std::optional<std::string> key = as_str(graph_, key_node);
      auto elements = as_sequence(graph_, value);
      if (!key || !elements) fail("planner_data", "an entry that is not a str key and a tuple of path elements");
      std::vector<DcpPathElement> path;
      for (NodeId element : *elements) {
        if (std::optional<std::string> text = as_str(graph_, element)) {
          path.emplace_back(*text);
        } else if (std::optional<std::int64_t> number = as_int(graph_, element); number && *number >= 0) {
          path.emplace_back(*number);
        } else {
          fail(*key, "planner_data: a path element that is neither a str nor an int >= 0");
        }
      }
      out.planner_data.emplace_back(*key, std::move(path));
    }
  }

  const Graph& graph_;
  const std::string& path_;
  std::map<std::pair<std::string, std::optional<std::vector<std::int64_t>>>, DcpItemPlace> places_;
};

}  // namespace

DcpMetadata read_dcp_metadata(Bytes bytes, const std::string& path) {
  // pickle.dump (protocol 2 and later: every Python 3 default) starts with PROTO.
  if (bytes.empty() || bytes[0] != std::byte{0x80}) {
    throw Error(Location{path, "", 0}, "not a DCP Metadata pickle: it does not start as pickle.dump's output does");
  }
  Graph graph = pickle::decode(bytes, path, "", 0);
  return MetadataReader(graph, path).read();
}

DcpMetadata read_dcp_metadata_file(const std::string& path) {
  MappedFile mapped(path);
  std::vector<std::byte> bytes(mapped.size());
  mapped.read_at(0, bytes.data(), bytes.size());
  return read_dcp_metadata(bytes, path);
}

std::vector<std::string> dcp_data_files(const DcpMetadata& metadata) {
  std::set<std::string> names;
  for (const DcpTensor& tensor : metadata.tensors) {
    for (const DcpChunk& chunk : tensor.chunks) names.insert(chunk.place.file);
  }
  for (const DcpObject& object : metadata.objects) names.insert(object.place.file);
  return {names.begin(), names.end()};
}

namespace {

DcpTensorItem read_item(Bytes item, const std::string& file_path, const DcpTensor& tensor, std::size_t chunk,
                        const DcpItemPlace& place) {
  const std::string where = fmt::format("{} chunk {}", tensor.key, chunk);
  ZipArchive zip(item, file_path);
  TorchZip located = locate_torch_zip(zip);
  Bytes pickle_bytes = zip.data(*located.pickle);
  pickle::Graph graph = pickle::decode(pickle_bytes, file_path, where, place.offset + located.pickle->data_offset);
  auto fail = [&](const std::string& message) -> Error {
    return Error(Location{file_path, where, place.offset}, message);
  };
  std::optional<NodeView> cls = graph.object_class(graph.root);
  if (!cls || !is_global(*cls, py::kRebuildTensorV2)) throw fail("the item is not one torch.save'd tensor");
  const auto& args = graph[graph[graph.root].args].items;
  if (args.size() < 4) throw fail("_rebuild_tensor_v2 with fewer than 4 arguments");
  std::optional<StorageId> storage = parse_storage_id(graph, args[0]);
  std::optional<std::int64_t> offset = as_int(graph, args[1]);
  std::optional<std::vector<std::int64_t>> shape = as_int_list(graph, args[2]);
  std::optional<std::vector<std::int64_t>> stride = as_int_list(graph, args[3]);
  if (!storage || !offset || !shape || !stride || *offset < 0) {
    throw fail("_rebuild_tensor_v2 arguments are not (storage, offset >= 0, size, stride)");
  }
  if (storage->dtype != tensor.dtype) {
    throw fail(fmt::format("a {} item in a {} tensor", dtype_info(storage->dtype).name, dtype_info(tensor.dtype).name));
  }
  if (*shape != tensor.chunks[chunk].sizes) {
    throw fail(fmt::format("the item holds a tensor of shape [{}], the box is [{}]", fmt::join(*shape, ", "),
                           fmt::join(tensor.chunks[chunk].sizes, ", ")));
  }
  const std::uint64_t itemsize = dtype_info(tensor.dtype).itemsize;
  ViewExtent extent;
  try {
    extent = view_extent(*shape, *stride, itemsize);
  } catch (const Error& e) {  // (no location: this item's)
    throw fail(e.message());
  }
  if (extent.span_elements > 0 && (static_cast<std::uint64_t>(*offset) > storage->numel ||
                                   extent.span_elements > storage->numel - static_cast<std::uint64_t>(*offset))) {
    throw fail(fmt::format("the view reaches past its storage of {} elements", storage->numel));
  }
  const ZipRecord& record = storage_record(zip, located.archive_name, storage->key, storage->dtype, storage->numel);
  DcpTensorItem out;
  out.dtype = storage->dtype;
  out.shape = std::move(*shape);
  out.stride = std::move(*stride);
  out.storage_offset = *offset;
  out.storage_offset_in_file = place.offset + record.data_offset;
  out.storage_nbytes = record.nbytes;
  out.record_crc32 = record.crc32;
  return out;
}

}  // namespace

void check_dcp_item_range(std::uint64_t file_size, const std::string& file_path, const std::string& what,
                          const DcpItemPlace& place) {
  if (place.offset > file_size || place.length > file_size - place.offset) {
    throw Error(ErrorKind::IncompleteSet, Location{file_path, what, file_size},
                fmt::format("the item at bytes {}..{} lies past the end of the file ({} bytes): truncated?",
                            place.offset, place.offset + place.length, file_size));
  }
}

void check_dcp_item_start(Bytes item, const std::string& file_path, const std::string& what,
                          const DcpItemPlace& place) {
  constexpr std::array<std::byte, 4> kZipStart{std::byte{'P'}, std::byte{'K'}, std::byte{3}, std::byte{4}};
  if (item.size() >= kZipStart.size() && std::equal(kZipStart.begin(), kZipStart.end(), item.begin())) return;
  throw Error(Location{file_path, what, place.offset},
              "the item is not a torch.save archive (no zip header at its first byte): a DCP item written in "
              "another serialization (safetensors) or a range that does not start an item");
}

Error dcp_item_error(const Error& error, const std::string& file_path, const std::string& what,
                     const DcpItemPlace& place) {
  if (error.where().member == what) return error;  // located already, at a file offset
  // The archive's own reader names offsets within the item: make them the file's.
  Location where{file_path, error.where().member.empty() ? what : what + ": " + error.where().member, std::nullopt};
  if (error.where().byte_offset) where.byte_offset = place.offset + *error.where().byte_offset;
  return Error(error.kind(), where, error.message());
}

DcpTensorItem read_dcp_tensor_item(Bytes file_bytes, const std::string& file_path, const DcpTensor& tensor,
                                   std::size_t chunk) {
  check_invariant(chunk < tensor.chunks.size(), "read_dcp_tensor_item: no such chunk");
  const DcpItemPlace& place = tensor.chunks[chunk].place;
  return read_dcp_item(file_bytes, file_path, fmt::format("{} chunk {}", tensor.key, chunk), place,
                       [&](Bytes item) { return read_item(item, file_path, tensor, chunk, place); });
}

namespace {

// Building the .metadata pickle: torch 2.x's classes, pickled as CPython
// pickles dataclasses (NEWOBJ of the class, BUILD with the instance dict).
class MetadataWriter {
 public:
  std::vector<std::byte> encode(const DcpMetadata& metadata) {
    // state_dict_metadata in position order, tensors and objects interleaved
    std::vector<std::pair<std::size_t, std::size_t>> items;  // position, index in entries_
    std::vector<pickle::Entry> storage;
    for (const DcpTensor& tensor : metadata.tensors) {
      NodeId chunks = graph_.add_items(Kind::List, {});
      for (const DcpChunk& chunk : tensor.chunks) {
        graph_.append_item(chunks, object("ChunkStorageMetadata", {{"offsets", add_torch_size(graph_, chunk.offsets)},
                                                                   {"sizes", add_torch_size(graph_, chunk.sizes)}}));
        storage.emplace_back(index(tensor.key, add_torch_size(graph_, chunk.offsets)), place(chunk.place));
      }
      NodeId value = object(
          "TensorStorageMetadata",
          {{"properties", properties(tensor)}, {"size", add_torch_size(graph_, tensor.size)}, {"chunks", chunks}});
      items.emplace_back(tensor.position, entry_of(tensor.key, value));
    }
    for (const DcpObject& item : metadata.objects) {
      items.emplace_back(item.position, entry_of(item.key, object("BytesStorageMetadata", {})));
      storage.emplace_back(index(item.key, graph_.none()), place(item.place));
    }
    std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    pickle::Node state_dict_metadata;
    state_dict_metadata.kind = Kind::Dict;
    for (const auto& [position, key] : items) state_dict_metadata.entries.push_back(entries_.at(key));
    pickle::Node storage_data;
    storage_data.kind = Kind::Dict;
    storage_data.entries = std::move(storage);
    std::vector<std::pair<std::string, NodeId>> fields{{"state_dict_metadata", graph_.add(state_dict_metadata)},
                                                       {"planner_data", planner_data(metadata)},
                                                       {"storage_data", graph_.add(storage_data)}};
    if (metadata.version) fields.emplace_back("version", graph_.str(*metadata.version));
    graph_.root = object("Metadata", fields);
    graph_.protocol = 4;
    return pickle::encode(graph_);
  }

 private:
  static constexpr std::string_view kMetadataModule = "torch.distributed.checkpoint.metadata";

  NodeId object(std::string_view cls, const std::vector<std::pair<std::string, NodeId>>& fields,
                std::string_view module = kMetadataModule) {
    pickle::Node node;
    node.kind = Kind::Object;
    node.op = pickle::ObjectOp::NewObj;
    node.callable = graph_.global(module, cls);
    node.args = graph_.empty_tuple();
    pickle::Node state;
    state.kind = Kind::Dict;
    for (const auto& [name, value] : fields) state.entries.emplace_back(graph_.constant_str(name), value);
    node.state = graph_.add(state);
    return graph_.add(node);
  }

  // (dtype, layout, requires_grad, memory format, pin_memory): TensorProperties.__getstate__.
  NodeId properties(const DcpTensor& tensor) {
    pickle::Node format;
    format.kind = Kind::Object;
    format.callable = graph_.global(kMetadataModule, "_MEM_FORMAT_ENCODING");
    format.args = graph_.tuple({graph_.integer(0)});  // TORCH_CONTIGUOUS_FORMAT
    pickle::Node node;
    node.kind = Kind::Object;
    node.op = pickle::ObjectOp::NewObj;
    node.callable = graph_.global(kMetadataModule, "TensorProperties");
    node.args = graph_.empty_tuple();
    node.state = graph_.tuple({graph_.global("torch", dtype_info(tensor.dtype).name), graph_.global("torch", "strided"),
                               graph_.boolean(tensor.requires_grad), graph_.add(format), graph_.boolean(false)});
    return graph_.add(node);
  }

  NodeId index(const std::string& key, NodeId offset) {
    return object("MetadataIndex", {{"fqn", graph_.str(key)}, {"offset", offset}, {"index", graph_.none()}});
  }

  NodeId place(const DcpItemPlace& place) {
    return object("_StorageInfo",
                  {{"relative_path", graph_.str(place.file)},
                   {"offset", graph_.integer(static_cast<std::int64_t>(place.offset))},
                   {"length", graph_.integer(static_cast<std::int64_t>(place.length))}},
                  "torch.distributed.checkpoint.filesystem");
  }

  NodeId planner_data(const DcpMetadata& metadata) {
    pickle::Node dict;
    dict.kind = Kind::Dict;
    for (const auto& [key, path] : metadata.planner_data) {
      std::vector<NodeId> elements;
      for (const DcpPathElement& element : path) {
        const auto* text = std::get_if<std::string>(&element);
        elements.push_back(text != nullptr ? graph_.str(*text) : graph_.integer(std::get<std::int64_t>(element)));
      }
      dict.entries.emplace_back(graph_.str(key), graph_.tuple(elements));
    }
    return graph_.add(dict);
  }

  std::size_t entry_of(const std::string& key, NodeId value) {
    entries_.emplace_back(graph_.str(key), value);
    return entries_.size() - 1;
  }

  Graph graph_;
  std::vector<pickle::Entry> entries_;  // state_dict_metadata's, as made
};

}  // namespace

std::vector<std::byte> encode_dcp_metadata(const DcpMetadata& metadata) {
  return MetadataWriter().encode(metadata);
}

}  // namespace ckpt
