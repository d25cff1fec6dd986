// The table of input layouts, and the state-dict readers of its rows.
#include "ckpt/manifest/input_layouts.hpp"

#include <fmt/format.h>

#include <glob.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <tuple>

#include "ckpt/format/safetensors.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest_json.hpp"

namespace ckpt {

namespace {

namespace fs = std::filesystem;

bool claims_safetensors(std::string_view path) {
  return is_safetensors_path(path);
}
bool claims_none(std::string_view /*path*/) {
  return false;
}
ManifestFile describe_torch_file(FileDescriber& describer, const std::string& path) {
  return describer.describe_torch(path);
}
std::vector<ZipRecord> torch_crc_records(const MappedFile& file, FileDescriber& /*describer*/) {
  return ZipArchive(file).records();  // every record, the pickle's too
}

// The regular files of folder `input` whose extension is `extension`; nullopt
// when `input` is not a folder. A symbolic link named so that cannot be
// followed (dangling, a loop) is kept: opening it names it, where skipping it
// would read a set without one of its files.
std::optional<std::vector<std::string>> folder_files(const std::string& input, std::string_view extension) {
  std::error_code ec;
  if (!fs::is_directory(input, ec)) return std::nullopt;
  fs::directory_iterator entries(input, ec);
  if (ec) throw Error(ErrorKind::Io, Location{input, "", std::nullopt}, "cannot list the directory: " + ec.message());
  std::vector<std::string> files;
  for (const auto& entry : entries) {
    std::error_code entry_ec;
    if (entry.path().extension() != extension) continue;
    bool broken_link = entry.is_symlink(entry_ec) && !fs::exists(entry.path(), entry_ec);
    if (entry.is_regular_file(entry_ec) || broken_link) files.push_back(entry.path());
  }
  return files;
}

std::optional<std::vector<std::string>> torch_files_in(const std::string& input) {
  std::optional<std::vector<std::string>> files = folder_files(input, ".pt");
  if (!files || files->empty()) return std::nullopt;
  return files;
}

// The safetensors index `input` is or holds (a folder of *.pt files holds
// none: a training checkpoint's). Throws Error naming the folder when it holds
// two sets (model.safetensors beside an index, two indexes).
std::optional<std::string> safetensors_index_of(const std::string& input) {
  std::error_code ec;
  if (input.ends_with(".safetensors.index.json") && fs::is_regular_file(input, ec)) return input;
  if (!fs::is_directory(input, ec)) return std::nullopt;
  std::optional<std::string> found;
  fs::directory_iterator entries(input, ec);
  if (ec) return std::nullopt;
  for (const auto& entry : entries) {
    std::string name = entry.path().filename().string();
    if (entry.path().extension() == ".pt") return std::nullopt;
    if (!name.ends_with(".safetensors.index.json")) continue;
    std::string single = name.substr(0, name.size() - std::string_view(".index.json").size());
    if (fs::exists(fs::path(input) / single, ec)) {
      throw Error(Location{input, "", std::nullopt},
                  fmt::format("both {} and {} here: two sets of weights, and readers differ on which they load "
                              "(transformers takes {}); remove the stale one",
                              single, name, single));
    }
    if (found) {
      throw Error(Location{input, "", std::nullopt},
                  "more than one *.safetensors.index.json here: give the index of the set to read");
    }
    found = entry.path().string();
  }
  return found;
}

std::optional<std::vector<std::string>> safetensors_files_in(const std::string& input) {
  if (std::optional<std::string> index = safetensors_index_of(input)) {
    std::vector<std::string> files = safetensors_index_files(*index);
    // A file the index names that is not there: the set is incomplete (not an
    // I/O error of one file).
    for (const std::string& file : files) {
      std::error_code ec;
      if (!fs::exists(file, ec) && !fs::is_symlink(file, ec)) {
        throw Error(
            ErrorKind::IncompleteSet, Location{*index, "", std::nullopt},
            fmt::format("names {}, which is not there: the set is incomplete", fs::path(file).filename().string()));
      }
    }
    return files;
  }
  std::optional<std::vector<std::string>> files = folder_files(input, ".safetensors");
  if (!files || files->empty()) return std::nullopt;
  // Shards of a sharded set are read through its index: without one (a run
  // killed before writing it, a copy that left it out) the set cannot be known
  // to be complete.
  for (const std::string& path : *files) {
    if (safetensors_shard_stem(fs::path(path).filename().string())) {
      throw Error(ErrorKind::IncompleteSet, Location{input, "", std::nullopt},
                  fmt::format("{} is a shard of a set, but the folder holds no *.safetensors.index.json: the "
                              "set may be incomplete (name its files to read them anyway)",
                              fs::path(path).filename().string()));
    }
  }
  return files;
}

std::vector<std::string> safetensors_index_problems_of(const std::string& input,
                                                       const std::vector<ManifestFile>& files) {
  std::optional<std::string> index = safetensors_index_of(input);
  return index ? safetensors_index_problems(*index, files) : std::vector<std::string>{};
}

// In the order a folder is searched (files_in); input_layout_of_path asks
// every row's claims, the fallback row last.
const std::array<InputLayout, 4> kLayouts = {{
    {FileFormat::Dcp, "dcp", claims_dcp, /*fallback=*/false, dcp_files_in, nullptr, describe_dcp_file, check_dcp_set,
     dcp_state_dict, count_dcp_model, /*has_crcs=*/true, /*training=*/false, dcp_crc_records, dcp_summary,
     dcp_object_items, /*ties_as_copies=*/true},
    {FileFormat::DeepSpeed, "deepspeed", claims_deepspeed, /*fallback=*/false, deepspeed_files_in, nullptr,
     describe_deepspeed_file, check_deepspeed_set, deepspeed_state_dict, count_deepspeed_model, /*has_crcs=*/true,
     /*training=*/false, torch_crc_records, deepspeed_summary, nullptr, /*ties_as_copies=*/false,
     /*module_weights=*/true, deepspeed_parameter_states},
    {FileFormat::Torch, "torch", claims_none, /*fallback=*/true, torch_files_in, nullptr, describe_torch_file,
     check_torch_set, torch_state_dict, count_torch_model, /*has_crcs=*/true, /*training=*/true, torch_crc_records},
    {FileFormat::Safetensors, "safetensors", claims_safetensors, /*fallback=*/false, safetensors_files_in,
     safetensors_index_problems_of, describe_safetensors_file, check_safetensors_set, safetensors_state_dict,
     count_safetensors_model, /*has_crcs=*/false, /*training=*/false},
}};

}  // namespace

std::span<const InputLayout> input_layouts() {
  return kLayouts;
}

const InputLayout& input_layout(FileFormat format) {
  for (const InputLayout& layout : kLayouts) {
    if (layout.format == format) return layout;
  }
  internal_error(fmt::format("no input layout for file format {}", static_cast<int>(format)));
}

const InputLayout& input_layout_of_path(std::string_view path) {
  const InputLayout* fallback = nullptr;
  for (const InputLayout& layout : kLayouts) {
    if (layout.claims(path)) return layout;
    if (layout.fallback) fallback = &layout;
  }
  check_invariant(fallback != nullptr, "no input layout takes every path");
  return *fallback;
}

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    std::error_code ec;
    if (inputs.size() > 1 && looks_like_manifest(input)) {
      throw Error(ErrorKind::Usage, Location{input, "", std::nullopt},
                  "a manifest is the whole input set: give it alone, or give the checkpoint files without it");
    }
    std::optional<std::vector<std::string>> named;
    for (const InputLayout& layout : kLayouts) {
      if ((named = layout.files_in(input))) break;
    }
    if (named) {
      files.insert(files.end(), named->begin(), named->end());
    } else if (fs::is_directory(input, ec)) {
      continue;  // a folder of no layout's files: "no input files" below, unless other inputs name some
    } else if (fs::exists(input, ec) || input.find_first_of("*?[") == std::string::npos) {
      files.push_back(input);  // a missing plain name is reported when it is opened
    } else {
      glob_t matches{};
      int rc = ::glob(input.c_str(), 0, nullptr, &matches);
      if (rc == 0) {
        for (std::size_t i = 0; i < matches.gl_pathc; ++i) files.emplace_back(matches.gl_pathv[i]);
      }
      globfree(&matches);
      if (rc != 0) throw Error(Location{input, "", std::nullopt}, "no file matches this pattern");
    }
  }
  auto key = [](const std::string& path) {
    FileRole role = parse_file_role(path);
    return std::make_tuple(role.mp_part.value_or(-1), role.dp_shard.value_or(-1), path);
  };
  std::sort(files.begin(), files.end(), [&](const std::string& a, const std::string& b) { return key(a) < key(b); });
  files.erase(std::unique(files.begin(), files.end()), files.end());
  if (files.empty()) {
    throw Error(
        "no input files (directories are searched for a DCP .metadata, else a DeepSpeed `latest` or step folder, else "
        "*.pt, else *.safetensors files)");
  }
  return files;
}

