// Building a manifest from checkpoint files and detecting the MP x DP grid.
#include "ckpt/manifest.hpp"

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

#include "ckpt/parallel.hpp"
#include "ckpt/pyobject.hpp"

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

namespace {

bool same_layout(const FsdpMetadata& a, const FsdpMetadata& b) {
  if (a.instances.size() != b.instances.size() || a.buffer_names != b.buffer_names) return false;
  for (std::size_t i = 0; i < a.instances.size(); ++i) {
    const FsdpInstanceMeta& x = a.instances[i];
    const FsdpInstanceMeta& y = b.instances[i];
    if (x.fsdp_path != y.fsdp_path || x.flat_params.size() != y.flat_params.size()) return false;
    for (std::size_t j = 0; j < x.flat_params.size(); ++j) {
      const FlatParamMeta& p = x.flat_params[j];
      const FlatParamMeta& q = y.flat_params[j];
      // padding is per rank and legitimately differs
      if (p.name != q.name || p.names != q.names || p.shapes != q.shapes || p.numels != q.numels) return false;
    }
  }
  return true;
}

void check_fsdp_shard(const ManifestFile& file, int dp, std::vector<std::string>& problems) {
  if (!file.fsdp || !file.role.dp_shard) return;
  for (const FsdpInstanceMeta& instance : file.fsdp->instances) {
    for (const FlatParamMeta& flat : instance.flat_params) {
      FsdpChunk chunk = fsdp_chunk(flat.total_numel(), dp, *file.role.dp_shard);
      if (flat.padding != chunk.padding) {
        problems.push_back(fmt::format("{}: {}: padding {} but the chunk rule for {} ranks gives {}", file.path,
                                       flat.state_key, flat.padding, dp, chunk.padding));
      }
      std::string tensor_path = "model/" + flat.state_key;
      for (const ManifestTensor& t : file.tensors) {
        if (t.path != tensor_path) continue;
        auto expected = static_cast<std::uint64_t>(chunk.numel + chunk.padding);
        if (t.numel() != expected) {
          problems.push_back(fmt::format("{}: {}: {} elements but the chunk rule for {} ranks gives {}", file.path,
                                         flat.state_key, t.numel(), dp, expected));
        }
      }
    }
  }
}

// Why the grid of `files` is not allocated, if it is not: part and shard numbers
// come from file names (or a manifest) and must not size an allocation. Each is
// in [0, kMaxGridSide) and parts x shards is at most kMaxGridCells.
std::optional<std::string> oversized_grid(const std::vector<ManifestFile>& files) {
  std::uint64_t parts = 0;
  std::uint64_t shards = 0;
  for (const ManifestFile& file : files) {
    for (const auto& [number, what] : {std::pair{file.role.mp_part, "model part"}, std::pair{file.role.dp_shard, "shard"}}) {
      if (number && (*number < 0 || *number >= kMaxGridSide)) {
        return fmt::format("{}: {} number {} is outside [0, {})", file.path, what, *number, kMaxGridSide);
      }
    }
    parts = std::max<std::uint64_t>(parts, static_cast<std::uint64_t>(file.role.mp_part.value_or(0)) + 1);
    shards = std::max<std::uint64_t>(shards, static_cast<std::uint64_t>(file.role.dp_shard.value_or(0)) + 1);
  }
  if (parts * shards > kMaxGridCells) {
    return fmt::format("{} model parts x {} shards: more than {} cells, too many to be one checkpoint's files", parts,
                       shards, kMaxGridCells);
  }
  return std::nullopt;
}

}  // namespace

Grid detect_grid(const std::vector<ManifestFile>& files) {
  Grid grid;
  if (auto problem = oversized_grid(files)) {
    grid.problems.push_back(*problem);  // an empty grid: no cells, no parts, no shards
    return grid;
  }
  bool any_role = false;
  for (const ManifestFile& file : files) {
    if (file.role.mp_part || file.role.dp_shard) any_role = true;
    grid.mp = std::max(grid.mp, file.role.mp_part.value_or(0) + 1);
    grid.dp = std::max(grid.dp, file.role.dp_shard.value_or(0) + 1);
  }
  if (files.empty()) return grid;
  if (!any_role) {
    if (files.size() > 1) {
      grid.problems.push_back(fmt::format("{} files whose names carry no model_part/shard numbers", files.size()));
    }
    grid.mp = 1;
    grid.dp = 1;
    grid.cells = {{0}};
    return grid;
  }
  grid.cells.assign(grid.mp, std::vector<int>(grid.dp, -1));
  for (std::size_t i = 0; i < files.size(); ++i) {
    const FileRole& role = files[i].role;
    if (!role.mp_part && !role.dp_shard) {
      grid.problems.push_back(files[i].path + ": no model_part/shard number in the name, unlike the other files");
      continue;
    }
    int& cell = grid.cells[role.mp_part.value_or(0)][role.dp_shard.value_or(0)];
    if (cell >= 0) {
      grid.problems.push_back(fmt::format("{} and {} claim the same part {} shard {}", files[cell].path, files[i].path,
                                          role.mp_part.value_or(0), role.dp_shard.value_or(0)));
      continue;
    }
    cell = static_cast<int>(i);
  }
  for (int m = 0; m < grid.mp; ++m) {
    for (int d = 0; d < grid.dp; ++d) {
      if (grid.cells[m][d] < 0) grid.problems.push_back(fmt::format("missing: model part {} shard {}", m, d));
    }
  }
  for (int m = 0; m < grid.mp; ++m) {
    const ManifestFile* first = nullptr;
    for (int d = 0; d < grid.dp; ++d) {
      int index = grid.cells[m][d];
      if (index < 0) continue;
      const ManifestFile& file = files[index];
      check_fsdp_shard(file, grid.dp, grid.problems);
      if (first == nullptr) {
        first = &file;
      } else if (first->fsdp.has_value() != file.fsdp.has_value() ||
                 (file.fsdp && !same_layout(*first->fsdp, *file.fsdp))) {
        grid.problems.push_back(fmt::format("{}: shard_metadata differs from {} (shards of different checkpoints?)",
                                            file.path, first->path));
      }
    }
  }
  return grid;
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
