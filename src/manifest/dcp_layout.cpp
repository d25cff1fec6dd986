// The DCP input layout (a PyTorch Distributed Checkpoint directory): its row's
// functions. The set is the directory's `.metadata` and the data files it
// names. `.metadata` is described as its structure (objects: each key's
// dtype, size and boxes, each object item, planner_data), with no tensors; a
// data file as the chunks it holds, each a tensor at path "<key>/<chunk
// index>" whose bytes are its item's storage record. The set check asks that
// every tensor's boxes tile it and that every box's item was read; the state
// dict assembles each tensor from its boxes (layout/boxes.hpp).
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <unordered_map>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/dcp.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/boxes.hpp"
#include "ckpt/manifest/input_layouts.hpp"

namespace ckpt {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

constexpr std::string_view kMetadataName = ".metadata";

bool is_metadata_path(std::string_view path) {
  return fs::path(path).filename() == kMetadataName;
}

std::shared_ptr<const DcpMetadata> read_metadata_file(const std::string& path) {
  return std::make_shared<const DcpMetadata>(read_dcp_metadata_file(path));
}

// Appends `key: value` to a JSON object without looking the key up (ordered_json
// looks each key up in a list: n^2 for the 10^5 keys of a large checkpoint).
// The keys are distinct: they come from one dict.
void append_member(json& object, std::string key, json value) {
  static_cast<json::object_t::Container&>(object.get_ref<json::object_t&>())
      .emplace_back(std::move(key), std::move(value));
}

// A directory's metadata with its chunks by data file, shared by the
// describer among the data files (each finds its own without a scan of all).
struct IndexedMetadata {
  std::shared_ptr<const DcpMetadata> metadata;
  std::map<std::string, std::vector<std::pair<const DcpTensor*, std::size_t>>> chunks_by_file;  // in .metadata's order
  std::map<std::string, std::vector<const DcpObject*>> objects_by_file;
};
std::shared_ptr<const IndexedMetadata> indexed_metadata(const std::string& path) {
  auto out = std::make_shared<IndexedMetadata>();
  out->metadata = read_metadata_file(path);
  for (const DcpTensor& tensor : out->metadata->tensors) {
    for (std::size_t c = 0; c < tensor.chunks.size(); ++c)
      out->chunks_by_file[tensor.chunks[c].place.file].emplace_back(&tensor, c);
  }
  for (const DcpObject& object : out->metadata->objects) out->objects_by_file[object.place.file].push_back(&object);
  return out;
}

std::string chunk_path(const std::string& key, std::size_t chunk) {
  return escape_label(key) + "/" + std::to_string(chunk);
}

json path_json(const std::vector<DcpPathElement>& path) {
  json out = json::array();
  for (const DcpPathElement& element : path) {
    if (const auto* text = std::get_if<std::string>(&element)) {
      out.push_back(*text);
    } else {
      out.push_back(std::get<std::int64_t>(element));
    }
  }
  return out;
}

// The structure of `.metadata`, as its ManifestFile's objects.
json metadata_json(const DcpMetadata& metadata) {
  json tensors = json::object();
  for (const DcpTensor& tensor : metadata.tensors) {
    json chunks = json::array();
    for (const DcpChunk& chunk : tensor.chunks) {
      chunks.push_back({{"offsets", chunk.offsets},
                        {"sizes", chunk.sizes},
                        {"file", chunk.place.file},
                        {"offset", chunk.place.offset},
                        {"length", chunk.place.length}});
    }
    append_member(tensors, tensor.key,
                  {{"dtype", dtype_info(tensor.dtype).name},
                   {"size", tensor.size},
                   {"requires_grad", tensor.requires_grad},
                   {"position", tensor.position},
                   {"chunks", std::move(chunks)}});
  }
  json objects = json::object();
  for (const DcpObject& object : metadata.objects) {
    append_member(objects, object.key,
                  {{"file", object.place.file},
                   {"offset", object.place.offset},
                   {"length", object.place.length},
                   {"position", object.position}});
  }
  json planner = json::object();
  for (const auto& [key, path] : metadata.planner_data) append_member(planner, key, path_json(path));
  json out = {{"$class", metadata.metadata_class}, {"tensors", std::move(tensors)}, {"objects", std::move(objects)}};
  if (!metadata.planner_data.empty()) out["planner_data"] = std::move(planner);
  if (metadata.version) out["version"] = *metadata.version;
  return out;
}

ManifestFile described(const std::string& path, const MappedFile& mapped) {
  ManifestFile file;
  file.path = fs::absolute(path).lexically_normal().string();
  file.format = FileFormat::Dcp;
  file.size_bytes = mapped.size();
  file.mtime_ns = mapped.mtime_ns();
  return file;
}

// `tree` with every {"$tensor": i} made {"$tensor": i + by}.
json shift_tensor_indices(const json& tree, std::size_t by) {
  if (tree.is_array()) {
    json out = json::array();
    for (const json& item : tree) out.push_back(shift_tensor_indices(item, by));
    return out;
  }
  if (!tree.is_object()) return tree;
  json out = json::object();
  for (const auto& [key, value] : tree.items()) {
    append_member(out, key,
                  key == "$tensor" && value.is_number_unsigned() ? json(value.get<std::size_t>() + by)
                                                                 : shift_tensor_indices(value, by));
  }
  return out;
}

// An object item (a torch.save'd object: an int, a dict holding a tensor, ...)
// described as a file of its own would be: its tensors' places are relative
// to the item. Errors name the key and the absolute offset.
ManifestFile describe_object_item(const MappedFile& mapped, const DcpObject& object) {
  return read_dcp_item(mapped.bytes(), mapped.path(), object.key, object.place, [&](Bytes item) {
    Checkpoint checkpoint(mapped, ZipArchive(item, mapped.path()));
    return describe_file(checkpoint);
  });
}

// The .metadata of the directory holding `path` (a data file or the .metadata
// itself), decoded once for all the files the describer describes.
std::shared_ptr<const IndexedMetadata> metadata_beside(FileDescriber& describer, const std::string& path) {
  const std::string metadata_path = (fs::absolute(path).parent_path() / kMetadataName).string();
  return std::static_pointer_cast<const IndexedMetadata>(
      describer.shared_value("dcp:" + metadata_path, [&] { return indexed_metadata(metadata_path); }));
}

// A data file: the chunks whose items it holds, in .metadata's order.
ManifestFile describe_data_file(FileDescriber& describer, const std::string& path) {
  std::shared_ptr<const IndexedMetadata> indexed = metadata_beside(describer, path);
  MappedFile mapped(path);
  ManifestFile file = described(path, mapped);
  const std::string name = fs::path(path).filename().string();
  std::vector<StoredTensor> tensors;
  json chunks = json::object();
  static const std::vector<std::pair<const DcpTensor*, std::size_t>> kNoChunks;
  static const std::vector<const DcpObject*> kNoObjects;
  auto chunks_here = indexed->chunks_by_file.find(name);
  auto objects_here = indexed->objects_by_file.find(name);
  for (const auto& [tensor_of, c] : chunks_here == indexed->chunks_by_file.end() ? kNoChunks : chunks_here->second) {
    const DcpTensor& tensor = *tensor_of;
    DcpTensorItem item = read_dcp_tensor_item(mapped.bytes(), path, tensor, c);
    StoredTensor stored;
    stored.path = chunk_path(tensor.key, c);
    stored.dtype = item.dtype;
    stored.shape = item.shape;
    stored.stride = item.stride;
    stored.storage_key = std::to_string(tensor.chunks[c].place.offset);  // one storage per item
    stored.storage_offset = item.storage_offset;
    stored.nbytes = view_extent(item.shape, item.stride, dtype_info(item.dtype).itemsize).span_elements *
                    dtype_info(item.dtype).itemsize;
    stored.storage_nbytes = item.storage_nbytes;
    stored.requires_grad = tensor.requires_grad;
    append_member(chunks, chunk_path(tensor.key, c), {{"$tensor", tensors.size()}});
    file.places.push_back({item.storage_offset_in_file +
                               static_cast<std::uint64_t>(item.storage_offset) * dtype_info(item.dtype).itemsize,
                           item.record_crc32});
    tensors.push_back(std::move(stored));
  }
  json objects = json::object();
  for (const DcpObject* object : objects_here == indexed->objects_by_file.end() ? kNoObjects : objects_here->second) {
    const std::size_t first = tensors.size();
    ManifestFile item = describe_object_item(mapped, *object);
    for (std::size_t i = 0; i < item.tensors.size(); ++i) {
      StoredTensor inner = item.tensors[i];
      inner.path = escape_label(object->key) + (inner.path.empty() ? "" : "/" + inner.path);
      if (inner.alias_of)
        inner.alias_of = escape_label(object->key) + (inner.alias_of->empty() ? "" : "/" + *inner.alias_of);
      file.places.push_back({item.places[i].file_byte_offset + object->place.offset, item.places[i].record_crc32});
      tensors.push_back(std::move(inner));
    }
    append_member(objects, object->key, shift_tensor_indices(*item.objects, first));
  }
  file.tensors = TensorList(std::move(tensors));
  file.objects = json{{"chunks", std::move(chunks)}, {"objects", std::move(objects)}};
  return file;
}

// The .metadata among a set's files, and its structure (as describe put it).
const ManifestFile* metadata_of(const std::vector<ManifestFile>& files) {
  for (const ManifestFile& file : files) {
    if (is_metadata_path(file.path)) return &file;
  }
  return nullptr;
}

std::vector<Box> boxes_of(const json& tensor) {
  std::vector<Box> boxes;
  for (const json& chunk : tensor["chunks"]) {
    boxes.push_back(
        {chunk["offsets"].get<std::vector<std::int64_t>>(), chunk["sizes"].get<std::vector<std::int64_t>>()});
  }
  return boxes;
}

// A tensor's name in the state dict: "model/<flat key>", as a safetensors
// file's tensors are named, so that diff compares it with one. (The nesting
// planner_data gives is the torch.save output's, not the name's.)
std::string state_dict_name(const std::string& key) {
  return state_dict_path(kModelPrefix, key);
}

// Why a data file .metadata names is not among the set's files: missing, or
// not given (or not read: its own error is reported first).
std::string absent_or_not_given(const fs::path& path) {
  std::error_code ec;
  return fs::exists(fs::symlink_status(path, ec)) ? "is not in the set (or could not be read)" : "is missing";
}

}  // namespace

