// Detecting the MP x DP grid of an input set: the part count the files declare,
// the parts and shards their names give, the FSDP world size their flat
// parameters imply, each file placed in its cell, and the checks that the files
// agree with each other (one checkpoint, one training step).
#include <fmt/format.h>

#include <algorithm>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <unordered_map>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest.hpp"

namespace ckpt {

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
  if (!file.fsdp || !file.role.dp_shard || *file.role.dp_shard >= dp) return;
  for (const FsdpInstanceMeta& instance : file.fsdp->instances) {
    for (const FlatParamMeta& flat : instance.flat_params) {
      FsdpChunk chunk = fsdp_chunk(flat.total_numel(), dp, *file.role.dp_shard);
      if (flat.padding != chunk.padding) {
        problems.push_back(fmt::format("{}: {}: padding {} but the chunk rule for {} ranks gives {}", file.path,
                                       flat.state_key, flat.padding, dp, chunk.padding));
      }
      const StoredTensor* tensor = find_tensor(file, state_dict_path(kModelPrefix, flat.state_key));
      auto expected = static_cast<std::uint64_t>(chunk.numel + chunk.padding);
      if (tensor != nullptr && tensor->numel() != expected) {
        problems.push_back(fmt::format("{}: {}: {} elements but the chunk rule for {} ranks gives {}", file.path,
                                       flat.state_key, tensor->numel(), dp, expected));
      }
    }
  }
}

// The FSDP world sizes W for which fairscale's chunk of a flat parameter of
// `numel` elements is `chunk` long: ceil(numel / W) == chunk, that is
// ceil(numel / chunk) <= W <= floor((numel - 1) / (chunk - 1)). Empty (lo > hi)
// when no W gives that chunk.
struct WorldSizes {
  std::int64_t lo = 1;
  std::int64_t hi = std::numeric_limits<std::int64_t>::max();
  std::string because;   // the flat parameter that set lo
  std::string conflict;  // the first one that left no world size, with its file
};
void narrow_world_sizes(WorldSizes& range, std::int64_t numel, std::int64_t chunk, const std::string& file,
                        const std::string& tensor) {
  if (numel <= 0) return;  // an empty flat parameter fits any world size
  if (chunk <= 0) {
    range.hi = 0;
    return;
  }
  std::int64_t lo = (numel + chunk - 1) / chunk;
  std::int64_t hi = chunk == 1 ? std::numeric_limits<std::int64_t>::max() : (numel - 1) / (chunk - 1);
  bool was_empty = range.lo > range.hi;
  std::string here = fmt::format("{}: {} elements in chunks of {}", tensor, numel, chunk);
  if (lo > range.lo) {
    range.lo = lo;
    range.because = here;
  }
  range.hi = std::min(range.hi, hi);
  if (!was_empty && range.lo > range.hi) range.conflict = fmt::format("{}: {}", file, here);
}

// What the FSDP flat parameters of one model part's files say about its world size.
WorldSizes implied_world_sizes(const std::vector<ManifestFile>& files, const std::vector<int>& shard_files) {
  WorldSizes range;
  for (int index : shard_files) {
    if (index < 0 || !files[index].fsdp) continue;
    const ManifestFile& file = files[index];
    for (const FsdpInstanceMeta& instance : file.fsdp->instances) {
      for (const FlatParamMeta& flat : instance.flat_params) {
        const StoredTensor* tensor = find_tensor(file, state_dict_path(kModelPrefix, flat.state_key));
        if (tensor == nullptr) continue;  // unflattened (consolidated) files have no FSDP dimension
        narrow_world_sizes(range, flat.total_numel(), static_cast<std::int64_t>(tensor->numel()), file.path,
                           state_dict_path(kModelPrefix, flat.state_key));
      }
    }
  }
  return range;
}

bool checked_section(const StoredTensor& tensor) {
  return tensor_section(tensor) != "other" && !tensor.alias_of;
}

