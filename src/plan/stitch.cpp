#include "ckpt/plan/stitch.hpp"
#include "ckpt/manifest/consolidate.hpp"

#include <fmt/format.h>

#include <filesystem>

#include "ckpt/format/pyobject.hpp"
#include "ckpt/layout/hf_opt.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/export.hpp"

namespace ckpt {

std::vector<std::vector<int>> complete_grid(const Manifest& manifest) {
  if (manifest.files.empty()) throw Error("no input files");
  for (const ManifestFile& file : manifest.files) {
    if (file.format == FileFormat::Safetensors) {
      throw Error(Location{file.path, "", std::nullopt},
                  "a safetensors file: stitch and reshard read metaseq's torch checkpoints (inspect, diff and verify "
                  "read safetensors)");
    }
  }
  const auto& problems = manifest.grid.problems;
  if (!problems.empty()) {
    std::string more = problems.size() > 1 ? fmt::format(" (and {} more problem(s): `ckpt-tool verify` lists them)",
                                                         problems.size() - 1)
                                           : "";
    throw Error("the files are not one consistent MP x DP grid: " + problems.front() + more);
  }
  return manifest.grid.cells;
}

std::string ema_state_dict(const ManifestFile& file) {
  for (const char* candidate : {"extra_state/ema_fp32_params", "extra_state/ema"}) {
    std::string prefix = std::string(candidate) + "/";
    for (const ManifestTensor& tensor : file.tensors) {
      if (tensor.path.rfind(prefix, 0) == 0) return candidate;
    }
  }
  throw Error(Location{file.path, "", std::nullopt},
              "--ema: no EMA weights here (extra_state holds neither ema_fp32_params nor ema)");
}

namespace {

void convert_dtype(std::vector<OutputTensor>& tensors, DType dtype) {
  for (OutputTensor& tensor : tensors) {
    if (!tensor.alias_of && dtype_info(tensor.dtype).floating) tensor.dtype = dtype;
  }
}

// Whose other objects each output carries: the grid's first file, or with one
// output per part, each part's first file.
std::vector<const Checkpoint*> stitch_bases(const PlanInputs& inputs, const std::vector<std::vector<int>>& grid,
                                            bool stitch_megatron) {
  std::vector<const Checkpoint*> bases;
  if (stitch_megatron) {
    bases.push_back(&inputs.checkpoint(grid[0][0]));
  } else {
    for (const std::vector<int>& shards : grid) bases.push_back(&inputs.checkpoint(shards[0]));
  }
  return bases;
}

// The consolidated parts glued into one state dict, and the checks of what was
// taken from one part as replicated.
void plan_glued(const std::vector<std::vector<NamedTensor>>& consolidated, const GlueOptions& glue, StitchPlan& out) {
  std::vector<std::string> replicated;
  std::vector<OutputTensor> tensors;
  for (const NamedTensor& tensor : glue_megatron(consolidated, glue, &replicated)) {
    tensors.push_back(as_output(tensor));
  }
  out.tensors.push_back(std::move(tensors));
  out.checks = replicated_checks(consolidated, replicated);
}

// One state dict per consolidated part.
void plan_per_part(const std::vector<std::vector<NamedTensor>>& consolidated, StitchPlan& out) {
  for (const auto& part : consolidated) {
    std::vector<OutputTensor> tensors;
    for (const NamedTensor& tensor : part) tensors.push_back(as_output(tensor));
    out.tensors.push_back(std::move(tensors));
  }
}

// One torch.save output: the base's objects with the state dict replaced.
PlannedFile plan_torch_output(const Checkpoint& base, const std::vector<OutputTensor>& tensors, const std::string& path,
                              const StitchOptions& options, const std::vector<std::uint32_t>& sources, Plan& plan) {
  CheckpointBuilder builder(base);
  pickle::NodeId state_dict = builder.add_state_dict(tensors);
  if (options.weights_only) {
    std::vector<std::pair<std::string, pickle::NodeId>> kept{{"model", state_dict}};
    if (options.stitch_megatron) builder.set_model_parallel_size(1);
    for (const char* config : {"cfg", "args"}) {
      pickle::NodeId node = builder.top_level(config);
      if (options.keep_cfg && node != pickle::kNoNode) kept.emplace_back(config, plain_value(builder.graph(), node));
    }
    for (const std::string& key : builder.top_level_keys()) builder.drop_top_level(key);
    for (const auto& [key, node] : kept) builder.set_top_level(key, node);
    return builder.finish(path, sources, plan);
  }
  builder.set_top_level("model", state_dict);
  builder.drop_top_level("shard_metadata");
  builder.drop_top_level("last_optimizer_state");
  if (options.stitch_megatron) builder.set_model_parallel_size(1);
  return builder.finish(path, sources, plan);
}

// A Hugging Face OPT folder: the state dict under transformers' names as
// safetensors, and config.json.
void plan_hf_folder(const Checkpoint& base, const std::vector<OutputTensor>& tensors, const std::string& folder,
                    const StitchOptions& options, const std::vector<std::uint32_t>& sources, StitchPlan& out) {
  HfOptModel model = to_hf_opt(tensors);
  const std::vector<OutputTensor>& renamed = model.tensors;
  nlohmann::ordered_json config = hf_opt_config(renamed, model.tied_embeddings, base, options.hf_config);
  std::filesystem::path dir(folder);
  for (auto& file :
       plan_safetensors(renamed, {(dir / "model.safetensors").string(), options.max_shard_bytes}, sources, out.plan)) {
    out.tensors.push_back(std::move(file));
  }
  out.plan.files.push_back(plan_text_file((dir / "config.json").string(), config.dump(2) + "\n"));
  out.tensors.emplace_back();
}

}  // namespace

StitchPlan plan_stitch(const PlanInputs& inputs, const std::vector<std::string>& output_paths,
                       const StitchOptions& options) {
  const Manifest& manifest = inputs.manifest();
  std::vector<std::vector<int>> grid = complete_grid(manifest);
  std::vector<const Checkpoint*> bases = stitch_bases(inputs, grid, options.stitch_megatron);

  std::vector<std::vector<NamedTensor>> consolidated;
  for (const std::vector<int>& shards : grid) {
    consolidated.push_back(consolidate_part(manifest, shards, options.state_dict));
  }

  StitchPlan out;
  if (options.stitch_megatron) {
    plan_glued(consolidated, options.glue, out);
  } else {
    plan_per_part(consolidated, out);
  }
  if (output_paths.size() != out.tensors.size() || bases.size() != out.tensors.size()) {
    internal_error(fmt::format("{} outputs planned for {} paths", out.tensors.size(), output_paths.size()));
  }

  std::vector<std::uint32_t> sources;
  for (const MappedFile* file : inputs.files()) sources.push_back(out.plan.add_source(*file));
  std::vector<std::vector<OutputTensor>> state_dicts = std::move(out.tensors);
  out.tensors.clear();
  for (std::size_t k = 0; k < state_dicts.size(); ++k) {
    std::vector<OutputTensor>& tensors = state_dicts[k];
    if (options.dtype) convert_dtype(tensors, *options.dtype);
    switch (options.format) {
      case OutputFormat::Torch:
        out.plan.files.push_back(plan_torch_output(*bases[k], tensors, output_paths[k], options, sources, out.plan));
        out.tensors.push_back(std::move(tensors));
        break;
      case OutputFormat::Safetensors:
        for (auto& file : plan_safetensors(tensors, {output_paths[k], options.max_shard_bytes}, sources, out.plan))
          out.tensors.push_back(std::move(file));
        break;
      case OutputFormat::HfOpt: plan_hf_folder(*bases[k], tensors, output_paths[k], options, sources, out); break;
    }
  }
  return out;
}

}  // namespace ckpt
