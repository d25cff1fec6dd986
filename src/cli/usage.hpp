// Usage errors: every argument is checked before any input is read or any output
// created, and a bad one is a UsageError (an Error of kind Usage), which `main`
// prints on one line and exits 2 for. Output paths and patterns (-o of every command that writes) are
// checked here by one set of rules; CLI11 validators for numbers and regexes too.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "ckpt/io/error.hpp"

namespace ckpt::cli {

class UsageError : public Error {
 public:
  explicit UsageError(std::string message) : Error(ErrorKind::Usage, std::move(message)) {}
};

// What an output pattern may hold. The only fields are {m} (model part) and {d}
// (FSDP shard); any other `{...}` and a stray `{` or `}` are refused, so braces
// are reserved in every -o.
struct PatternRule {
  enum Field { kRefused, kAllowed, kRequired };
  Field m = kRefused;
  Field d = kRefused;
  std::string refused_because;   // appended to "{m} is not allowed here"
  std::string required_because;  // appended to "-o must contain {m}"
  bool syntax_only = false;      // --dry-run writes nothing: the file system is not consulted
};

// Throws UsageError when `pattern` is empty or breaks `rule`: its text, and (unless
// `rule.syntax_only`) that its directory part, when it holds no field, exists.
void check_output_pattern(const std::string& pattern, const PatternRule& rule);

// A file about to be written (`pattern` after substitution): not ending in '/',
// not an existing directory, in an existing directory. Throws UsageError.
void check_output_file(const std::string& pattern, const std::string& path);

// reshard's outputs: every path of the mp x dp grid checked as above and distinct
// (grids of more than 65536 outputs are checked by syntax only).
void check_output_grid(const std::string& pattern, int mp, int dp);

// synth -o DIR: not empty, no braces, not an existing non-directory, and the
// nearest existing ancestor a directory (DIR and its parents are created).
void check_output_directory(const std::string& directory);

// A size as transformers spells it (--max-shard-size): "5GB" (10^9), "500MB",
// "10KB", "2GiB" (2^30), "64MiB", "8KiB", or a number of bytes; more than zero.
// Throws UsageError naming `flag`.
std::uint64_t parse_byte_size(const std::string& text, const std::string& flag);

// CLI11 validators (their failures are parse errors: one line, exit 2).
CLI::Validator finite_non_negative();        // tolerances: >= 0, not NaN or infinite
CLI::Validator finite_positive(double max);  // synth --params
CLI::Validator thread_count();               // 0 (all cores) .. 1024

}  // namespace ckpt::cli