std::vector<std::string> index_problems(const std::vector<std::string>& inputs,
                                        const std::vector<ManifestFile>& files) {
  std::vector<std::string> problems;
  for (const std::string& input : inputs) {
    for (const InputLayout& layout : kLayouts) {
      if (layout.index_problems == nullptr) continue;
      for (std::string& problem : layout.index_problems(input, files)) problems.push_back(std::move(problem));
    }
  }
  return problems;
}

const InputLayout& input_layout(const Manifest& manifest) {
  return input_layout(manifest.files.empty() ? FileFormat::Torch : manifest.files.front().format);
}

std::vector<std::vector<int>> complete_grid(const Manifest& manifest) {
  if (manifest.files.empty()) throw Error("no input files");
  if (std::optional<std::string> mixed = mixed_layouts(manifest.files)) throw Error(*mixed);
  const auto& problems = manifest.grid.problems;
  for (const ManifestFile& file : manifest.files) {
    const InputLayout& layout = input_layout(file.format);
    if (!layout.training) {
      throw Error(Location{file.path, "", std::nullopt},
                  fmt::format("a {} file: reshard cuts a metaseq training checkpoint, and a {} set is one state "
                              "dict (stitch writes it as torch, safetensors or dcp)",
                              layout.name, layout.name));
    }
  }
  if (!problems.empty()) {
    std::string more = problems.size() > 1 ? fmt::format(" (and {} more problem(s): `ckpt-tool verify` lists them)",
                                                         problems.size() - 1)
                                           : "";
    throw Error(ErrorKind::IncompleteSet, "the files are not one consistent MP x DP grid: " + problems.front() + more);
  }
  return manifest.grid.cells;
}

