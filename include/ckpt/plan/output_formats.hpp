// The output formats of `stitch`, one table: a row per format says what the
// format is (file or folder, the extension -o takes), which of stitch's flags go
// with it, and which plan function writes one state dict in it. The CLI derives
// --format's choices and help, the default from -o and every refusal of a flag
// from the rows; plan_stitch looks the row up. A new format is one row here and
// one plan function (docs/design.md, "Adding an output format").
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/input_layouts.hpp"

namespace ckpt {

struct StitchOptions;
struct StitchPlan;

enum class OutputFormat : std::uint8_t {
  Torch,        // torch.save, the input's other objects carried
  Safetensors,  // the state dict alone (export.hpp)
  HfOpt,        // a folder OPTForCausalLM.from_pretrained loads (hf_opt.hpp, export.hpp)
  Dcp,          // a PyTorch Distributed Checkpoint directory (dcp_output.cpp)
};

// Each optimizer state of an output, by name: the consolidated parameters.
using OptimizerStates = std::vector<std::pair<std::string, std::vector<NamedTensor>>>;

// One state dict to plan in a format.
struct StateDictOutput {
  // The input whose other objects a torch output carries (hf reads its cfg);
  // null for a set of a layout that is no training checkpoint (DCP,
  // safetensors): a torch output is then `nested`.
  const Checkpoint* base;
  std::vector<NamedTensor> tensors;
  const std::string& path;                    // the file, or for a folder format the folder
  const OptimizerStates* optimizer_states;    // --optimizer-state, else nullptr
  const std::vector<std::uint32_t>& sources;  // plan source of manifest file i
  // With base null: the set as torch's loader nests it (StateDict::items, a
  // tensor item indexing `tensors`), its object items read from `files`.
  const StateDict* nested = nullptr;
  const std::vector<const MappedFile*>* files = nullptr;
  // --optimizer-state of such a set (DeepSpeed): `tensors` under "model" and
  // the states in torch's form, their other objects read from `states_file`.
  const ParameterStates* parameter_states = nullptr;
  const Checkpoint* states_file = nullptr;
};

// Adds the output's files to `out.plan`, the tensors of each file in its data
// order to `out.tensors` (one list per planned file) and what the format leaves
// out to `out.notes`. Throws Error for a state dict the format cannot hold.
using PlanStateDict = void (*)(StateDictOutput output, const StitchOptions& options, StitchPlan& out);

struct OutputFormatInfo {
  OutputFormat format;
  const char* name;       // --format NAME
  const char* label;      // in messages: "a Hugging Face OPT folder"
  const char* summary;    // in --format's help: what it writes
  const char* extension;  // "" or what -o must end in, and an -o ending in it is this format by default
  bool folder;            // -o names a folder, created if missing (Plan::directories)
  bool shardable;         // --max-shard-size
  bool carries_objects;   // cfg, optimizer state: --weights-only, --no-cfg, --optimizer-state
  bool per_part;          // one output per model part (--no-stitch-megatron)
  bool fused_qkv;         // keeps a fused qkv_proj (--fused-qkv)
  bool hf_config;         // writes config.json, whose fields --hf-config sets
  bool replaces_set;      // files of another safetensors set beside it are stale (Plan::stale_files)
  PlanStateDict plan;
};

// The rows, in OutputFormat's order.
std::span<const OutputFormatInfo> output_formats();
const OutputFormatInfo& format_info(OutputFormat format);

// --format NAME, or with `name` empty the format `output` (-o) implies by its
// extension, else torch. Throws Error (usage) for an unknown name.
const OutputFormatInfo& choose_output_format(std::string_view name, std::string_view output);

// --format's help: every name, the default, what each writes.
std::string output_formats_help();

// "safetensors or hf": the names of the formats where `column` holds, for
// messages and help.
std::string format_names_where(bool OutputFormatInfo::*column);

// The flags of `stitch` that depend on the output format, as given.
struct OutputFlags {
  std::string output;  // -o
  bool max_shard_size = false;
  bool weights_only = false;
  bool no_cfg = false;
  bool optimizer_state = false;
  bool ema = false;
  bool hf_config = false;
  bool no_stitch_megatron = false;
  bool fused_qkv = false;
};

// Throws Error (usage) naming the first flag that does not go with `format`
// (or with another flag given) and why; the checks run in a fixed order.
void check_output_flags(const OutputFormatInfo& format, const OutputFlags& flags);

// The plan functions of the rows: torch (stitch.cpp), safetensors and a Hugging
// Face OPT folder (export.cpp), DCP (dcp_output.cpp).
void plan_torch_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out);
void plan_safetensors_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out);
void plan_hf_opt_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out);
void plan_dcp_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out);

}  // namespace ckpt
