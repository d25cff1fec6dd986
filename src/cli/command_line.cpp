#include "command_line.hpp"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <iostream>
#include <system_error>

#include "ckpt/io/error.hpp"
#include "ckpt/io/version.hpp"

namespace ckpt::cli {

namespace {
thread_local Session* g_session = nullptr;
}  // namespace

Session& session() {
  static thread_local Session terminal;  // ckpt-tool's own: stdout, the progress line
  return g_session != nullptr ? *g_session : terminal;
}

std::ostream& out() {
  std::ostream* stream = session().out;
  return stream != nullptr ? *stream : std::cout;
}

SessionScope::SessionScope(Session& session) : previous_(g_session) {
  g_session = &session;
}
SessionScope::~SessionScope() {
  g_session = previous_;
}

CommandLine::CommandLine(const std::string& version)
    : app_(std::make_unique<CLI::App>(
          "ckpt-tool: index, inspect, stitch and reshard sharded PyTorch checkpoints, zero-copy")) {
  CLI::App& app = *app_;
  app.require_subcommand(1);
  app.set_version_flag("--version", version);
  auto add = [&](const char* name, const char* description, auto adder) {
    CLI::App* sub = app.add_subcommand(name, description);
    actions_[sub] = adder(*sub);
  };
  add("manifest", "index checkpoint files into a JSON manifest (no tensor data is read)", add_manifest_command);
  add("inspect", "show a manifest or checkpoint files: grid, sizes, object tree, problems", add_inspect_command);
  add("stitch", "remove the FSDP dimension and glue model-parallel parts into one checkpoint", add_stitch_command);
  add("reshard", "change the model-parallel and FSDP sizes of a training checkpoint, optimizer state included",
      add_reshard_command);
  add("diff", "compare two checkpoints (files or shard sets) tensor by tensor; exit 0 equal, 1 different, 2 error",
      add_diff_command);
  add("verify", "check CRCs, tensor ranges and FSDP/MP metadata; report every problem", add_verify_command);
  add("synth", "write a synthetic metaseq training checkpoint of a given size and grid (benchmarks, rehearsals)",
      add_synth_command);
  add("apply", "write the outputs of a plan saved with --save-plan (inputs changed since are refused)",
      add_apply_command);
}

CommandLine::~CommandLine() = default;

std::string CommandLine::command() const {
  for (const auto& [sub, action] : actions_) {
    if (sub->parsed()) return sub->get_name();
  }
  return "";
}

int CommandLine::run() const {
  for (const auto& [sub, action] : actions_) {
    if (sub->parsed()) return action();
  }
  throw Error(ErrorKind::Usage, "no command given");
}

std::vector<std::pair<std::string, bool>> CommandLine::flags_of(const std::string& command) const {
  std::vector<std::pair<std::string, bool>> out;
  for (const auto& [sub, action] : actions_) {
    if (sub->get_name() != command) continue;
    for (const CLI::Option* option : sub->get_options()) {
      for (const std::string& name : option->get_lnames()) {
        if (name != "help") out.emplace_back(name, option->get_expected_min() != 0);
      }
    }
  }
  return out;
}

Error as_error(const std::exception& e) {
  if (const auto* error = dynamic_cast<const Error*>(&e)) return *error;
  if (const auto* call = dynamic_cast<const std::system_error*>(&e)) {  // std::filesystem's, of a system call
    const std::error_category& category = call->code().category();
    const bool os = category == std::generic_category() || category == std::system_category();
    return Error(os ? kind_of_errno(call->code().value()) : ErrorKind::BadInput, e.what());
  }
  return Error(ErrorKind::BadInput, e.what());
}

int run_in_process(const std::vector<std::string>& args, Session& session) {
  CommandLine line(kVersionString);
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // (CLI11 takes them last first)
  try {
    line.app().parse(reversed);
  } catch (const CLI::Success&) {  // --help, --version: the terminal's
    throw Error(ErrorKind::Usage, fmt::format("--help and --version are the command line's: run `ckpt-tool {} --help`",
                                              args.empty() ? std::string() : printable(args.front())));
  } catch (const CLI::ParseError& e) {
    throw Error(ErrorKind::Usage, fmt::format("{} (see `ckpt-tool {} --help`)", printable(e.what()),
                                              args.empty() ? std::string() : printable(args.front())));
  }
  SessionScope scope(session);
  try {
    return line.run();
  } catch (const Error&) {
    throw;
  } catch (const InternalError&) {  // a bug: never told as bad input
    throw;
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    throw as_error(e);
  }
}

}  // namespace ckpt::cli
