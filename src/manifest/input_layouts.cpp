// The table of input layouts, and the state-dict readers of its rows.
#include "ckpt/manifest/input_layouts.hpp"

#include <fmt/format.h>

#include <array>

namespace ckpt {

namespace {

bool claims_safetensors(std::string_view path) {
  return is_safetensors_path(path);
}
bool claims_any(std::string_view /*path*/) {
  return true;
}
ManifestFile describe_torch_file(FileDescriber& describer, const std::string& path) {
  return describer.describe_torch(path);
}

// In the order input_layout_of_path asks them: the last row takes every path.
const std::array<InputLayout, 2> kLayouts = {{
    {FileFormat::Safetensors, "safetensors", claims_safetensors, describe_safetensors_file, check_safetensors_set,
     safetensors_state_dict, count_safetensors_model, /*has_crcs=*/false, /*training=*/false},
    {FileFormat::Torch, "torch", claims_any, describe_torch_file, check_torch_set, torch_state_dict, count_torch_model,
     /*has_crcs=*/true, /*training=*/true},
}};

}  // namespace

const InputLayout& input_layout(FileFormat format) {
  for (const InputLayout& layout : kLayouts) {
    if (layout.format == format) return layout;
  }
  internal_error(fmt::format("no input layout for file format {}", static_cast<int>(format)));
}

const InputLayout& input_layout_of_path(std::string_view path) {
  for (const InputLayout& layout : kLayouts) {
    if (layout.claims(path)) return layout;
  }
  internal_error("no input layout takes " + std::string(path));
}

const InputLayout& input_layout(const Manifest& manifest) {
  return input_layout(manifest.files.empty() ? FileFormat::Torch : manifest.files.front().format);
}

std::vector<std::vector<int>> complete_grid(const Manifest& manifest) {
  if (manifest.files.empty()) throw Error("no input files");
  for (const ManifestFile& file : manifest.files) {
    const InputLayout& layout = input_layout(file.format);
    if (!layout.training) {
      throw Error(Location{file.path, "", std::nullopt},
                  fmt::format("a {} file: stitch and reshard read metaseq's torch checkpoints (inspect, diff and "
                              "verify read {})",
                              layout.name, layout.name));
    }
  }
  const auto& problems = manifest.grid.problems;
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

StateDict torch_state_dict(const Manifest& manifest, const StateDictOptions& options) {
  StateDict out;
  if (manifest.files.size() == 1 && !(options.state_dict_only && manifest.files[0].fsdp)) {
    // One file as it is: every tensor at its path. Against a state dict (another
    // layout or naming), a tie pickled as two tensor objects over the same view
    // (model.state_dict()) is a tie, as stitch writes it.
    const ManifestFile& file = manifest.files[0];
    DistinctViews views;
    for (const ManifestTensor& tensor : file.tensors) {
      if (!tensor.alias_of.empty()) {
        out.tensors.push_back({tensor.path, {}, tensor.alias_of});
      } else if (const ManifestTensor* tie = options.state_dict_only ? views.tied_to(tensor) : nullptr) {
        out.tensors.push_back({tensor.path, {}, tie->path});
      } else {
        out.tensors.push_back({tensor.path, source_of(tensor, file.place(tensor).file_byte_offset, 0), std::nullopt});
      }
    }
    return out;
  }
  out.consolidated = true;
  std::vector<std::vector<NamedTensor>> parts = consolidate_grid(manifest, complete_grid(manifest));
  std::vector<std::string> replicated;
  for (NamedTensor& tensor : glue_megatron(parts, {}, &replicated)) {
    tensor.name = state_dict_path(kModelPrefix, tensor.name);
    if (tensor.alias_of) tensor.alias_of = state_dict_path(kModelPrefix, *tensor.alias_of);
    out.tensors.push_back(std::move(tensor));
  }
  out.checks = replicated_checks(parts, replicated);
  return out;
}

StateDict safetensors_state_dict(const Manifest& manifest, const StateDictOptions& /*options*/) {
  if (!manifest.grid.problems.empty()) throw Error(ErrorKind::IncompleteSet, manifest.grid.problems.front());
  StateDict out;
  const auto& files = manifest.files;
  for (std::size_t i = 0; i < files.size(); ++i) {
    for (const ManifestTensor& tensor : files[i].tensors) {
      out.tensors.push_back(
          {tensor.path, source_of(tensor, files[i].place(tensor).file_byte_offset, static_cast<std::uint32_t>(i))});
    }
  }
  return out;
}

}  // namespace ckpt
