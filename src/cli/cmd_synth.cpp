// ckpt-tool synth --params 2e9 --mp 2 --dp 8 --dtype fp16 --optimizer-state -o DIR
#include <fmt/format.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <memory>

#include "ckpt/exec/exec.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/plan/synth.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "usage.hpp"

namespace ckpt::cli {

Action add_synth_command(CLI::App& app) {
  struct Options {
    SynthOptions synth;
    std::string dtype = "fp16";
    std::string output;
    unsigned threads = 0;
    bool quiet = false;
    bool force = false;
    bool buffered_io = false;
  };
  auto options = std::make_shared<Options>();
  app.add_option("--params", options->synth.params, "parameter count to aim for (default 125e6)")
      ->check(finite_positive(kSynthMaxParameters));
  app.add_option("--mp", options->synth.mp, "model-parallel parts (default 1)")->check(CLI::Range(1, 4096));
  app.add_option("--dp", options->synth.dp, "FSDP world size (default 1)")->check(CLI::Range(1, 1 << 16));
  app.add_option("--dtype", options->dtype, "weights: fp16, bf16 or fp32 (default fp16)")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32"}));
  app.add_flag("--optimizer-state", options->synth.optimizer_state, "add Adam's exp_avg and exp_avg_sq (fp32)");
  app.add_option("--layers", options->synth.layers, "decoder layers (default: from --params)")
      ->check(CLI::Range(std::int64_t{1}, kSynthMaxLayers));
  app.add_option("--embed-dim", options->synth.embed_dim, "embedding dimension (default: from --params)")
      ->check(CLI::Range(std::int64_t{1}, kSynthMaxDim));
  app.add_option("--ffn-dim", options->synth.ffn_dim, "feed-forward dimension (default: 4 x embed-dim)")
      ->check(CLI::Range(std::int64_t{1}, kSynthMaxDim));
  app.add_option("--vocab", options->synth.vocab, "vocabulary size (default: 50272 rounded to 8 x mp)")
      ->check(CLI::Range(std::int64_t{1}, kSynthMaxDim));
  app.add_option("--positions", options->synth.positions, "learned positions (default 2050)")
      ->check(CLI::Range(std::int64_t{1}, kSynthMaxDim));
  app.add_option("-o,--output", options->output, "directory to write the shard files into (created if missing)")
      ->required();
  app.add_option("--threads", options->threads, "writer threads (default: all cores)")->check(thread_count());
  app.add_flag("-q,--quiet", options->quiet, "no progress or summary on stderr");
  app.add_flag("-f,--force", options->force, "overwrite existing files");
  app.add_flag("--buffered-io", options->buffered_io,
               "write through the page cache (default: direct I/O where the file system allows it)");
  return [options] {
    check_output_directory(options->output);
    options->synth.dtype = *dtype_from_name(options->dtype);
    SynthModel model{};
    try {
      model = synth_model(options->synth);  // only the arguments can make it fail
    } catch (const Error& e) {
      throw UsageError(e.message());
    }
    std::filesystem::create_directories(options->output);
    Plan plan = plan_synth(options->synth, options->output);
    ExecOptions exec;
    exec.threads = options->threads;
    exec.overwrite = options->force;
    exec.progress = progress_line(options->quiet);
    exec.direct_io = !options->buffered_io;
    exec.notice = print_notice;
    ExecStats stats = execute(plan, exec);
    if (!options->quiet) {
      fmt::print(stderr,
                 "synth: {} layers, embed {}, ffn {}, vocab {}: {} parameters; wrote {} file(s), {} in {:.2f} s\n",
                 model.layers, model.embed_dim, model.ffn_dim, model.vocab, grouped(model.parameters),
                 plan.files.size(), human_bytes(stats.bytes_written), stats.seconds);
    }
    return 0;
  };
}

}  // namespace ckpt::cli
