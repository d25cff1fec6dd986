// ckpt-tool stitch INPUT... -o OUT.pt
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <regex>
#include <set>

#include "ckpt/io/output_file.hpp"
#include "ckpt/plan/output_formats.hpp"
#include "ckpt/plan/reshard.hpp"
#include "ckpt/plan/stitch.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "usage.hpp"

namespace ckpt::cli {

namespace {

// The output format flags into `stitch`; UsageError for flags that do not go together.
template <typename Options>
const OutputFormatInfo& set_format(const Options& options, StitchOptions& stitch) {
  const OutputFormatInfo& format = choose_output_format(options.format, options.output);
  // A bad size is reported before a flag that does not go with the format.
  if (options.max_shard_size_given && format.shardable) {
    stitch.max_shard_bytes = parse_byte_size(options.max_shard_size, "--max-shard-size");
  }
  check_output_flags(format, {.output = options.output,
                              .max_shard_size = options.max_shard_size_given,
                              .weights_only = options.weights_only,
                              .no_cfg = options.no_cfg,
                              .optimizer_state = options.optimizer_state,
                              .ema = options.ema,
                              .hf_config = !options.hf_config.empty(),
                              .no_stitch_megatron = options.no_stitch_megatron,
                              .fused_qkv = options.fused_qkv});
  stitch.format = format.format;
  stitch.optimizer_state = options.optimizer_state;
  stitch.weights_only = options.weights_only;
  stitch.keep_cfg = !options.no_cfg;
  for (const std::string& item : options.hf_config) {
    std::size_t equals = item.find('=');
    if (equals == std::string::npos || equals == 0) throw UsageError("--hf-config takes KEY=VALUE");
    std::string value = item.substr(equals + 1);
    nlohmann::ordered_json parsed = nlohmann::ordered_json::parse(value, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded()) parsed = value;  // a bare word is a string
    stitch.hf_config.emplace_back(item.substr(0, equals), std::move(parsed));
  }
  return format;
}

}  // namespace

Action add_stitch_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string tag;
    std::string output;
    bool no_stitch_megatron = false;
    bool fused_qkv = false;
    std::string dtype;
    WriteFlags write;
    bool ema = false;
    std::string format;  // "": implied by -o's extension (choose_output_format)
    std::string max_shard_size;
    bool weights_only = false;
    bool no_cfg = false;
    bool optimizer_state = false;
    std::string weights_from = "fp32";
    bool max_shard_size_given = false;
    std::vector<std::string> hf_config;
    std::optional<std::regex> filter;  // compiled while parsing: a bad one is a usage error
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs,
                 "shard files, globs, directories, or a manifest written by `ckpt-tool manifest`")
      ->required();
  add_tag_flag(app, options->tag);
  app.add_option(
         "-o,--output", options->output,
         fmt::format("output file (--format {}: a folder); with --no-stitch-megatron a pattern containing {{m}}",
                     format_names_where(&OutputFormatInfo::folder)))
      ->required();
  std::vector<std::string> format_names;
  for (const OutputFormatInfo& format : output_formats()) format_names.emplace_back(format.name);
  app.add_option("--format", options->format, output_formats_help())->check(CLI::IsMember(format_names));
  app.add_option_function<std::string>(
      "--max-shard-size",
      [options](const std::string& size) {
        options->max_shard_size = size;
        options->max_shard_size_given = true;
      },
      format_names_where(&OutputFormatInfo::shardable) +
          ": at most this many tensor bytes per file (5GB, 500MB, 2GiB), files named "
          "<stem>-00001-of-0000N.safetensors beside <stem>.safetensors.index.json");
  app.add_flag("--weights-only", options->weights_only,
               format_names_where(&OutputFormatInfo::carries_objects) +
                   ": write only the state dict and cfg as plain values, what torch.load(weights_only=True) reads");
  app.add_flag("--no-cfg", options->no_cfg, "with --weights-only: drop cfg and args too");
  app.add_flag("--optimizer-state", options->optimizer_state,
               format_names_where(&OutputFormatInfo::carries_objects) +
                   ": keep last_optimizer_state, consolidated per parameter as torch's optimizer saves it "
                   "(reshard cuts it again with the weights); of a DeepSpeed checkpoint, Adam's moments so, beside "
                   "the state dict under `model`");
  app.add_option("--hf-config", options->hf_config,
                 format_names_where(&OutputFormatInfo::hf_config) +
                     ": set a config.json field, KEY=VALUE (VALUE as JSON, else a string); repeatable");
  app.add_flag("--no-stitch-megatron", options->no_stitch_megatron, "write one consolidated file per model part");
  app.add_flag("--fused-qkv", options->fused_qkv, "keep one qkv_proj per layer, laid out [k_all; v_all; q_all]");
  app.add_option("--dtype", options->dtype, "convert floating weights: fp16, bf16 or fp32")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32", "float16", "bfloat16", "float32"}));
  app.add_option("--weights-from", options->weights_from,
                 "a DeepSpeed ZeRO-1/2 checkpoint: the fp32 masters of the optimizer files (fp32, the default, as "
                 "zero_to_fp32) or the 16-bit module (module)")
      ->check(CLI::IsMember({"fp32", "module"}));
  app.add_flag("--ema", options->ema, "take the weights from extra_state's EMA copy (ema_fp32_params or ema)");
  app.add_option_function<std::string>(
      "--filter",
      [options](const std::string& text) {
        try {
          options->filter.emplace(text);
        } catch (const std::regex_error& e) {
          throw CLI::ValidationError("--filter", fmt::format("invalid regular expression '{}': {}", text, e.what()));
        }
      },
      "only the keys this regular expression matches (a training checkpoint's state dict keys; a DCP set's flat "
      "keys, objects too); only their bytes are read");
  add_write_flags(app, options->write);
  return [options] {
    // The pattern before any input is read; its paths once the part count is known.
    PatternRule rule;
    if (options->no_stitch_megatron) {
      rule.m = PatternRule::kRequired;
      rule.refused_because = " (stitch writes no shards)";
      rule.required_because = ": --no-stitch-megatron writes one file per model part";
    } else {
      rule.refused_because = " (stitch writes one file; --no-stitch-megatron writes one per model part, named by {m})";
    }
    rule.syntax_only = options->write.dry_run;
    StitchOptions stitch;
    stitch.list_tensors = options->write.dry_run;
    if (set_format(*options, stitch).folder) {
      check_output_directory(options->output);
    } else {
      check_output_pattern(options->output, rule);
      if (!options->no_stitch_megatron && !options->write.dry_run) check_output_file(options->output, options->output);
    }
    auto started = std::chrono::steady_clock::now();
    note_phase(options->write, "reading the inputs");
    std::optional<PlanInputs> opened =
        open_inputs(with_tag(options->inputs, options->tag), options->write.model_parts, /*grid_first=*/true);
    PlanInputs& inputs = *opened;
    auto run = [&](StitchPlan plan) {
      report_replicated(plan.checks, inputs.files(), options->write.replicated_from_part_0);
      if (!options->write.quiet) {
        for (const std::string& note : plan.notes) print_notice(printable(note));
      }
      if (!options->write.dry_run) plan.tensors = {};  // only a dry run prints them
      opened.reset();  // the plan is plain data: the inputs' graphs and indexes are freed before it runs
      run_plan(plan.plan, plan.tensors, options->write, started);
      return 0;
    };
    if (!options->dtype.empty()) stitch.dtype = dtype_from_name(options->dtype);
    stitch.weights_from_module = options->weights_from == "module";
    if (stitch.weights_from_module && !input_layout(inputs.manifest()).module_weights) {
      throw UsageError(fmt::format("--weights-from module reads a DeepSpeed checkpoint; this input is {}",
                                   input_layout(inputs.manifest()).name));
    }
    if (const InputLayout& layout = input_layout(inputs.manifest());
        reads_as_one_state_dict(inputs.manifest(), format_info(stitch.format))) {
      // One state dict (a DCP directory, a safetensors set): no grid to stitch.
      if (options->no_stitch_megatron || options->ema || options->weights_only || options->fused_qkv ||
          (options->optimizer_state && layout.parameter_states == nullptr)) {
        throw UsageError(
            fmt::format("--no-stitch-megatron, --ema, --optimizer-state, --weights-only and --fused-qkv read a "
                        "training checkpoint; this input ({}) is one state dict",
                        layout.name));
      }
      note_phase(options->write, "planning");
      if (options->filter)
        stitch.filter = [options](const std::string& key) { return std::regex_search(key, *options->filter); };
      return run(plan_stitch_state_dict(inputs, options->output, stitch));
    }
    if (options->filter) {
      stitch.filter = [options](const std::string& key) { return std::regex_search(key, *options->filter); };
    }
    std::vector<std::vector<int>> grid = complete_grid(inputs.manifest());
    std::vector<std::string> outputs;
    stitch.stitch_megatron = !options->no_stitch_megatron;
    stitch.glue.fused_qkv = options->fused_qkv;
    if (options->ema) stitch.state_dict = ema_state_dict(inputs.manifest().files[grid[0][0]]);
    if (stitch.stitch_megatron) {
      outputs.push_back(options->output);
    } else {
      const int parts = static_cast<int>(grid.size());
      for (int m = 0; m < parts; ++m) {
        std::string path = output_path(options->output, parts, 1, m, 0);
        if (!options->write.dry_run) check_output_file(options->output, path);
        outputs.push_back(path);
      }
    }

    note_phase(options->write, "planning");
    return run(plan_stitch(inputs, outputs, stitch));
  };
}

}  // namespace ckpt::cli
