// Building a manifest from checkpoint files (the grid: grid.cpp).
#include "ckpt/manifest/manifest.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "ckpt/format/by_pickle_bytes.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/pyobject.hpp"
#include "ckpt/format/safetensors.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/parallel.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest_json.hpp"
#include "ckpt/manifest/optimizer_state.hpp"

namespace ckpt {

std::string state_dict_path(std::string_view prefix, std::string_view key) {
  return std::string(prefix) + path_label(key);
}

const StoredTensor* DistinctViews::tied_to(const StoredTensor& tensor) {
  auto& same_start = seen_[{tensor.storage_key, tensor.storage_offset}];
  for (const StoredTensor* t : same_start) {
    if (t->same_view(tensor)) return t;
  }
  same_start.push_back(&tensor);
  return nullptr;
}

std::string tensor_section(const StoredTensor& tensor) {
  std::string top = tensor.path.substr(0, tensor.path.find('/'));
  if (top == "model") return "model";
  if (top == kOptimizerStateKey || top == "optimizer") return "optimizer_state";
  return "other";
}

ManifestFile::ManifestFile() : objects(nlohmann::ordered_json()) {}

std::uint64_t ManifestFile::storage_start(std::size_t i) const {
  const StoredTensor& tensor = tensors[i];
  return places.at(i).file_byte_offset -
         static_cast<std::uint64_t>(tensor.storage_offset) * dtype_info(tensor.dtype).itemsize;
}

void ManifestFile::add_tensor(StoredTensor tensor, TensorPlace place) {
  tensors.edit().push_back(std::move(tensor));
  places.push_back(place);
}

ManifestFile describe_file(const Checkpoint& checkpoint) {
  ManifestFile file;
  file.path = std::filesystem::absolute(checkpoint.path()).lexically_normal().string();
  file.size_bytes = checkpoint.file().size();
  file.mtime_ns = checkpoint.file().mtime_ns();
  file.archive_name = checkpoint.archive_name();
  file.role = parse_file_role(checkpoint.path());
  file.pickle_protocol = checkpoint.graph().protocol;
  const pickle::Graph& graph = checkpoint.graph();
  for (const auto& [k, v] : graph.mapping_entries(graph.root)) file.top_level_keys.push_back(key_label(graph, k));
  file.tensors = checkpoint.tensors();  // shared, not copied
  file.places = checkpoint.places();
  std::unordered_map<pickle::NodeId, std::size_t> tensor_index;
  for (std::size_t i = 0; i < file.tensors.size(); ++i) {
    if (file.tensors[i].alias_of) continue;
    // An nn.Parameter is a tensor in the object tree too: a state dict of parameters is one of tensors.
    const TensorNodes& nodes = checkpoint.tensor_nodes()[i];
    tensor_index.emplace(nodes.node, i);
    if (nodes.wrapper != pickle::kNoNode) tensor_index.emplace(nodes.wrapper, i);
  }
  if (auto fsdp = read_fsdp_metadata(checkpoint)) file.fsdp = std::move(*fsdp);
  file.declared_parts = declared_model_parallel_size(checkpoint);
  file.objects = to_json(graph, graph.root, [&](pickle::NodeId id) -> std::optional<nlohmann::ordered_json> {
    auto it = tensor_index.find(id);
    if (it == tensor_index.end()) return std::nullopt;
    return nlohmann::ordered_json{{"$tensor", it->second}};
  });
  return file;
}

namespace {

std::size_t hash_of(const TensorList& tensors) {
  std::size_t h = tensors.size();
  for (const StoredTensor& t : tensors) {
    h = h * 1000003 ^ std::hash<std::string>{}(t.path);
    h = h * 1000003 ^ static_cast<std::size_t>(t.nbytes);
  }
  return h;
}

std::size_t hash_of(const FsdpMetadata& fsdp) {
  std::size_t h = fsdp.instances.size();
  for (const FsdpInstanceMeta& instance : fsdp.instances) {
    for (const FlatParamMeta& flat : instance.flat_params) {
      h = h * 1000003 ^ std::hash<std::string>{}(flat.state_key);
      h = h * 1000003 ^ static_cast<std::size_t>(flat.padding);
    }
  }
  return h;
}

// The distinct values of one kind seen so far, by hash: a TensorList or a Shared<T>.
template <typename Handle>
class Distinct {
 public:
  // The handle of the value equal to `handle`'s seen before, or `handle`, now remembered.
  Handle share(std::size_t hash, const Handle& handle) {
    auto range = seen_.equal_range(hash);
    for (auto it = range.first; it != range.second; ++it) {
      if (equal(it->second, handle)) return it->second;
    }
    seen_.emplace(hash, handle);
    return handle;
  }

