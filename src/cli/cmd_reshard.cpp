// ckpt-tool reshard INPUT... --mp M --dp D -o 'out/checkpoint_last-model_part-{m}-shard{d}.pt'
#include <fmt/format.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <map>
#include <memory>

#include "ckpt/exec.hpp"
#include "ckpt/reshard.hpp"
#include "ckpt/tensor_math.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "replicated.hpp"

namespace ckpt::cli {

Action add_reshard_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string output;
    int mp = 0;
    int dp = 0;
    bool unflatten = false;
    bool drop_optimizer_state = false;
    bool strict = false;
    bool dry_run = false;
    unsigned threads = 0;
    bool quiet = false;
    bool force = false;
    bool stats = false;
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
  app.add_flag("--strict", options->strict, "fail when replicated tensors differ between model parts");
  app.add_flag("--dry-run", options->dry_run, "print the plan; write nothing");
  app.add_option("--threads", options->threads, "copy threads (default: all cores)");
  app.add_flag("-q,--quiet", options->quiet, "no progress or summary on stderr");
  app.add_flag("-f,--force", options->force, "overwrite existing outputs");
  app.add_flag("--stats", options->stats, "print the time of each stage on stderr");
  return [options] {
    auto started = std::chrono::steady_clock::now();
    Manifest manifest = load_inputs(options->inputs);
    std::vector<std::unique_ptr<MappedFile>> mapped;
    std::vector<const MappedFile*> files;
    for (const ManifestFile& file : manifest.files) {
      mapped.push_back(std::make_unique<MappedFile>(file.path));
      files.push_back(mapped.back().get());
    }
    std::map<int, std::unique_ptr<Checkpoint>> bases;
    auto open_base = [&](int index) -> const Checkpoint& {
      auto& slot = bases[index];
      if (!slot) slot = std::make_unique<Checkpoint>(*files[index]);
      return *slot;
    };
    ReshardOptions reshard;
    reshard.mp = options->mp;
    reshard.dp = options->dp;
    reshard.unflatten = options->unflatten;
    reshard.drop_optimizer_state = options->drop_optimizer_state;
    ReshardPlan plan = plan_reshard(manifest, files, open_base, options->output, reshard);
    report_replicated(plan.checks, files, options->strict);
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
      fmt::print(stderr, "wrote {} file(s), {} in {:.2f} s ({:.0f} MiB/s)\n", plan.outputs.size(),
                 human_bytes(stats.bytes_written), stats.seconds,
                 stats.seconds > 0 ? static_cast<double>(stats.bytes_written) / 1048576.0 / stats.seconds : 0.0);
    }
    return 0;
  };
}

}  // namespace ckpt::cli
