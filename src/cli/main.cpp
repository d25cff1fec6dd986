// ckpt-tool: consolidate and reshard sharded PyTorch checkpoints without loading
// them. Exit codes: 0 success, else the code of the error's kind, from the one
// table kErrorKinds (ckpt/io/error.hpp; README "Exit codes"); every error is one
// line on stderr, `ckpt-tool: error: ...`, escaped by `printable`.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <map>
#include <memory>
#include <string>
#include <system_error>
#ifdef CKPT_MIMALLOC
#include <mimalloc.h>
#endif

#include "ckpt/exec/job_exec.hpp"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/job.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/io/version.hpp"
#include "commands.hpp"
#include "plan_print.hpp"

namespace {

// The command, as rank 0 of a job or alone; the job's other ranks are told
// how it ended (the end, unless a plan went out).
int run_command(int argc, char** argv);

}  // namespace

int main(int argc, char** argv) {
  std::unique_ptr<ckpt::Job> job;
  try {
    job = ckpt::join_job();
  } catch (const ckpt::Error& e) {
    // Said once, by the launcher's first process.
    if (ckpt::launched_rank() == 0) fmt::print(stderr, "ckpt-tool: error: {}\n", e.what());
    return ckpt::info_of(e.kind()).exit_code;
  }
  if (job) {  // every rank runs one command line, checked before any runs it
    std::optional<ckpt::Error> differs = ckpt::agree_on_command(*job, std::vector<std::string>(argv + 1, argv + argc));
    if (differs) {
      if (job->rank() == 0) fmt::print(stderr, "ckpt-tool: error: {}\n", differs->what());
      return ckpt::info_of(differs->kind()).exit_code;
    }
  }
  if (job && job->rank() != 0) {
    // Rank 0 reads the command line, plans and reports; this rank writes its
    // share of the plan, if one comes.
    ckpt::install_cleanup_handlers();
    std::signal(SIGXFSZ, SIG_IGN);
    ckpt::ExecOptions local;
    local.convert = ckpt::convert_elements;
    try {
      return ckpt::follow_job(*job, local);
    } catch (const ckpt::Error& e) {  // the job's own exchange failed: the launcher ends the job
      fmt::print(stderr, "ckpt-tool: error: rank {}: {}\n", job->rank(), e.what());
      return ckpt::info_of(e.kind()).exit_code;
    }
  }
  ckpt::cli::lead(job.get());
  int code = run_command(argc, argv);
  if (job && !ckpt::cli::job_told()) ckpt::end_job(*job, code);
  return code;
}

namespace {

int run_command(int argc, char** argv) {
  CLI::App app{"ckpt-tool: index, inspect, stitch and reshard sharded PyTorch checkpoints, zero-copy"};
  app.require_subcommand(1);
  std::string version = ckpt::kVersionString;
#ifdef CKPT_MIMALLOC
  // (also what keeps the linker from dropping mimalloc, whose malloc replaces glibc's)
  version +=
      fmt::format(" (allocator: mimalloc {}.{}.{})", mi_version() / 100, mi_version() / 10 % 10, mi_version() % 10);
#endif
  app.set_version_flag("--version", version);
  std::map<CLI::App*, ckpt::cli::Action> actions;
  auto add = [&](const char* name, const char* description, auto adder) {
    CLI::App* sub = app.add_subcommand(name, description);
    actions[sub] = adder(*sub);
  };
  add("manifest", "index checkpoint files into a JSON manifest (no tensor data is read)",
      ckpt::cli::add_manifest_command);
  add("inspect", "show a manifest or checkpoint files: grid, sizes, object tree, problems",
      ckpt::cli::add_inspect_command);
  add("stitch", "remove the FSDP dimension and glue model-parallel parts into one checkpoint",
      ckpt::cli::add_stitch_command);
  add("reshard", "change the model-parallel and FSDP sizes of a training checkpoint, optimizer state included",
      ckpt::cli::add_reshard_command);
  add("diff", "compare two checkpoints (files or shard sets) tensor by tensor; exit 0 equal, 1 different, 2 error",
      ckpt::cli::add_diff_command);
  add("verify", "check CRCs, tensor ranges and FSDP/MP metadata; report every problem", ckpt::cli::add_verify_command);
  add("synth", "write a synthetic metaseq training checkpoint of a given size and grid (benchmarks, rehearsals)",
      ckpt::cli::add_synth_command);
  add("apply", "write the outputs of a plan saved with --save-plan (inputs changed since are refused)",
      ckpt::cli::add_apply_command);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // CLI11's own report is two lines (the error, then "Run with --help ...").
    fmt::print(stderr, "ckpt-tool: error: {} (run with --help for more information)\n", ckpt::printable(e.what()));
    return ckpt::info_of(ckpt::ErrorKind::Usage).exit_code;
  }
  ckpt::install_cleanup_handlers();
  // Past a file-size limit (RLIMIT_FSIZE) a write should fail with EFBIG and be
  // reported, not kill the process with its temp file still on disk.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App* command = nullptr;
  for (auto& [sub, action] : actions) {
    if (sub->parsed()) command = sub;
  }
  if (command == nullptr) return ckpt::info_of(ckpt::ErrorKind::Usage).exit_code;
  // diff's 1 means "different": its errors take the table's diff column.
  auto exit_code = [diff = command->get_name() == "diff"](ckpt::ErrorKind kind) {
    return diff ? ckpt::info_of(kind).diff_exit_code : ckpt::info_of(kind).exit_code;
  };
  try {
    return actions.at(command)();
  } catch (const ckpt::InternalError& e) {
    fmt::print(stderr, "ckpt-tool: internal error: {}\n", ckpt::printable(e.what()));
    return exit_code(ckpt::ErrorKind::Internal);
  } catch (const ckpt::Error& e) {
    fmt::print(stderr, "ckpt-tool: error: {}\n", e.what());
    return exit_code(e.kind());
  } catch (const std::system_error& e) {  // std::filesystem's, of a system call
    fmt::print(stderr, "ckpt-tool: error: {}\n", ckpt::printable(e.what()));
    return exit_code(e.code().category() == std::generic_category() || e.code().category() == std::system_category()
                         ? ckpt::kind_of_errno(e.code().value())
                         : ckpt::ErrorKind::BadInput);
  } catch (const std::exception& e) {
    fmt::print(stderr, "ckpt-tool: error: {}\n", ckpt::printable(e.what()));
    return exit_code(ckpt::ErrorKind::BadInput);
  }
}

}  // namespace