// Where a training checkpoint records its step, the same on every rank:
// metaseq's optimizer_history (num_updates, the lr scheduler's state) and the
// data iterator's position. Shards of the same model saved at different steps
// agree on everything else.
nlohmann::ordered_json training_step(const ManifestFile& file) {
  nlohmann::ordered_json step = nlohmann::ordered_json::object();
  const nlohmann::ordered_json& objects = *file.objects;
  if (!objects.is_object()) return step;
  if (auto history = objects.find("optimizer_history"); history != objects.end()) step["optimizer_history"] = *history;
  if (auto extra = objects.find("extra_state"); extra != objects.end() && extra->is_object()) {
    if (auto iterator = extra->find("train_iterator"); iterator != extra->end() && iterator->is_object()) {
      for (const char* key : {"epoch", "iterations_in_epoch"}) {
        if (auto value = iterator->find(key); value != iterator->end())
          step["extra_state"]["train_iterator"][key] = *value;
      }
    }
  }
  return step;
}

// The first place where two JSON values differ: "optimizer_history/0/num_updates: 2000 != 1000".
std::string first_difference(const nlohmann::ordered_json& a, const nlohmann::ordered_json& b,
                             const std::string& path) {
  auto here = [&] { return fmt::format("{}: {} != {}", path, a.dump().substr(0, 60), b.dump().substr(0, 60)); };
  if (a.type() != b.type()) return here();
  if (a.is_object()) {
    for (const auto& [key, value] : a.items()) {
      std::string inner = append_path(path, key);
      if (!b.contains(key)) return inner + ": only in one file";
      if (value != b[key]) return first_difference(value, b[key], inner);
    }
    return path + ": keys differ";
  }
  if (a.is_array() && a.size() == b.size()) {
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (a[i] != b[i]) return first_difference(a[i], b[i], append_path(path, std::to_string(i)));
    }
  }
  return here();
}

// What each file is compared with: for each tensor path, the dtype of the first
// file holding it; the first file's training step and optimizer state.
struct AgreementReference {
  // tensor path (a view of the file's list) -> dtype, first file holding it
  std::unordered_map<std::string_view, std::pair<DType, int>> dtypes;
  std::set<const void*> lists_seen;  // tensor lists whose dtypes are in `dtypes`
  const ManifestFile* optimizer_file = nullptr;
  const ManifestFile* step_file = nullptr;
  nlohmann::ordered_json step;
};

// The tensor paths of files[index] that must agree across shards; a dtype that
// differs from the first file holding the path is a problem.
std::set<std::string_view> checked_paths(const std::vector<ManifestFile>& files, int index,
                                         AgreementReference& reference, bool& has_optimizer,
                                         std::vector<std::string>& problems) {
  const ManifestFile& file = files[index];
  std::set<std::string_view> paths;  // views of the file's list
  // A list already checked gives the same paths and no new dtype problem.
  bool seen = !reference.lists_seen.insert(file.tensors.identity()).second;
  for (const StoredTensor& tensor : file.tensors) {
    if (!checked_section(tensor)) continue;
    paths.insert(tensor.path);
    has_optimizer = has_optimizer || tensor_section(tensor) == "optimizer_state";
    if (seen) continue;
    auto [it, fresh] = reference.dtypes.emplace(tensor.path, std::pair{tensor.dtype, index});
    if (!fresh && it->second.first != tensor.dtype) {
      problems.push_back(fmt::format("{}: {}: {} but {} has {} (mixed dtypes)", file.path, tensor.path,
                                     dtype_info(tensor.dtype).name, files[it->second.second].path,
                                     dtype_info(it->second.first).name));
    }
  }
  return paths;
}

// Every file saved at the first file's training step.
void check_step(const ManifestFile& file, AgreementReference& reference, std::vector<std::string>& problems) {
  if (reference.step_file != nullptr && reference.step_file->objects.same_value(file.objects))
    return;  // one shared tree
  nlohmann::ordered_json step = training_step(file);
  if (reference.step_file == nullptr) {
    reference.step_file = &file;
    reference.step = std::move(step);
  } else if (step != reference.step) {
    problems.push_back(
        fmt::format("{}: saved at another training step than {} ({}): shards of different "
                    "checkpoints",
                    file.path, reference.step_file->path, first_difference(step, reference.step, "")));
  }
}