std::vector<std::vector<NamedTensor>> consolidate_grid(const Manifest& manifest,
                                                       const std::vector<std::vector<int>>& grid,
                                                       const std::string& state_dict) {
  std::vector<std::vector<NamedTensor>> parts;
  for (const std::vector<int>& shards : grid) parts.push_back(consolidate_part(manifest, shards, state_dict));
  return parts;
}

std::vector<ReplicatedCheck> data_parallel_checks(const Manifest& manifest, const std::vector<std::vector<int>>& grid,
                                                  const std::string& state_dict) {
  std::vector<ReplicatedCheck> checks;
  const std::string prefix = state_dict + "/";
  for (const std::vector<int>& shards : grid) {
    if (shards.size() < 2) continue;
    const ManifestFile& first = manifest.files.at(static_cast<std::size_t>(shards[0]));
    if (is_flattened(first, prefix)) continue;
    for (const auto& [key, tensor] : state_dict_tensors(first, prefix)) {
      if (tensor->alias_of) continue;
      ReplicatedCheck check{key, {}, "data-parallel shard"};
      for (int index : shards) {
        const ManifestFile& shard = manifest.files.at(static_cast<std::size_t>(index));
        const StoredTensor* copy = find_tensor(shard, tensor->path);
        if (copy == nullptr) break;  // the set check reports a shard without it
        check.parts.push_back(source_of(*copy, shard, static_cast<std::uint32_t>(index)));
      }
      if (check.parts.size() == shards.size()) checks.push_back(std::move(check));
    }
  }
  return checks;
}

StateDict torch_state_dict(const Manifest& manifest, const StateDictOptions& options) {
  StateDict out;
  if (manifest.files.size() == 1 && !(options.state_dict_only && manifest.files[0].fsdp)) {
    // One file as it is: every tensor at its path. Against a state dict (another
    // layout or naming), a tie pickled as two tensor objects over the same view
    // (model.state_dict()) is a tie, as stitch writes it.
    const ManifestFile& file = manifest.files[0];
    DistinctViews views;
    for (const StoredTensor& tensor : file.tensors) {
      if (tensor.alias_of) {
        out.tensors.push_back({tensor.path, {}, tensor.alias_of});
      } else if (const StoredTensor* tie = options.state_dict_only ? views.tied_to(tensor) : nullptr) {
        out.tensors.push_back({tensor.path, {}, tie->path});
      } else {
        out.tensors.push_back({tensor.path, source_of(tensor, file, 0), std::nullopt});
      }
    }
    return out;
  }
  out.consolidated = true;
  std::vector<std::vector<int>> grid = complete_grid(manifest);
  std::vector<std::vector<NamedTensor>> parts = consolidate_grid(manifest, grid);
  for (NamedTensor& tensor : glue_and_check(std::move(parts), {}, out.checks)) {
    tensor.name = state_dict_path(kModelPrefix, tensor.name);
    if (tensor.alias_of) tensor.alias_of = state_dict_path(kModelPrefix, *tensor.alias_of);
    out.tensors.push_back(std::move(tensor));
  }
  for (ReplicatedCheck& check : data_parallel_checks(manifest, grid)) out.checks.push_back(std::move(check));
  return out;
}

StateDict safetensors_state_dict(const Manifest& manifest, const StateDictOptions& /*options*/) {
  if (!manifest.grid.problems.empty()) throw Error(ErrorKind::IncompleteSet, manifest.grid.problems.front());
  StateDict out;
  const auto& files = manifest.files;
  for (std::size_t i = 0; i < files.size(); ++i) {
    for (const StoredTensor& tensor : files[i].tensors) {
      out.tensors.push_back({tensor.path, source_of(tensor, files[i], static_cast<std::uint32_t>(i))});
    }
  }
  return out;
}

namespace {

std::string joined(const KeyPath& path, char separator, bool labels) {
  std::string out;
  for (const auto& element : path) {
    if (!out.empty()) out += separator;
    const auto* key = std::get_if<std::string>(&element);
    if (key == nullptr) {
      out += std::to_string(std::get<std::int64_t>(element));
    } else {
      out += labels ? escape_label(*key) : *key;
    }
  }
  return out;
}

}  // namespace

std::string object_path(const KeyPath& path) {
  return joined(path, '/', /*labels=*/true);
}

std::string flat_key(const KeyPath& path) {
  return joined(path, '.', /*labels=*/false);
}

}  // namespace ckpt
