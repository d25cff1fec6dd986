// ckpt-tool stitch INPUT... -o OUT.pt
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <memory>

#include "ckpt/plan/reshard.hpp"
#include "ckpt/plan/stitch.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "usage.hpp"

namespace ckpt::cli {

Action add_stitch_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string output;
    bool no_stitch_megatron = false;
    bool fused_qkv = false;
    std::string dtype;
    WriteFlags write;
    bool ema = false;
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs,
                 "shard files, globs, directories, or a manifest written by `ckpt-tool manifest`")
      ->required();
  app.add_option("-o,--output", options->output, "output file; with --no-stitch-megatron a pattern containing {m}")
      ->required();
  app.add_flag("--no-stitch-megatron", options->no_stitch_megatron, "write one consolidated file per model part");
  app.add_flag("--fused-qkv", options->fused_qkv, "keep one qkv_proj per layer, laid out [k_all; v_all; q_all]");
  app.add_option("--dtype", options->dtype, "convert floating weights: fp16, bf16 or fp32")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32", "float16", "bfloat16", "float32"}));
  app.add_flag("--ema", options->ema, "take the weights from extra_state's EMA copy (ema_fp32_params or ema)");
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
    check_output_pattern(options->output, rule);
    if (!options->no_stitch_megatron && !options->write.dry_run) check_output_file(options->output, options->output);
    auto started = std::chrono::steady_clock::now();
    PlanInputs inputs = open_inputs(options->inputs, options->write.model_parts, /*grid_first=*/true);
    std::vector<std::vector<int>> grid = complete_grid(inputs.manifest());
    std::vector<std::string> outputs;
    StitchOptions stitch;
    stitch.stitch_megatron = !options->no_stitch_megatron;
    stitch.glue.fused_qkv = options->fused_qkv;
    if (!options->dtype.empty()) stitch.dtype = dtype_from_name(options->dtype);
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

    StitchPlan plan = plan_stitch(inputs, outputs, stitch);
    report_replicated(plan.checks, inputs.files(), options->write.strict);
    if (!options->write.dry_run) plan.tensors = {};  // only a dry run prints them
    run_plan(plan.plan, plan.tensors, options->write, started);
    return 0;
  };
}

}  // namespace ckpt::cli