// Optimizer state in every file or in none.
void check_optimizer_presence(const ManifestFile& file, bool has_optimizer, AgreementReference& reference,
                              std::vector<std::string>& problems) {
  if (reference.optimizer_file == nullptr) {
    reference.optimizer_file = &file;
    return;
  }
  const ManifestFile& first = *reference.optimizer_file;
  bool reference_has = std::any_of(first.tensors.begin(), first.tensors.end(),
                                   [](const StoredTensor& t) { return tensor_section(t) == "optimizer_state"; });
  if (reference_has != has_optimizer) {
    problems.push_back(fmt::format("{}: {} optimizer state but {} {} (optimizer state in some files only)", file.path,
                                   has_optimizer ? "has" : "has no", first.path, reference_has ? "has" : "has none"));
  }
}

// A shard holds the same tensors as its part's first shard.
void check_same_tensors(const ManifestFile& file, const std::set<std::string_view>& paths,
                        const ManifestFile& part_reference, const std::set<std::string_view>& reference_paths,
                        std::vector<std::string>& problems) {
  std::vector<std::string_view> missing;
  std::vector<std::string_view> extra;
  std::set_difference(reference_paths.begin(), reference_paths.end(), paths.begin(), paths.end(),
                      std::back_inserter(missing));
  std::set_difference(paths.begin(), paths.end(), reference_paths.begin(), reference_paths.end(),
                      std::back_inserter(extra));
  if (!missing.empty()) {
    problems.push_back(fmt::format(
        "{}: lacks {}{}, which {} holds (shards of different checkpoints?)", file.path, missing.front(),
        missing.size() > 1 ? fmt::format(" and {} more tensor(s)", missing.size() - 1) : "", part_reference.path));
  } else if (!extra.empty()) {
    problems.push_back(fmt::format(
        "{}: holds {}{}, which {} lacks (shards of different checkpoints?)", file.path, extra.front(),
        extra.size() > 1 ? fmt::format(" and {} more tensor(s)", extra.size() - 1) : "", part_reference.path));
  }
}

// Files of one checkpoint agree with each other: a tensor has one dtype in
// every file, all were saved at one training step, every shard of a part holds
// the same tensors, and optimizer state is in all files or none.
void check_agreement(const std::vector<ManifestFile>& files, const Grid& grid, std::vector<std::string>& problems) {
  AgreementReference reference;
  for (const auto& row : grid.cells) {
    const ManifestFile* part_reference = nullptr;
    std::set<std::string_view> reference_paths;
    for (int index : row) {
      if (index < 0) continue;
      const ManifestFile& file = files[index];
      if (part_reference != nullptr && file.tensors.same_list(part_reference->tensors)) {
        check_step(file, reference, problems);  // the same tensors as the part's first shard: one shared list
        continue;
      }
      bool has_optimizer = false;
      std::set<std::string_view> paths = checked_paths(files, index, reference, has_optimizer, problems);
      check_step(file, reference, problems);
      check_optimizer_presence(file, has_optimizer, reference, problems);
      if (part_reference == nullptr) {
        part_reference = &file;
        reference_paths = std::move(paths);
        continue;
      }
      check_same_tensors(file, paths, *part_reference, reference_paths, problems);
    }
  }
}

// The model-part count a set declares, and why ("cfg.model.model_parallel_size =
// 2; ..."); 0 when nothing declares one. All files must declare the same. A
// count the user states (--model-parts) replaces theirs: metaseq's
// reshard_model_parallel copies cfg unchanged, so its outputs declare the old one.
struct DeclaredCount {
  std::int64_t parts = 0;
  std::string why;
};
DeclaredCount declared_part_count(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts,
                                  std::vector<std::string>& problems) {
  if (model_parts) return {*model_parts, fmt::format("--model-parts {}", *model_parts)};
  const ManifestFile* declaring = nullptr;
  for (const ManifestFile& file : files) {
    if (!file.declared_parts) continue;
    if (declaring == nullptr) {
      declaring = &file;
    } else if (file.declared_parts->parts != declaring->declared_parts->parts) {
      problems.push_back(fmt::format("{}: {} = {} but {} says {} (files of different checkpoints?)", file.path,
                                     file.declared_parts->from, file.declared_parts->parts, declaring->path,
                                     declaring->declared_parts->parts));
    }
  }
  if (declaring == nullptr) return {};
  const DeclaredParts& declared = *declaring->declared_parts;
  if (declared.parts < 1 || declared.parts > kMaxGridSide) {
    problems.push_back(fmt::format("{}: {} = {}: not a plausible number of model parts", declaring->path, declared.from,
                                   declared.parts));
    return {};
  }
  return {declared.parts, fmt::format("{} = {}; --model-parts overrides a stale cfg", declared.from, declared.parts)};
}