 private:
  static bool equal(const TensorList& a, const TensorList& b) { return a == b; }
  template <typename T>
  static bool equal(const Shared<T>& a, const Shared<T>& b) {
    return *a == *b;
  }
  std::unordered_multimap<std::size_t, Handle> seen_;
};

}  // namespace

struct SharedContent::Seen {
  std::mutex mutex;
  Distinct<TensorList> tensors;
  Distinct<Shared<FsdpMetadata>> fsdp;
  Distinct<Shared<nlohmann::ordered_json>> objects;
};

SharedContent::SharedContent() : seen_(std::make_unique<Seen>()) {}
SharedContent::~SharedContent() = default;

void SharedContent::share(ManifestFile& file) {
  // Hashing walks the values: done outside the lock.
  std::size_t tensors_hash = hash_of(file.tensors);
  std::size_t fsdp_hash = file.fsdp ? hash_of(*file.fsdp) : 0;
  std::size_t objects_hash = std::hash<nlohmann::ordered_json>{}(*file.objects);
  std::lock_guard lock(seen_->mutex);
  file.tensors = seen_->tensors.share(tensors_hash, file.tensors);
  if (file.fsdp) file.fsdp = seen_->fsdp.share(fsdp_hash, file.fsdp);
  file.objects = seen_->objects.share(objects_hash, file.objects);
}

namespace {

// What a file's pickle alone gives (tensors, shard_metadata, object tree, ...):
// the same for every file whose pickle bytes are the same. Decoded once, then
// only the records' places are read from each file's zip directory.
struct PickleFacts {
  ManifestFile described;  // its file-specific fields are not used
  // The storages no tensor views (a storage pickled by itself): the tensors
  // name the others (storage_key, dtype, storage_nbytes).
  std::vector<StorageId> unviewed_storages;
};

// A file whose pickle gave `facts`: its description, with each tensor's
// place from this file's own records (checked as Checkpoint checks them).
ManifestFile describe_known(const PickleFacts& facts, const MappedFile& mapped, const ZipArchive& zip,
                            const TorchZip& located) {
  ManifestFile file = facts.described;
  file.path = std::filesystem::absolute(mapped.path()).lexically_normal().string();
  file.size_bytes = mapped.size();
  file.mtime_ns = mapped.mtime_ns();
  file.archive_name = located.archive_name;
  file.role = parse_file_role(mapped.path());
  for (const StorageId& storage : facts.unviewed_storages)
    storage_record(zip, file.archive_name, storage.key, storage.dtype, storage.numel);
  std::unordered_map<std::string_view, const ZipRecord*> records;
  file.places.clear();
  file.places.reserve(file.tensors.size());
  for (const StoredTensor& tensor : file.tensors) {
    auto [it, fresh] = records.try_emplace(tensor.storage_key, nullptr);
    if (fresh) {
      std::uint64_t numel = tensor.storage_nbytes / dtype_info(tensor.dtype).itemsize;
      it->second = &storage_record(zip, file.archive_name, tensor.storage_key, tensor.dtype, numel);
    }
    file.places.push_back(place_in(tensor, *it->second));
  }
  return file;
}

}  // namespace

struct FileDescriber::Known {
  ByPickleBytes<PickleFacts> pickles;
  SharedContent shared;
  std::mutex values_mutex;
  std::map<std::string, std::shared_future<std::shared_ptr<const void>>> values;
};

void DecodedFiles::keep(Decoded decoded) {
  std::lock_guard lock(mutex_);
  std::string path = std::filesystem::absolute(decoded.file->path()).lexically_normal().string();
  by_path_.emplace(std::move(path), std::move(decoded));
}

DecodedFiles::Decoded DecodedFiles::take(const std::string& path) {
  std::lock_guard lock(mutex_);
  auto it = by_path_.find(path);
  if (it == by_path_.end()) return {};
  Decoded decoded = std::move(it->second);
  by_path_.erase(it);
  return decoded;
}

FileDescriber::FileDescriber(DecodedFiles* keep) : known_(std::make_unique<Known>()), keep_(keep) {}
FileDescriber::~FileDescriber() = default;

std::shared_ptr<const void> FileDescriber::shared_value(const std::string& key,
                                                        const std::function<std::shared_ptr<const void>()>& make) {
  std::promise<std::shared_ptr<const void>> promise;
  std::shared_future<std::shared_ptr<const void>> future;
  bool mine = false;
  {
    std::lock_guard lock(known_->values_mutex);
    auto [it, fresh] = known_->values.try_emplace(key);
    if (fresh) {
      it->second = promise.get_future().share();
      mine = true;
    }
    future = it->second;
  }
  if (mine) {
    try {
      promise.set_value(make());
    } catch (...) {
      promise.set_exception(std::current_exception());
    }
  }
  return future.get();
}

namespace {

std::vector<std::int64_t> contiguous_strides(const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> stride(shape.size(), 1);
  for (std::size_t i = shape.size(); i-- > 1;) stride[i - 1] = stride[i] * std::max<std::int64_t>(shape[i], 1);
  return stride;
}

// A safetensors file's description, its header checked. Throws Error naming the file.
ManifestFile describe_safetensors(const MappedFile& mapped) {
  SafetensorsHeader header = read_safetensors_header(mapped.bytes(), mapped.path());
  ManifestFile file;
  file.path = std::filesystem::absolute(mapped.path()).lexically_normal().string();
  file.format = FileFormat::Safetensors;
  file.size_bytes = mapped.size();
  file.mtime_ns = mapped.mtime_ns();
  file.role = parse_file_role(mapped.path());
  file.top_level_keys = {"model"};
  std::vector<StoredTensor> tensors;
  nlohmann::ordered_json model = nlohmann::ordered_json::object();
  // Appended to the object's vector: its operator[] would look each label up (n^2).
  // The labels are distinct, as the names are (escape_label is one to one).
  auto& entries =
      static_cast<nlohmann::ordered_json::object_t::Container&>(model.get_ref<nlohmann::ordered_json::object_t&>());
  for (const SafetensorsTensor& entry : header.tensors) {
    StoredTensor tensor;
    tensor.path = state_dict_path(kModelPrefix, entry.name);
    tensor.dtype = entry.dtype;
    tensor.shape = entry.shape;
    tensor.stride = contiguous_strides(entry.shape);
    tensor.storage_key = std::to_string(tensors.size());
    tensor.nbytes = tensor.storage_nbytes = entry.end - entry.begin;
    entries.emplace_back(escape_label(entry.name), nlohmann::ordered_json{{"$tensor", tensors.size()}});
    file.places.push_back({header.data_offset + entry.begin, 0});
    tensors.push_back(std::move(tensor));
  }
  file.tensors = TensorList(std::move(tensors));
  file.objects = nlohmann::ordered_json{{"model", std::move(model)}, {"__metadata__", header.metadata}};
  return file;
}

}  // namespace

ManifestFile describe_safetensors_file(FileDescriber& /*describer*/, const std::string& path) {
  MappedFile mapped(path);
  return describe_safetensors(mapped);
}

bool is_safetensors_path(std::string_view path) {
  return path.ends_with(".safetensors");
}

namespace {

SafetensorsIndex read_index(const std::string& index_path) {
  MappedFile mapped(index_path);
  return parse_safetensors_index(as_chars(mapped.bytes()), index_path);
}

}  // namespace

std::vector<std::string> safetensors_index_files(const std::string& index_path) {
  std::filesystem::path dir = std::filesystem::path(index_path).parent_path();
  std::vector<std::string> files;
  for (const std::string& name : read_index(index_path).files) files.push_back((dir / name).string());
  return files;
}

std::vector<std::string> safetensors_index_problems(const std::string& index_path,
                                                    const std::vector<ManifestFile>& files) {
  SafetensorsIndex index = read_index(index_path);
  std::filesystem::path dir = std::filesystem::absolute(index_path).lexically_normal().parent_path();
  std::map<std::string, const ManifestFile*> by_name;  // file name -> description
  for (const ManifestFile& file : files) by_name[std::filesystem::path(file.path).filename().string()] = &file;
  std::vector<std::string> problems;
  std::set<std::pair<std::string, std::string>> mapped;  // (file name, tensor path)
  for (const auto& [key, name] : index.weight_map) {
    std::string path = state_dict_path(kModelPrefix, key);
    auto file = by_name.find(name);
    if (file == by_name.end()) {
      problems.push_back(fmt::format("{}: weight_map puts '{}' in {}, which is not read", index_path, key, name));
    } else if (find_tensor(*file->second, path) == nullptr) {
      problems.push_back(fmt::format("{}: weight_map puts '{}' in {}, which does not hold it", index_path, key, name));
    }
    mapped.emplace(name, path);
  }
  for (const auto& [name, file] : by_name) {
    for (const StoredTensor& tensor : file->tensors) {
      if (mapped.count({name, tensor.path}) == 0) {
        problems.push_back(
            fmt::format("{}: {} holds {}, which weight_map does not name there", index_path, name, tensor.path));
      }
    }
  }
  return problems;
}

ManifestFile FileDescriber::describe(const std::string& path) {
  return input_layout_of_path(path).describe(*this, path);
}

ManifestFile FileDescriber::describe_torch(const std::string& path) {
  auto mapped = std::make_unique<MappedFile>(path);
  ZipArchive zip(*mapped);
  mapped->drop_resident_pages();  // the zip directory, parsed (what stays resident adds up over files)
  TorchZip located = locate_torch_zip(zip);
  Bytes pickle = zip.data(*located.pickle);
  if (auto facts = known_->pickles.find(pickle)) return describe_known(*facts, *mapped, zip, located);
  auto checkpoint = std::make_shared<const Checkpoint>(*mapped, std::move(zip));
  mapped->drop_resident_pages();  // the pickle, decoded
  ManifestFile file = describe_file(*checkpoint);
  known_->shared.share(file);
  auto facts = std::make_shared<PickleFacts>();
  facts->described = file;
  std::unordered_set<std::string_view> viewed;
  for (const StoredTensor& tensor : file.tensors) viewed.insert(tensor.storage_key);
  for (const auto& [key, storage] : checkpoint->storages()) {
    if (!viewed.contains(key))
      facts->unviewed_storages.push_back({key, storage.dtype, storage.numel, storage.location});
  }
  known_->pickles.add(pickle, std::move(facts));
  if (keep_ != nullptr) keep_->keep({std::move(mapped), std::move(checkpoint)});
  return file;
}

Manifest build_manifest(const std::vector<std::string>& paths, DecodedFiles* keep) {
  std::vector<std::string> unique;
  std::set<std::string> seen;
  for (const std::string& path : paths) {
    std::string absolute = std::filesystem::absolute(path).lexically_normal().string();
    if (seen.insert(absolute).second) unique.push_back(path);  // the same file named twice counts once
  }
  // Files are described in parallel, each pickle decoded once and what the
  // files share kept once (FileDescriber). The manifest keeps the
  // given order, and the first bad file (in that order) is the one reported,
  // whatever the thread count.
  FileDescriber describer(keep);
  Manifest manifest;
  manifest.files = parallel_map(unique.size(), std::thread::hardware_concurrency(),
                                [&](std::size_t i) { return describer.describe(unique[i]); });
  manifest.grid = detect_grid(manifest.files);
  return manifest;
}

const StoredTensor* find_tensor(const ManifestFile& file, std::string_view path) {
  std::optional<std::size_t> index = file.tensors.find(path);
  return index ? &file.tensors[*index] : nullptr;
}

const StoredTensor* nested_tensor(const ManifestFile& file, const std::string& prefix) {
  for (const StoredTensor& tensor : file.tensors) {
    if (tensor.path.starts_with(prefix) && tensor.path.find('/', prefix.size()) != std::string::npos) return &tensor;
  }
  return nullptr;
}

std::string describe_contents(const ManifestFile& file) {
  const nlohmann::ordered_json& root = *file.objects;
  if (root.is_object() && root.contains("$class") && root["$class"].is_string()) {
    std::string name = root["$class"].get<std::string>();
    if (name.starts_with("__torch__.")) return fmt::format("a TorchScript archive (torch.jit.save of {})", name);
    return fmt::format("a pickled Python object of class {} (torch.save(model), not a state dict)", name);
  }
  if (file.tensors.size() == 1 && file.tensors[0].path.empty()) return "a single tensor (torch.save(tensor))";
  std::size_t top_level_tensors = 0;
  for (const StoredTensor& tensor : file.tensors) {
    if (tensor.path.find('/') == std::string::npos) ++top_level_tensors;
  }
  if (top_level_tensors > 0 && top_level_tensors + 1 >= file.top_level_keys.size()) {
    return fmt::format("a plain state dict of {} tensors (torch.save(model.state_dict()))", top_level_tensors);
  }
  if (file.tensors.empty()) return "no tensors at all";
  // `model` is there, but its tensors sit deeper: a nested dict, not a state dict.
  if (const StoredTensor* nested = nested_tensor(file, std::string(kModelPrefix))) {
    return fmt::format(
        "a 'model' that is not a flat state dict: its tensors sit deeper, such as {} (a state dict maps each "
        "name to a tensor, as model.state_dict() does)",
        nested->path);
  }
  std::string keys;
  for (std::size_t i = 0; i < file.top_level_keys.size() && i < 8; ++i) {
    keys += (i > 0 ? ", " : "") + file.top_level_keys[i];
  }
  if (file.top_level_keys.size() > 8) keys += ", ...";
  return fmt::format("no 'model' state dict (top-level keys: {})", keys.empty() ? "none" : keys);
}

namespace {

// The first field in which `claimed` (files[index] of a manifest) differs from
// `actual` (the file described again), as a JSON path and what the file holds;
// nullopt when they agree.
std::optional<std::pair<std::string, std::string>> first_mismatch(const ManifestFile& claimed,
                                                                  const ManifestFile& actual, std::size_t index) {
  auto field = [&](const std::string& name) { return fmt::format("files[{}].{}", index, name); };
  if (claimed.format != actual.format) return std::pair{field("format"), "a file of another layout"};
  if (claimed.archive_name != actual.archive_name) return std::pair{field("archive_name"), actual.archive_name};
  if (claimed.pickle_protocol != actual.pickle_protocol)
    return std::pair{field("pickle_protocol"), std::to_string(actual.pickle_protocol)};
  if (claimed.top_level_keys != actual.top_level_keys)
    return std::pair{field("top_level_keys"), fmt::format("{} keys", actual.top_level_keys.size())};
  bool same_declared = claimed.declared_parts.has_value() == actual.declared_parts.has_value() &&
                       (!claimed.declared_parts || (claimed.declared_parts->parts == actual.declared_parts->parts &&
                                                    claimed.declared_parts->from == actual.declared_parts->from));
  if (!same_declared) return std::pair{field("model_parallel_size"), "another declared part count"};
  if (claimed.tensors.size() != actual.tensors.size())
    return std::pair{field("tensors"), fmt::format("{} tensors", actual.tensors.size())};
  for (std::size_t i = 0; i < actual.tensors.size(); ++i) {
    if (!(claimed.tensors[i] == actual.tensors[i])) {
      const StoredTensor& t = actual.tensors[i];
      return std::pair{field(fmt::format("tensors (tensor {})", i)),
                       fmt::format("{}: {} of shape [{}] in storage {}", t.path, dtype_info(t.dtype).name,
                                   fmt::join(t.shape, ", "), t.storage_key)};
    }
    if (claimed.places.at(i).file_byte_offset != actual.places[i].file_byte_offset)
      return std::pair{field(fmt::format("file_byte_offsets[{}]", i)),
                       fmt::format("{} at byte {}", actual.tensors[i].path, actual.places[i].file_byte_offset)};
    if (claimed.places[i].record_crc32 != actual.places[i].record_crc32)
      return std::pair{field(fmt::format("record_crc32s[{}]", i)),
                       fmt::format("0x{:08x}", actual.places[i].record_crc32)};
  }
  if (static_cast<bool>(claimed.fsdp) != static_cast<bool>(actual.fsdp) ||
      (actual.fsdp && !claimed.fsdp.same_value(actual.fsdp) && !(*claimed.fsdp == *actual.fsdp)))
    return std::pair{field("fsdp"), actual.fsdp ? "another shard_metadata" : "no shard_metadata"};
  if (!claimed.objects.same_value(actual.objects) && !(*claimed.objects == *actual.objects))
    return std::pair{field("objects"), "another object tree"};
  return std::nullopt;
}

}  // namespace

namespace {

// Files described on a thread of their own while the manifest naming them is
// parsed, in the order its files section names them; what describing one gave
// (a description or the Error) is kept until the check asks for it.
class DescribedAhead {
 public:
  explicit DescribedAhead(FileDescriber& describer) : describer_(describer), worker_([this] { run(); }) {}
  DescribedAhead(const DescribedAhead&) = delete;
  DescribedAhead& operator=(const DescribedAhead&) = delete;
  ~DescribedAhead() { stop(); }