bool claims_dcp(std::string_view path) {
  // A data file may be named anything its .metadata names (a.pt, b.safetensors):
  // a file beside a .metadata is one.
  std::error_code ec;
  return is_metadata_path(path) || path.ends_with(".distcp") ||
         fs::is_regular_file(fs::path(path).parent_path() / kMetadataName, ec);
}

std::optional<std::vector<std::string>> dcp_files_in(const std::string& input) {
  std::error_code ec;
  fs::path metadata_path = is_metadata_path(input) ? fs::path(input) : fs::path(input) / kMetadataName;
  if (!fs::is_regular_file(metadata_path, ec)) return std::nullopt;
  std::vector<std::string> files{metadata_path.string()};
  for (const std::string& name : dcp_data_files(read_dcp_metadata_file(metadata_path.string()))) {
    // A missing data file is left for the set check to name, as a missing shard is.
    fs::path path = metadata_path.parent_path() / name;
    if (fs::exists(fs::symlink_status(path, ec)) || fs::exists(path, ec)) files.push_back(path.string());
  }
  return files;
}

ManifestFile describe_dcp_file(FileDescriber& describer, const std::string& path) {
  if (!is_metadata_path(path)) return describe_data_file(describer, path);
  std::shared_ptr<const IndexedMetadata> indexed = metadata_beside(describer, path);
  MappedFile mapped(path);
  ManifestFile file = described(path, mapped);
  file.objects = metadata_json(*indexed->metadata);
  return file;
}