// The parts and shards the file names give.
struct NamedRoles {
  bool any = false;          // some usable file's name carries a part or shard number
  int mp = 0;                // the highest part number + 1
  int dp = 0;                // the highest shard number + 1
  std::vector<bool> usable;  // false for a file whose numbers lie outside the grid's bounds
};
NamedRoles named_roles(const std::vector<ManifestFile>& files, std::vector<std::string>& problems) {
  NamedRoles named;
  named.usable.assign(files.size(), true);
  for (std::size_t i = 0; i < files.size(); ++i) {
    const FileRole& role = files[i].role;
    if (!role.mp_part && !role.dp_shard) continue;
    // Numbers from names (or a manifest) must not size an allocation.
    for (const auto& [number, what] : {std::pair{role.mp_part, "model part"}, std::pair{role.dp_shard, "shard"}}) {
      if (named.usable[i] && number && (*number < 0 || *number >= kMaxGridSide)) {
        problems.push_back(
            fmt::format("{}: {} number {} is outside [0, {})", files[i].path, what, *number, kMaxGridSide));
        named.usable[i] = false;
      }
    }
    if (!named.usable[i]) continue;
    named.any = true;
    named.mp = std::max(named.mp, role.mp_part.value_or(0) + 1);
    named.dp = std::max(named.dp, role.dp_shard.value_or(0) + 1);
  }
  return named;
}

// torch.save names a file's zip archive after the file's stem, so the archive
// name tells where a file was saved in the grid. A file renamed into another
// cell (two shards' names swapped) would otherwise be stitched in the wrong
// place with exit 0; a consistent rename (another prefix, no numbers) keeps
// numbers that agree, or none.
void check_archive_roles(const std::vector<ManifestFile>& files, std::vector<std::string>& problems) {
  for (const ManifestFile& file : files) {
    const FileRole saved = parse_file_role(file.archive_name);
    for (const auto& [named, as_saved, what] : {std::tuple{file.role.mp_part, saved.mp_part, "model part"},
                                                std::tuple{file.role.dp_shard, saved.dp_shard, "shard"}}) {
      if (!named || !as_saved || *named == *as_saved) continue;
      std::string other;
      for (const ManifestFile& candidate : files) {
        const FileRole& role = candidate.role;
        if (&candidate != &file && role.mp_part.value_or(0) == saved.mp_part.value_or(file.role.mp_part.value_or(0)) &&
            role.dp_shard.value_or(0) == saved.dp_shard.value_or(file.role.dp_shard.value_or(0))) {
          other = fmt::format("; {} is named {} {}", candidate.path, what, *as_saved);
          break;
        }
      }
      problems.push_back(fmt::format("{}: named {} {} but saved as {} {} (zip archive name '{}'){}: renamed files?",
                                     file.path, what, *named, what, *as_saved, file.archive_name, other));
      break;
    }
  }
}

// No file names a part or shard: one cell, the first file.
void place_unnumbered(const std::vector<ManifestFile>& files, const DeclaredCount& declared, Grid& grid) {
  if (files.size() > 1) {
    grid.problems.push_back(fmt::format("{} files whose names carry no model_part/shard numbers", files.size()));
  }
  grid.mp = 1;
  grid.dp = 1;
  grid.cells = {{0}};
  if (declared.parts > 1) {
    grid.problems.push_back(
        fmt::format("model parts missing: {}'s name carries no model part number, so it holds at "
                    "most one of {} ({})",
                    files[0].path, declared.parts, declared.why));
  }
}