  void add(const std::string& path) {
    std::lock_guard lock(mutex_);
    queue_.push_back(path);
    ready_.notify_one();
  }
  // Finishes the file being described; the rest of the queue is left to the caller.
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      ready_.notify_one();
    }
    if (worker_.joinable()) worker_.join();
  }
  // `path`'s description, if it was made (after stop()); an Error it gave is thrown.
  std::optional<ManifestFile> take(const std::string& path) {
    auto it = done_.find(path);
    if (it == done_.end()) return std::nullopt;
    if (it->second.failure) std::rethrow_exception(it->second.failure);
    return std::move(it->second.file);
  }

 private:
  struct Result {
    ManifestFile file;
    std::exception_ptr failure;
  };
  void run() {
    while (true) {
      std::string path;
      {
        std::unique_lock lock(mutex_);
        ready_.wait(lock, [&] { return stopping_ || next_ < queue_.size(); });
        if (stopping_) return;
        path = queue_[next_++];
      }
      if (done_.count(path) != 0) continue;  // named twice: the manifest check says so
      Result result;
      try {
        result.file = describer_.describe(path);
      } catch (...) {
        result.failure = std::current_exception();
      }
      done_.emplace(path, std::move(result));  // (read by the caller only after stop())
    }
  }

  FileDescriber& describer_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<std::string> queue_;
  std::size_t next_ = 0;
  bool stopping_ = false;
  std::map<std::string, Result> done_;  // by path: the worker's until stop()
  std::thread worker_;                  // last: started once the rest is built
};

