// ckpt-tool reshard INPUT... --mp M --dp D -o 'out/checkpoint_last-model_part-{m}-shard{d}.pt'
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <memory>

#include "ckpt/plan/reshard.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "usage.hpp"

namespace ckpt::cli {

Action add_reshard_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string output;
    int mp = 0;
    int dp = 0;
    bool unflatten = false;
    bool drop_optimizer_state = false;
    bool split_qkv = false;
    std::optional<std::string> layout_from;
    std::optional<std::int64_t> layout_model_parts;
    WriteFlags write;
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs,
                 "shard files, globs, directories, or a manifest written by `ckpt-tool manifest`")
      ->required();
  app.add_option("-o,--output", options->output, "output path pattern with {m} (model part) and {d} (FSDP shard)")
      ->required();
  app.add_option("--mp", options->mp, "model-parallel parts to write")->required()->check(CLI::Range(1, 1 << 16));
  app.add_option("--dp", options->dp, "FSDP world size to write")->required()->check(CLI::Range(1, 1 << 20));
  app.add_flag("--unflatten", options->unflatten,
               "with --dp 1: write consolidated (unflattened) parts that keep shard_metadata; drops optimizer state");
  app.add_flag("--drop-optimizer-state", options->drop_optimizer_state, "write no last_optimizer_state");
  app.add_option("--layout-from", options->layout_from,
                 "a shard set of the same model (files, a directory or a manifest): the FSDP wrapping and the objects "
                 "(cfg, extra_state, ...) to write the input's weights with; its optimizer state is not written");
  app.add_option("--layout-model-parts", options->layout_model_parts,
                 "the --layout-from set's model-parallel part count, in place of its cfg's (a stale cfg)")
      ->check(CLI::Range(1, kMaxGridSide - 1));
  app.add_flag("--split-qkv", options->split_qkv,
               "write k_proj, v_proj and q_proj, not metaseq's fused qkv_proj (consolidated parts only)");
  add_write_flags(app, options->write);
  return [options] {
    // {m} and {d} are always accepted (0 when the count is 1) and required when
    // the count on their axis is more than 1.
    PatternRule rule;
    rule.m = options->mp > 1 ? PatternRule::kRequired : PatternRule::kAllowed;
    rule.d = options->dp > 1 ? PatternRule::kRequired : PatternRule::kAllowed;
    rule.required_because = fmt::format(" to name {} x {} outputs", options->mp, options->dp);
    rule.syntax_only = options->write.dry_run;
    if (options->unflatten && options->dp != 1) {
      throw UsageError("--unflatten writes consolidated parts: it needs --dp 1");
    }
    if (options->layout_from && options->layout_from->empty()) throw UsageError("--layout-from: an empty path");
    if (options->layout_model_parts && !options->layout_from)
      throw UsageError("--layout-model-parts needs --layout-from");
    check_output_pattern(options->output, rule);
    if (!options->write.dry_run) check_output_grid(options->output, options->mp, options->dp);
    auto started = std::chrono::steady_clock::now();
    note_phase(options->write, "reading the inputs");
    PlanInputs inputs = open_inputs(options->inputs, options->write.model_parts);
    std::optional<PlanInputs> layout_from;
    if (options->layout_from) {
      try {
        layout_from.emplace(open_inputs({*options->layout_from}, options->layout_model_parts, /*grid_first=*/true));
      } catch (const Error& error) {  // said of the template, not of INPUT, and of its flag
        std::string message = error.message();
        for (std::size_t at = message.find("--model-parts"); at != std::string::npos;
             at = message.find("--model-parts", at + 21)) {
          message.replace(at, 13, "--layout-model-parts");
        }
        throw Error(error.kind(), error.where(), "--layout-from: " + message);
      }
    }
    ReshardOptions reshard;
    reshard.mp = options->mp;
    reshard.dp = options->dp;
    reshard.unflatten = options->unflatten;
    reshard.drop_optimizer_state = options->drop_optimizer_state;
    reshard.split_qkv = options->split_qkv;
    reshard.list_tensors = options->write.dry_run;
    note_phase(options->write, "planning");
    ReshardPlan plan = plan_reshard(inputs, options->output, reshard, layout_from ? &*layout_from : nullptr);
    if (!options->write.quiet) {
      for (const std::string& note : plan.notes) print_notice(note);
    }
    report_replicated(plan.checks, inputs.files(), options->write.replicated_from_part_0);
    run_plan(plan.plan, plan.tensors, options->write, started);
    return 0;
  };
}

}  // namespace ckpt::cli