// The part count: the highest numbered part, or the declared count when larger.
int part_count(int found_mp, const DeclaredCount& declared, std::vector<std::string>& problems) {
  int mp = found_mp;
  if (declared.parts > found_mp) mp = static_cast<int>(declared.parts);
  if (declared.parts != 0 && declared.parts < found_mp) {
    problems.push_back(fmt::format("model part {} found, beyond the {} part(s) declared ({})", found_mp - 1,
                                   declared.parts, declared.why));
  }
  return mp;
}

// [m]: the usable numbered files of model part m.
std::vector<std::vector<int>> files_by_part(const std::vector<ManifestFile>& files, const std::vector<bool>& usable,
                                            int mp) {
  std::vector<std::vector<int>> by_part(mp);
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (usable[i] && (files[i].role.mp_part || files[i].role.dp_shard)) {
      by_part[files[i].role.mp_part.value_or(0)].push_back(static_cast<int>(i));
    }
  }
  return by_part;
}

// The shard count: the highest numbered shard, or more where a part's flat
// parameters (`implied`, per part) need more FSDP ranks.
int shard_count(int found_dp, const std::vector<WorldSizes>& implied, std::vector<std::string>& problems) {
  int dp = found_dp;
  for (std::size_t m = 0; m < implied.size(); ++m) {
    if (implied[m].lo > implied[m].hi) {
      problems.push_back(
          fmt::format("{} fit no FSDP world size that the other shards of model part {} allow "
                      "(shards of different checkpoints, or a corrupted shard_metadata)",
                      implied[m].conflict, m));
    } else if (implied[m].lo > found_dp && implied[m].lo <= kMaxGridSide) {
      dp = std::max<int>(dp, static_cast<int>(implied[m].lo));
    } else if (found_dp > implied[m].hi) {
      problems.push_back(
          fmt::format("model part {}: shard {} found but the flat parameters' lengths allow at most {} "
                      "FSDP ranks",
                      m, found_dp - 1, implied[m].hi));
    }
  }
  return dp;
}

// Each numbered file in its cell; two files claiming one cell are a problem,
// and so is a file without numbers among numbered ones.
void place_files(const std::vector<ManifestFile>& files, const NamedRoles& named,
                 const std::vector<std::vector<int>>& by_part, Grid& grid) {
  grid.cells.assign(grid.mp, std::vector<int>(grid.dp, -1));
  for (int m = 0; m < grid.mp; ++m) {
    for (int index : by_part[m]) {
      const FileRole& role = files[index].role;
      int& cell = grid.cells[m][role.dp_shard.value_or(0)];
      if (cell >= 0) {
        grid.problems.push_back(fmt::format("{} and {} claim the same part {} shard {}", files[cell].path,
                                            files[index].path, m, role.dp_shard.value_or(0)));
        continue;
      }
      cell = index;
    }
  }
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (named.usable[i] && !files[i].role.mp_part && !files[i].role.dp_shard) {
      grid.problems.push_back(files[i].path + ": no model_part/shard number in the name, unlike the other files");
    }
  }
}

// What is missing: a line per part or shard, up to a limit (a grid of a
// million cells with one file must not print a million lines).
void report_missing(Grid& grid, const NamedRoles& named, const DeclaredCount& declared,
                    const std::vector<std::vector<int>>& by_part, const std::vector<WorldSizes>& implied) {
  constexpr std::size_t kMaxMissingLines = 32;
  std::size_t missing = 0;
  auto report = [&](std::string line) {
    if (missing++ < kMaxMissingLines) grid.problems.push_back(std::move(line));
  };
  for (int m = 0; m < grid.mp; ++m) {
    if (by_part[m].empty()) {
      report(fmt::format("model part {} of {} missing{}", m, grid.mp,
                         m >= named.mp ? fmt::format(" ({})", declared.why) : ""));
      continue;
    }
    for (int d = 0; d < grid.dp; ++d) {
      if (grid.cells[m][d] >= 0) continue;
      std::string why = d >= named.dp && !implied[m].because.empty()
                            ? fmt::format(" (the chunk rule: {} need {} ranks)", implied[m].because, implied[m].lo)
                            : "";
      report(fmt::format("shard {} of {} missing for model part {}{}", d, grid.dp, m, why));
    }
  }
  if (missing > kMaxMissingLines) {
    grid.problems.push_back(fmt::format("... and {} more missing part(s) or shard(s)", missing - kMaxMissingLines));
  }
}

