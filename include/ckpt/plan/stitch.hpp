// `stitch`: a raw FSDP x Megatron training checkpoint (or consolidated parts)
// to one consolidated checkpoint, or one per model part. Plans only.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/plan/output_formats.hpp"
#include "ckpt/plan/plan.hpp"
#include "ckpt/plan/plan_inputs.hpp"

namespace ckpt {

struct StitchOptions {
  bool stitch_megatron = true;  // false: one output per model part
  GlueOptions glue;
  std::optional<DType> dtype;                 // convert floating weights
  bool weights_from_module = false;           // a DeepSpeed set's 16-bit module weights (StateDictOptions)
  std::string state_dict = "model";           // object path of the weights: "model" or an EMA copy in extra_state
  OutputFormat format = OutputFormat::Torch;  // its row: output_formats.hpp
  std::uint64_t max_shard_bytes = 0;          // safetensors and hf: 0 is one file
  // Torch: only what torch.load(weights_only=True) accepts: `model`, and cfg
  // and args as plain values (pyobject.hpp plain_value) unless !keep_cfg.
  bool weights_only = false;
  bool keep_cfg = true;
  // Torch: last_optimizer_state kept, consolidated per parameter: state <i> of
  // the i-th parameter (the state dict's tensors, ties and buffers left out) as
  // torch's optimizer saves it, one param group listing them all.
  bool optimizer_state = false;
  std::vector<std::pair<std::string, nlohmann::ordered_json>> hf_config;  // config.json fields given
  // Keep each output's tensors in StitchPlan::tensors (--dry-run lists them);
  // otherwise each list is empty and the tensors are freed as they are planned.
  bool list_tensors = false;
  // Only the keys this keeps (--filter's regular expression); empty: all. A
  // training set's state dict keys (a kept tie whose tensor is not kept becomes
  // its copy), or a set's flat keys, object items' too (plan_stitch_state_dict).
  std::function<bool(const std::string&)> filter;
};

// With --ema: the object path of the EMA weights in `file` (extra_state's
// ema_fp32_params, else ema); throws Error naming the file when there are none.
std::string ema_state_dict(const ManifestFile& file);

struct StitchPlan {
  Plan plan;
  std::vector<std::vector<NamedTensor>> tensors;  // per output file, the state dict
  std::vector<ReplicatedCheck> checks;
  std::vector<std::string> notes;  // what the output format leaves out, for the user
};

// `output_paths` has one path, or one per model part without stitching (for
// HfOpt: the folder). A torch output carries the other objects (cfg,
// extra_state, ...) of the grid's first file, or without stitching, of its
// part's first file (decoded through `inputs.checkpoint`). Throws Error for an
// incomplete or inconsistent grid, naming what is missing, and for a state dict
// the format cannot hold. `tensors` has one list per planned file.
StitchPlan plan_stitch(const PlanInputs& inputs, const std::vector<std::string>& output_paths,
                       const StitchOptions& options);

// Whether `manifest` is read as one state dict, not a training grid, for an
// output in `format`: a set of a layout that is no training layout (a DCP
// directory, a safetensors set), or one torch file that is no training
// checkpoint (no `model` state dict; or, for a format of tensors alone, a
// `model` of nested dicts).
bool reads_as_one_state_dict(const Manifest& manifest, const OutputFormatInfo& format);

// Such a set's one state dict, as its layout row reads it (one torch file:
// its tensors, keys their object paths joined with '.'), written to
// `output_path`: tensors under their flat keys, or as torch a DCP set nested
// as dcp_to_torch_save nests it (a torch file refuses torch: Error), never
// in a format that reads cfg (hf: Error).
StitchPlan plan_stitch_state_dict(const PlanInputs& inputs, const std::string& output_path,
                                  const StitchOptions& options);

}  // namespace ckpt