std::vector<ZipRecord> dcp_crc_records(const MappedFile& file, FileDescriber& describer) {
  // A data file: each chunk's storage record (.metadata has no checksum).
  ManifestFile described = describer.describe(file.path());
  std::vector<ZipRecord> records;
  for (std::size_t i = 0; i < described.tensors.size(); ++i) {
    const StoredTensor& tensor = described.tensors[i];
    ZipRecord record;
    record.name = tensor.path;
    record.data_offset = described.storage_start(i);
    record.header_offset = record.data_offset;
    record.nbytes = tensor.storage_nbytes;
    record.crc32 = described.places[i].record_crc32;
    records.push_back(std::move(record));
  }
  return records;
}

std::vector<std::string> dcp_summary(const Manifest& manifest) {
  const ManifestFile* metadata = metadata_of(manifest.files);
  if (metadata == nullptr) return {};
  const json& structure = *metadata->objects;
  std::vector<std::string> lines;
  std::string written = structure.value("$class", "");
  bool torch2 = written.starts_with("torch.distributed.checkpoint.");
  lines.push_back(fmt::format(
      "DCP directory {} ({}{}: {})", fs::path(metadata->path).parent_path().string(),
      torch2 ? "torch 2.x" : "torch 1.13's layout",
      structure.contains("version") ? ", version " + structure["version"].get<std::string>() : "", written));
  std::set<std::string> ranks;
  std::size_t data_files = 0;
  for (const ManifestFile& file : manifest.files) {
    if (&file == metadata) continue;
    ++data_files;
    std::string name = fs::path(file.path).filename().string();  // __{rank}_{n}.distcp
    if (name.starts_with("__") && name.find('_', 2) != std::string::npos)
      ranks.insert(name.substr(2, name.find('_', 2) - 2));
  }
  std::size_t chunks = 0;
  std::size_t most = 0;
  std::size_t empty = 0;
  for (const auto& [key, tensor] : structure["tensors"].items()) {
    chunks += tensor["chunks"].size();
    most = std::max(most, tensor["chunks"].size());
    for (const Box& box : boxes_of(tensor)) {
      empty += std::any_of(box.sizes.begin(), box.sizes.end(), [](std::int64_t s) { return s == 0; });
    }
  }
  lines.push_back(fmt::format("{} data file(s) from {} rank(s){}", data_files, ranks.size(),
                              data_files == ranks.size() ? ", one per rank" : ""));
  lines.push_back(fmt::format("{} tensor(s) in {} chunk(s) (at most {} per tensor{}), {} object item(s){}",
                              structure["tensors"].size(), chunks, most,
                              empty > 0 ? fmt::format(", {} empty", empty) : "", structure["objects"].size(),
                              structure.contains("planner_data") ? ", planner_data nesting the keys" : ""));
  // The object items' values, as the data files' descriptions render them.
  constexpr std::size_t kShownObjects = 12;
  constexpr std::size_t kShownChars = 100;
  std::size_t shown = 0;
  for (const ManifestFile& file : manifest.files) {
    if (&file == metadata || !file.objects->contains("objects")) continue;
    for (const auto& [key, value] : (*file.objects)["objects"].items()) {
      if (shown++ == kShownObjects) {
        lines.push_back("...");
        return lines;
      }
      std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
      if (text.size() > kShownChars) text = text.substr(0, kShownChars - 3) + "...";
      lines.push_back(fmt::format("object {} = {}", key, text));
    }
  }
  return lines;
}

