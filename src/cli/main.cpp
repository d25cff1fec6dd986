// ckpt-tool: consolidate and reshard sharded PyTorch checkpoints without loading
// them. Exit codes: 0 success, else the code of the error's kind, from the one
// table kErrorKinds (ckpt/io/error.hpp; README "Exit codes"); every error is one
// line on stderr, `ckpt-tool: error: ...`, escaped by `printable`.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <memory>
#include <string>
#ifdef CKPT_MIMALLOC
#include <mimalloc.h>
#endif

#include "ckpt/exec/job_exec.hpp"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/io/error.hpp"
#include "ckpt/io/job.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/io/version.hpp"
#include "command_line.hpp"
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
  std::string version = ckpt::kVersionString;
#ifdef CKPT_MIMALLOC
  // (also what keeps the linker from dropping mimalloc, whose malloc replaces glibc's)
  version +=
      fmt::format(" (allocator: mimalloc {}.{}.{})", mi_version() / 100, mi_version() / 10 % 10, mi_version() % 10);
#endif
  ckpt::cli::CommandLine line(version);
  CLI::App& app = line.app();
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
  const std::string command = line.command();
  if (command.empty()) return ckpt::info_of(ckpt::ErrorKind::Usage).exit_code;
  // diff's 1 means "different": its errors take the table's diff column.
  auto exit_code = [diff = command == "diff"](ckpt::ErrorKind kind) {
    return diff ? ckpt::info_of(kind).diff_exit_code : ckpt::info_of(kind).exit_code;
  };
  try {
    return line.run();
  } catch (const ckpt::InternalError& e) {
    fmt::print(stderr, "ckpt-tool: internal error: {}\n", ckpt::printable(e.what()));
    return exit_code(ckpt::ErrorKind::Internal);
  } catch (const std::exception& e) {  // an Error, or one of the system's (ckpt::cli::as_error)
    const ckpt::Error error = ckpt::cli::as_error(e);
    fmt::print(stderr, "ckpt-tool: error: {}\n", error.what());
    return exit_code(error.kind());
  }
}

}  // namespace
