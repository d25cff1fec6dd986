#include "ckpt/plan/output_formats.hpp"

#include <fmt/format.h>

#include <array>
#include <string>
#include <vector>

#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

constexpr std::array<OutputFormatInfo, 4> kOutputFormats{{
    {.format = OutputFormat::Torch,
     .name = "torch",
     .label = "a torch.save file",
     .summary = "a torch.save file carrying the input's other objects",
     .extension = "",
     .folder = false,
     .shardable = false,
     .carries_objects = true,
     .per_part = true,
     .fused_qkv = true,
     .hf_config = false,
     .replaces_set = false,
     .plan = plan_torch_state_dict},
    {.format = OutputFormat::Safetensors,
     .name = "safetensors",
     .label = "a safetensors file",
     .summary = "the state dict alone",
     .extension = ".safetensors",
     .folder = false,
     .shardable = true,
     .carries_objects = false,
     .per_part = true,
     .fused_qkv = true,
     .hf_config = false,
     .replaces_set = true,
     .plan = plan_safetensors_state_dict},
    {.format = OutputFormat::HfOpt,
     .name = "hf",
     .label = "a Hugging Face OPT folder",
     .summary = "a folder of safetensors under transformers' OPT names and config.json",
     .extension = "",
     .folder = true,
     .shardable = true,
     .carries_objects = false,
     .per_part = false,
     .fused_qkv = false,
     .hf_config = true,
     .replaces_set = true,
     .plan = plan_hf_opt_state_dict},
    {.format = OutputFormat::Dcp,
     .name = "dcp",
     .label = "a DCP directory",
     .summary = "a PyTorch Distributed Checkpoint directory (torch 2.x) that torch's DCP loader reads into any world "
                "size",
     .extension = "",
     .folder = true,
     .shardable = true,
     .carries_objects = false,
     .per_part = false,
     .fused_qkv = true,
     .hf_config = false,
     .replaces_set = false,
     .plan = plan_dcp_state_dict},
}};

constexpr bool formats_in_order() {
  for (std::size_t i = 0; i < kOutputFormats.size(); ++i) {
    if (static_cast<std::size_t>(kOutputFormats[i].format) != i) return false;
  }
  return true;
}
static_assert(formats_in_order(), "kOutputFormats: one row per OutputFormat, in the enum's order");

// The format -o implies when its extension names none.
constexpr OutputFormat kDefaultFormat = OutputFormat::Torch;

// "safetensors or hf": the names of the rows `keep` holds for.
template <typename Predicate>
std::string names_where(Predicate keep) {
  std::vector<std::string> names;
  for (const OutputFormatInfo& row : kOutputFormats) {
    if (keep(row)) names.emplace_back(row.name);
  }
  std::string text;
  for (std::size_t i = 0; i < names.size(); ++i) {
    text += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
  }
  return text;
}

[[noreturn]] void refuse(std::string_view flag, std::string_view because) {
  throw Error(ErrorKind::Usage, fmt::format("{} {}", flag, because));
}

}  // namespace

std::span<const OutputFormatInfo> output_formats() {
  return kOutputFormats;
}

const OutputFormatInfo& format_info(OutputFormat format) {
  return kOutputFormats[static_cast<std::size_t>(format)];
}

const OutputFormatInfo& choose_output_format(std::string_view name, std::string_view output) {
  for (const OutputFormatInfo& row : kOutputFormats) {
    bool implied = name.empty() && *row.extension != '\0' && output.ends_with(row.extension);
    if (row.name == name || implied) return row;
  }
  if (name.empty()) return format_info(kDefaultFormat);
  refuse("--format", fmt::format("takes {}, not {}", names_where([](const OutputFormatInfo&) { return true; }), name));
}

std::string output_formats_help() {
  std::string text;
  for (const OutputFormatInfo& row : kOutputFormats) {
    std::string default_when = row.format == kDefaultFormat ? " (default)"
                               : *row.extension != '\0' ? fmt::format(" (default when -o ends in {})", row.extension)
                                                        : "";
    text += fmt::format("{}{}{}: {}", text.empty() ? "" : "; ", row.name, default_when, row.summary);
  }
  return text;
}

std::string format_names_where(bool OutputFormatInfo::*column) {
  return names_where([column](const OutputFormatInfo& row) { return row.*column; });
}

void check_output_flags(const OutputFormatInfo& format, const OutputFlags& flags) {
  if (flags.max_shard_size && !format.shardable) {
    refuse("--max-shard-size", "needs --format " + format_names_where(&OutputFormatInfo::shardable));
  }
  if (flags.weights_only && !format.carries_objects) {
    refuse("--weights-only", fmt::format("is for --format {} ({} holds weights only anyway)",
                                         format_names_where(&OutputFormatInfo::carries_objects), format.name));
  }
  if (flags.no_cfg && !flags.weights_only) refuse("--no-cfg", "needs --weights-only");
  if (flags.optimizer_state && (!format.carries_objects || flags.weights_only)) {
    refuse("--optimizer-state", fmt::format("is for --format {} without --weights-only",
                                            format_names_where(&OutputFormatInfo::carries_objects)));
  }
  if (flags.optimizer_state && flags.ema) refuse("--optimizer-state", "is the state of the weights, not of --ema's");
  if (flags.hf_config && !format.hf_config) {
    refuse("--hf-config", "needs --format " + format_names_where(&OutputFormatInfo::hf_config));
  }
  if (flags.no_stitch_megatron && !format.per_part) {
    refuse("--no-stitch-megatron",
           fmt::format("does not go with --format {}: {} is the whole model", format.name, format.label));
  }
  if (flags.fused_qkv && !format.fused_qkv) {
    refuse("--fused-qkv",
           fmt::format("does not go with --format {}: {} has separate q, k and v", format.name, format.label));
  }
  if (!format.folder && *format.extension != '\0' && !flags.output.ends_with(format.extension)) {
    refuse("-o", fmt::format("must end in {} with --format {}", format.extension, format.name));
  }
}

}  // namespace ckpt