json dcp_object_items(const Manifest& manifest) {
  json out = json::object();
  const ManifestFile* metadata = metadata_of(manifest.files);
  for (const ManifestFile& file : manifest.files) {
    if (&file == metadata || !file.objects->contains("objects")) continue;
    for (const auto& [key, value] : (*file.objects)["objects"].items()) append_member(out, key, value);
  }
  return out;
}

Grid check_dcp_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> /*model_parts*/) {
  Grid grid;
  const ManifestFile* metadata = metadata_of(files);
  if (metadata == nullptr) {
    grid.problems.push_back(fmt::format("{}: a DCP data file without its directory's .metadata", files.front().path));
    return grid;
  }
  const fs::path directory = fs::path(metadata->path).parent_path();
  std::map<std::string, const ManifestFile*> by_name;  // the data files, by name
  for (const ManifestFile& file : files) {
    if (&file == metadata) continue;
    if (fs::path(file.path).parent_path() != directory) {
      grid.problems.push_back(fmt::format("{}: not a file of the DCP directory {}", file.path, directory.string()));
      continue;
    }
    by_name[fs::path(file.path).filename().string()] = &file;
  }
  const json& structure = *metadata->objects;
  // Items whose data file is not in the set, by file: one problem per file.
  std::map<std::string, std::pair<std::string, std::size_t>> unread;  // name -> (first item, items)
  auto note_unread = [&](const std::string& name, std::string item) {
    auto [it, added] = unread.try_emplace(name, std::move(item), 0);
    ++it->second.second;
  };
  for (const auto& [key, tensor] : structure["tensors"].items()) {
    if (std::optional<std::string> problem =
            tiling_problem(tensor["size"].get<std::vector<std::int64_t>>(), boxes_of(tensor))) {
      grid.problems.push_back(fmt::format("{}: {}: {}", metadata->path, key, *problem));
    }
    for (std::size_t c = 0; c < tensor["chunks"].size(); ++c) {
      std::string name = tensor["chunks"][c]["file"];
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        note_unread(name, fmt::format("{} chunk {}", key, c));
      } else if (!it->second->tensors.find(chunk_path(key, c))) {  // (its .metadata changed meanwhile)
        grid.problems.push_back(
            fmt::format("{}: {} chunk {}: not among the chunks read from it", it->second->path, key, c));
      }
    }
  }
  for (const auto& [key, object] : structure["objects"].items()) {
    std::string name = object["file"];
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      note_unread(name, "object item " + key);
    } else if (!it->second->objects->contains("objects") || !(*it->second->objects)["objects"].contains(key)) {
      grid.problems.push_back(
          fmt::format("{}: object item {}: not among the items read from it", it->second->path, key));
    }
  }
  for (const auto& [name, first] : unread) {
    grid.problems.push_back(fmt::format("{}: {}: its data file {} {} ({} item(s) lie in it)", metadata->path,
                                        first.first, (directory / name).string(), absent_or_not_given(directory / name),
                                        first.second));
  }
  return grid;
}

