// Building a manifest from checkpoint files (the grid: grid.cpp).
#include "ckpt/manifest/manifest.hpp"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <thread>

#include "ckpt/format/pyobject.hpp"
#include "ckpt/io/parallel.hpp"

namespace ckpt {

std::uint64_t ManifestTensor::numel() const {
  std::uint64_t count = 1;
  for (std::int64_t d : shape) count *= static_cast<std::uint64_t>(d);
  return count;
}

std::string ManifestTensor::section() const {
  std::string top = path.substr(0, path.find('/'));
  if (top == "model") return "model";
  if (top == "last_optimizer_state" || top == "optimizer") return "optimizer_state";
  return "other";
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
  if (const auto* entries = graph.mapping_entries(graph.root)) {
    for (const auto& [k, v] : *entries) file.top_level_keys.push_back(key_label(graph, k));
  }
  std::map<pickle::NodeId, std::size_t> tensor_index;
  for (const TensorRef& ref : checkpoint.tensors()) {
    const StorageRef& storage = checkpoint.storages().at(ref.storage_key);
    ManifestTensor t;
    t.path = ref.path;
    t.dtype = ref.dtype;
    t.shape = ref.shape;
    t.stride = ref.stride;
    t.storage_key = ref.storage_key;
    t.storage_offset = ref.storage_offset;
    t.record_name = storage.record->name;
    t.record_crc32 = storage.record->crc32;
    t.file_byte_offset = ref.file_byte_offset;
    t.nbytes = ref.nbytes;
    t.requires_grad = ref.requires_grad;
    t.alias_of = ref.alias_of;
    if (ref.alias_of.empty()) tensor_index.emplace(ref.node, file.tensors.size());
    file.tensors.push_back(std::move(t));
  }
  file.fsdp = read_fsdp_metadata(checkpoint);
  file.declared_parts = declared_model_parallel_size(checkpoint);
  file.objects = to_json(graph, graph.root, [&](pickle::NodeId id) -> std::optional<nlohmann::json> {
    auto it = tensor_index.find(id);
    if (it == tensor_index.end()) return std::nullopt;
    return nlohmann::json{{"$tensor", it->second}};
  });
  return file;
}

Manifest build_manifest(const std::vector<std::string>& paths) {
  std::vector<std::string> unique;
  std::set<std::string> seen;
  for (const std::string& path : paths) {
    std::string absolute = std::filesystem::absolute(path).lexically_normal().string();
    if (seen.insert(absolute).second) unique.push_back(path);  // the same file named twice counts once
  }
  // Files are decoded in parallel: decoding a pickle costs about 30 ms for a
  // 160-layer shard, which adds up over metaseq's hundreds of files. The
  // manifest keeps the given order, and the first bad file (in that order) is
  // the one reported, whatever the thread count.
  std::vector<std::optional<ManifestFile>> described(unique.size());
  std::vector<std::exception_ptr> failures(unique.size());
  parallel_for(unique.size(), std::thread::hardware_concurrency(), [&] {
    return [&](std::size_t i) {
      try {
        MappedFile mapped(unique[i]);
        Checkpoint checkpoint(mapped);
        described[i] = describe_file(checkpoint);
      } catch (...) {
        failures[i] = std::current_exception();
      }
    };
  });
  Manifest manifest;
  for (std::size_t i = 0; i < unique.size(); ++i) {
    if (failures[i]) std::rethrow_exception(failures[i]);
    manifest.files.push_back(std::move(*described[i]));
  }
  manifest.grid = detect_grid(manifest.files);
  return manifest;
}

const ManifestTensor* find_tensor(const ManifestFile& file, std::string_view path) {
  for (const ManifestTensor& tensor : file.tensors) {
    if (tensor.path == path) return &tensor;
  }
  return nullptr;
}

std::string describe_contents(const ManifestFile& file) {
  const nlohmann::json& root = file.objects;
  if (root.is_object() && root.contains("$class") && root["$class"].is_string()) {
    std::string name = root["$class"].get<std::string>();
    if (name.rfind("__torch__.", 0) == 0) return fmt::format("a TorchScript archive (torch.jit.save of {})", name);
    return fmt::format("a pickled Python object of class {} (torch.save(model), not a state dict)", name);
  }
  if (file.tensors.size() == 1 && file.tensors[0].path.empty()) return "a single tensor (torch.save(tensor))";
  std::size_t top_level_tensors = 0;
  for (const ManifestTensor& tensor : file.tensors) {
    if (tensor.path.find('/') == std::string::npos) ++top_level_tensors;
  }
  if (top_level_tensors > 0 && top_level_tensors + 1 >= file.top_level_keys.size()) {
    return fmt::format("a plain state dict of {} tensors (torch.save(model.state_dict()))", top_level_tensors);
  }
  if (file.tensors.empty()) return "no tensors at all";
  std::string keys;
  for (std::size_t i = 0; i < file.top_level_keys.size() && i < 8; ++i) {
    keys += (i > 0 ? ", " : "") + file.top_level_keys[i];
  }
  if (file.top_level_keys.size() > 8) keys += ", ...";
  return fmt::format("no 'model' state dict (top-level keys: {})", keys.empty() ? "none" : keys);
}

void check_fresh(const Manifest& manifest) {
  for (const ManifestFile& file : manifest.files) {
    struct stat info {};
    if (::stat(file.path.c_str(), &info) != 0) {
      throw Error(Location{file.path, "", std::nullopt},
                  std::string("listed in the manifest but cannot be read: ") + std::strerror(errno));
    }
    std::int64_t mtime_ns = static_cast<std::int64_t>(info.st_mtim.tv_sec) * 1'000'000'000 + info.st_mtim.tv_nsec;
    if (static_cast<std::uint64_t>(info.st_size) != file.size_bytes || mtime_ns != file.mtime_ns) {
      throw Error(Location{file.path, "", std::nullopt},
                  "changed since the manifest was written (size or mtime differ): run `ckpt-tool manifest` again");
    }
  }
}

}  // namespace ckpt
