// ckpt-tool stitch INPUT... -o OUT.pt
#include <fmt/format.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <memory>

#include "ckpt/exec.hpp"
#include "ckpt/stitch.hpp"
#include "ckpt/tensor_math.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "replicated.hpp"

namespace ckpt::cli {

Action add_stitch_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string output;
    bool no_stitch_megatron = false;
    bool fused_qkv = false;
    std::string dtype;
    bool strict = false;
    bool dry_run = false;
    unsigned threads = 0;
    bool quiet = false;
    bool force = false;
    bool stats = false;
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
  app.add_flag("--strict", options->strict, "fail when replicated tensors differ between model parts");
  app.add_flag("--dry-run", options->dry_run, "print the plan; write nothing");
  app.add_option("--threads", options->threads, "copy threads (default: all cores)");
  app.add_flag("-q,--quiet", options->quiet, "no progress or summary on stderr");
  app.add_flag("-f,--force", options->force, "overwrite existing outputs");
  app.add_flag("--stats", options->stats, "print the time of each stage on stderr");
  return [options] {
    auto started = std::chrono::steady_clock::now();
    Manifest manifest = load_inputs(options->inputs);
    std::vector<std::vector<int>> grid = complete_grid(manifest);
    std::vector<std::unique_ptr<MappedFile>> mapped;
    StitchInputs inputs;
    inputs.manifest = &manifest;
    for (const ManifestFile& file : manifest.files) {
      mapped.push_back(std::make_unique<MappedFile>(file.path));
      inputs.files.push_back(mapped.back().get());
    }
    std::vector<std::string> outputs;
    std::vector<std::unique_ptr<Checkpoint>> bases;
    StitchOptions stitch;
    stitch.stitch_megatron = !options->no_stitch_megatron;
    stitch.glue.fused_qkv = options->fused_qkv;
    if (!options->dtype.empty()) stitch.dtype = dtype_from_name(options->dtype);
    if (options->ema) stitch.state_dict = ema_state_dict(manifest.files[grid[0][0]]);
    if (stitch.stitch_megatron) {
      outputs.push_back(options->output);
      bases.push_back(std::make_unique<Checkpoint>(*inputs.files[grid[0][0]]));
    } else {
      if (options->output.find("{m}") == std::string::npos) {
        throw Error("--no-stitch-megatron writes one file per model part: -o needs {m} in it");
      }
      for (std::size_t m = 0; m < grid.size(); ++m) {
        std::string path = options->output;
        path.replace(path.find("{m}"), 3, std::to_string(m));
        outputs.push_back(path);
        bases.push_back(std::make_unique<Checkpoint>(*inputs.files[grid[m][0]]));
      }
    }
    for (const auto& base : bases) inputs.bases.push_back(base.get());

    StitchPlan plan = plan_stitch(inputs, outputs, stitch);
    report_replicated(plan.checks, inputs.files, options->strict);
    if (options->dry_run) {
      print_plan(plan.plan, plan.tensors, stdout);
      return 0;
    }
    ExecOptions exec;
    exec.threads = options->threads;
    exec.overwrite = options->force;
    exec.progress = !options->quiet && ::isatty(STDERR_FILENO);
    exec.convert = convert_elements;
    auto planned = std::chrono::steady_clock::now();
    ExecStats stats = execute(plan.plan, exec);
    if (options->stats) print_stats(stats, std::chrono::duration<double>(planned - started).count());
    if (!options->quiet) {
      fmt::print(stderr, "wrote {} file(s), {} in {:.2f} s ({:.0f} MiB/s)\n", outputs.size(),
                 human_bytes(stats.bytes_written), stats.seconds,
                 stats.seconds > 0 ? static_cast<double>(stats.bytes_written) / 1048576.0 / stats.seconds : 0.0);
    }
    return 0;
  };
}

}  // namespace ckpt::cli