StateDict dcp_state_dict(const Manifest& manifest, const StateDictOptions& /*options*/) {
  if (!manifest.grid.problems.empty()) throw Error(ErrorKind::IncompleteSet, manifest.grid.problems.front());
  const ManifestFile* metadata = metadata_of(manifest.files);
  check_invariant(metadata != nullptr, "a DCP set without its .metadata passed the set check");
  std::map<std::string, std::size_t> by_name;
  for (std::size_t i = 0; i < manifest.files.size(); ++i)
    by_name[fs::path(manifest.files[i].path).filename().string()] = i;
  StateDict out;
  const json& structure = *metadata->objects;
  std::vector<std::pair<std::size_t, NestedItem>> items;  // by position in .metadata
  for (const auto& [key, tensor] : structure["tensors"].items()) {
    DType dtype = *dtype_from_name(tensor["dtype"].get<std::string>());
    std::vector<TensorSource> parts;
    for (std::size_t c = 0; c < tensor["chunks"].size(); ++c) {
      std::size_t index = by_name.at(tensor["chunks"][c]["file"].get<std::string>());
      const ManifestFile& file = manifest.files[index];
      const StoredTensor& chunk = *find_tensor(file, chunk_path(key, c));
      parts.push_back(source_of(chunk, file, static_cast<std::uint32_t>(index)));
    }
    NamedTensor named;  // (built field by field: GCC 12 warns of the brace form's default alias_of)
    named.name = state_dict_name(key);
    named.source = assemble_boxes(dtype, tensor["size"].get<std::vector<std::int64_t>>(), boxes_of(tensor), parts);
    NestedItem item;
    item.key = key;
    item.tensor = out.tensors.size();
    items.emplace_back(tensor["position"].get<std::size_t>(), std::move(item));
    out.tensors.push_back(std::move(named));
  }
  for (const auto& [key, object] : structure["objects"].items()) {
    NestedItem item;
    item.key = key;
    item.file = static_cast<std::uint32_t>(by_name.at(object["file"].get<std::string>()));
    item.offset = object["offset"].get<std::uint64_t>();
    item.length = object["length"].get<std::uint64_t>();
    items.emplace_back(object["position"].get<std::size_t>(), std::move(item));
  }
  // The tensors inside object items, at their paths under the item's key (a
  // torch file's own tensors are named so): compared, never written as tensors.
  for (std::size_t index = 0; index < manifest.files.size(); ++index) {
    const ManifestFile& file = manifest.files[index];
    if (&file == metadata || !file.objects->contains("objects")) continue;
    // (a data file lists its chunks first, then the object items' tensors)
    for (std::size_t i = (*file.objects)["chunks"].size(); i < file.tensors.size(); ++i) {
      const StoredTensor& tensor = file.tensors[i];
      NamedTensor named;
      named.name = std::string(kModelPrefix) + tensor.path;
      if (tensor.alias_of) {
        named.alias_of = std::string(kModelPrefix) + *tensor.alias_of;
      } else {
        named.source = source_of(tensor, file, static_cast<std::uint32_t>(index));
      }
      out.tensors.push_back(std::move(named));
      ++out.object_tensors;
    }
  }
  std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::unordered_map<std::string_view, const json*> paths;  // planner_data by key
  if (structure.contains("planner_data")) {
    for (const auto& [key, path] : structure["planner_data"].items()) paths.emplace(key, &path);
  }
  for (auto& [position, item] : items) {
    if (auto it = paths.find(item.key); it != paths.end()) {
      for (const json& element : *it->second) {
        if (element.is_string()) {
          item.path.emplace_back(element.get<std::string>());
        } else {
          item.path.emplace_back(element.get<std::int64_t>());
        }
      }
    } else {
      item.path.emplace_back(item.key);
    }
    out.items.push_back(std::move(item));
  }
  out.items_from = metadata->path;
  return out;
}

ModelCounts count_dcp_model(const Manifest& manifest) {
  ModelCounts counts;
  counts.counted_from = "the DCP metadata";
  const ManifestFile* metadata = metadata_of(manifest.files);
  if (metadata == nullptr) return counts;
  for (const auto& [key, tensor] : (*metadata->objects)["tensors"].items()) {
    std::uint64_t numel = 1;
    for (std::int64_t extent : tensor["size"].get<std::vector<std::int64_t>>())
      numel *= static_cast<std::uint64_t>(extent);
    const bool optimizer = key.starts_with("optim.") || key.starts_with("optimizer.");
    const bool floating = dtype_info(*dtype_from_name(tensor["dtype"].get<std::string>())).floating;
    (optimizer ? counts.optimizer_state : floating ? counts.parameters : counts.buffers) += numel;
  }
  return counts;
}

}  // namespace ckpt