void check_descriptions(const Manifest& manifest, const std::string& source, FileDescriber& describer,
                        DescribedAhead* ahead) {
  // A mismatch is thrown like a file that cannot be read: the first in file order is reported.
  parallel_map(manifest.files.size(), std::thread::hardware_concurrency(), [&](std::size_t i) {
    const ManifestFile& claimed = manifest.files[i];
    std::optional<ManifestFile> described = ahead != nullptr ? ahead->take(claimed.path) : std::nullopt;
    if (!described) described = describer.describe(claimed.path);
    if (auto mismatch = first_mismatch(claimed, *described, i)) {
      throw Error(Location{source, mismatch->first, std::nullopt},
                  fmt::format("does not describe {}, which holds {} (a manifest edited by hand?): run `ckpt-tool "
                              "manifest` again",
                              claimed.path, mismatch->second));
    }
    return true;
  });
}

}  // namespace

void check_describes_files(const Manifest& manifest, const std::string& source, DecodedFiles* keep) {
  FileDescriber describer(keep);
  check_descriptions(manifest, source, describer, nullptr);
}

Manifest read_checked_manifest(const std::string& path, DecodedFiles* keep) {
  FileDescriber describer(keep);
  DescribedAhead ahead(describer);
  Manifest manifest = read_manifest(path, [&](const std::string& file) { ahead.add(file); });
  ahead.stop();
  check_fresh(manifest);
  check_descriptions(manifest, path, describer, &ahead);
  return manifest;
}

void check_fresh(const Manifest& manifest) {
  for (const ManifestFile& file : manifest.files) {
    struct stat info {};
    if (::stat(file.path.c_str(), &info) != 0) {
      const int error = errno;
      throw Error(error == ENOENT ? ErrorKind::IncompleteSet : kind_of_errno(error),
                  Location{file.path, "", std::nullopt},
                  std::string("listed in the manifest but cannot be read: ") + std::strerror(error));
    }
    if (!S_ISREG(info.st_mode)) {
      throw Error(Location{file.path, "", std::nullopt},
                  "listed in the manifest but not a regular file (a directory, a device or a FIFO)");
    }
    std::int64_t mtime_ns = static_cast<std::int64_t>(info.st_mtim.tv_sec) * 1'000'000'000 + info.st_mtim.tv_nsec;
    if (static_cast<std::uint64_t>(info.st_size) != file.size_bytes || mtime_ns != file.mtime_ns) {
      throw Error(Location{file.path, "", std::nullopt},
                  "changed since the manifest was written (size or mtime differ): run `ckpt-tool manifest` again");
    }
  }
}

}  // namespace ckpt
