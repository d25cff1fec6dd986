// Every command's command line, and a command run in this process: ckpt-tool's
// main parses argv with it, the Python module (ckpt_tool.stitch, ...) a list of
// arguments made from keyword arguments. One parser, one set of flags, one set
// of messages for both.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/exec/exec.hpp"
#include "ckpt/io/error.hpp"
#include "commands.hpp"

namespace CLI {
class App;
}

namespace ckpt::cli {

// What a command gives and keeps beyond its exit code, for one run: where its
// text for stdout goes, its copy progress, the manifests it read (a plan's
// read_only) and the outputs it wrote. ckpt-tool's main runs with the default
// (the terminal); the Python module gives its own.
struct Session {
  std::ostream* out = nullptr;  // null: std::cout
  ProgressFn progress;          // set: called instead of the progress line on stderr
  std::vector<std::string> manifests_read;
  std::vector<std::string> written;  // each output's path, once its plan ran
  int notices_told = 0;
};

// The session of the command running on this thread.
Session& session();
// Where the command's stdout text goes.
std::ostream& out();

// Makes `session` the current one of this thread until destroyed.
class SessionScope {
 public:
  explicit SessionScope(Session& session);
  ~SessionScope();
  SessionScope(const SessionScope&) = delete;
  SessionScope& operator=(const SessionScope&) = delete;

 private:
  Session* previous_;
};

// The commands and their flags.
class CommandLine {
 public:
  explicit CommandLine(const std::string& version);
  ~CommandLine();
  CLI::App& app() { return *app_; }
  // After parsing: the command given ("" if none) and running it (its exit code).
  std::string command() const;
  int run() const;
  // The long flags of `command` (no "--", --help left out), each with whether it
  // takes a value; empty for no such command.
  std::vector<std::pair<std::string, bool>> flags_of(const std::string& command) const;

 private:
  std::unique_ptr<CLI::App> app_;
  std::map<CLI::App*, Action> actions_;
};

// The Error an exception a command let out stands for, as main reports it and
// run_in_process throws it: an Error as it is, std::filesystem's system_error by
// its errno, any other std::exception as bad input.
Error as_error(const std::exception& e);

// Runs `args` (a command and its arguments, no program name) in this process
// under `session`. Errors are thrown as ckpt::Error (a malformed command line as
// a usage error with CLI11's message, std::filesystem's by their errno), a bug
// as InternalError; the command's exit code is returned (diff: 1 for "different").
int run_in_process(const std::vector<std::string>& args, Session& session);

}  // namespace ckpt::cli