// The shards of each part: padding and lengths by the chunk rule, and one
// shard_metadata layout.
void check_shard_layouts(const std::vector<ManifestFile>& files, Grid& grid) {
  for (int m = 0; m < grid.mp; ++m) {
    const ManifestFile* first = nullptr;
    for (int d = 0; d < grid.dp; ++d) {
      int index = grid.cells[m][d];
      if (index < 0) continue;
      const ManifestFile& file = files[index];
      check_fsdp_shard(file, grid.dp, grid.problems);
      if (first == nullptr) {
        first = &file;
      } else if (static_cast<bool>(first->fsdp) != static_cast<bool>(file.fsdp) ||
                 (file.fsdp && !file.fsdp.same_value(first->fsdp) && !same_layout(*first->fsdp, *file.fsdp))) {
        grid.problems.push_back(fmt::format("{}: shard_metadata differs from {} (shards of different checkpoints?)",
                                            file.path, first->path));
      }
    }
  }
}

}  // namespace

Grid detect_grid(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts) {
  if (files.empty()) return {};
  if (std::optional<std::string> mixed = mixed_layouts(files)) {
    Grid grid;
    grid.problems.push_back(*mixed);
    return grid;
  }
  return input_layout(files.front().format).check_set(files, model_parts);
}

std::optional<std::string> mixed_layouts(const std::vector<ManifestFile>& files) {
  for (const ManifestFile& file : files) {
    if (file.format == files.front().format) continue;
    return fmt::format("{} files mixed with {} files ({}): give one kind", input_layout(file.format).name,
                       input_layout(files.front().format).name, file.path);
  }
  return std::nullopt;
}

Grid check_safetensors_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> /*model_parts*/) {
  // A model state dict, no training layout: no grid. A sharded set is one
  // state dict: no name in two files.
  Grid grid;
  std::map<std::string_view, std::string_view> first_file;
  for (const ManifestFile& file : files) {
    for (const StoredTensor& tensor : file.tensors) {
      auto [it, added] = first_file.emplace(tensor.path, file.path);
      if (!added) grid.problems.push_back(fmt::format("{}: {}: also in {}", file.path, tensor.path, it->second));
    }
  }
  return grid;
}

Grid check_torch_set(const std::vector<ManifestFile>& files, std::optional<std::int64_t> model_parts) {
  Grid grid;
  const DeclaredCount declared = declared_part_count(files, model_parts, grid.problems);
  const NamedRoles named = named_roles(files, grid.problems);
  check_archive_roles(files, grid.problems);
  if (!named.any) {
    place_unnumbered(files, declared, grid);
    check_agreement(files, grid, grid.problems);
    return grid;
  }

  grid.mp = part_count(named.mp, declared, grid.problems);
  std::vector<std::vector<int>> by_part = files_by_part(files, named.usable, grid.mp);
  // The shards the flat parameters imply, per part.
  std::vector<WorldSizes> implied(grid.mp);
  for (int m = 0; m < grid.mp; ++m) implied[m] = implied_world_sizes(files, by_part[m]);
  grid.dp = shard_count(named.dp, implied, grid.problems);
  if (static_cast<std::uint64_t>(grid.mp) * static_cast<std::uint64_t>(grid.dp) > kMaxGridCells) {
    grid.problems.push_back(
        fmt::format("{} model parts x {} shards: more than {} cells, too many to be one checkpoint's "
                    "files",
                    grid.mp, grid.dp, kMaxGridCells));
    return grid;
  }
  place_files(files, named, by_part, grid);
  report_missing(grid, named, declared, by_part, implied);
  check_shard_layouts(files, grid);
  check_agreement(files, grid, grid.problems);
  return grid;
}

}  // namespace ckpt
