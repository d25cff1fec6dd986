#include "usage.hpp"

#include <fmt/format.h>

#include <cctype>
#include <charconv>

#include <cmath>
#include <filesystem>
#include <set>

#include "ckpt/plan/reshard.hpp"

namespace ckpt::cli {

namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t kMaxCheckedOutputs = 65536;

std::string quoted(const std::string& pattern) {
  return "-o '" + pattern + "'";
}

// The directory `path` is written into ("." for a bare name).
fs::path directory_of(const std::string& path) {
  fs::path target(path);
  return target.has_parent_path() ? target.parent_path() : fs::path(".");
}

// The fields of `pattern` ({m}, {d}) as far as `rule` allows them; throws
// UsageError for an unknown field, a stray brace or a refused field.
std::pair<bool, bool> scan_fields(const std::string& pattern, const PatternRule& rule) {
  bool has_m = false;
  bool has_d = false;
  for (std::size_t at = 0; at < pattern.size(); ++at) {
    if (pattern[at] == '}') {
      throw UsageError(fmt::format("{}: stray '}}' at offset {} (braces are reserved for the fields {{m}} and {{d}})",
                                   quoted(pattern), at));
    }
    if (pattern[at] != '{') continue;
    std::size_t close = pattern.find_first_of("{}", at + 1);
    if (close == std::string::npos || pattern[close] == '{') {
      throw UsageError(fmt::format("{}: stray '{{' at offset {} (braces are reserved for the fields {{m}} and {{d}})",
                                   quoted(pattern), at));
    }
    std::string field = pattern.substr(at, close - at + 1);
    if (field != "{m}" && field != "{d}") {
      throw UsageError(fmt::format("{}: unknown field {} (the fields are {{m}} and {{d}})", quoted(pattern), field));
    }
    if ((field == "{m}" ? rule.m : rule.d) == PatternRule::kRefused) {
      throw UsageError(fmt::format("{}: {} is not allowed here{}", quoted(pattern), field, rule.refused_because));
    }
    (field == "{m}" ? has_m : has_d) = true;
    at = close;
  }
  return {has_m, has_d};
}

}  // namespace

void check_output_pattern(const std::string& pattern, const PatternRule& rule) {
  if (pattern.empty()) throw UsageError("-o: the output path is empty");
  auto [has_m, has_d] = scan_fields(pattern, rule);
  bool need_m = rule.m == PatternRule::kRequired && !has_m;
  bool need_d = rule.d == PatternRule::kRequired && !has_d;
  if (need_m || need_d) {
    throw UsageError(fmt::format("{} must contain {}{}{}{}", quoted(pattern), need_m ? "{m}" : "",
                                 need_m && need_d ? " and " : "", need_d ? "{d}" : "", rule.required_because));
  }
  if (pattern.back() == '/') throw UsageError(fmt::format("{}: names a directory; give a file name", quoted(pattern)));
  fs::path directory = directory_of(pattern);
  if (!rule.syntax_only && directory.string().find('{') == std::string::npos) {
    std::error_code ec;
    if (!fs::is_directory(directory, ec)) {
      throw UsageError(fmt::format("{}: output directory does not exist: {}", quoted(pattern), directory.string()));
    }
  }
}

void check_output_file(const std::string& pattern, const std::string& path) {
  std::string named = path == pattern ? quoted(pattern) : fmt::format("{} ({})", quoted(pattern), path);
  if (path.empty()) throw UsageError("-o: the output path is empty");
  if (path.back() == '/') throw UsageError(fmt::format("{}: names a directory; give a file name", named));
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    throw UsageError(fmt::format("{}: is an existing directory; give a file name", named));
  }
  fs::path directory = directory_of(path);
  if (!fs::is_directory(directory, ec)) {
    throw UsageError(fmt::format("{}: output directory does not exist: {}", named, directory.string()));
  }
}

void check_output_grid(const std::string& pattern, int mp, int dp) {
  std::uint64_t outputs = static_cast<std::uint64_t>(mp) * static_cast<std::uint64_t>(dp);
  if (outputs > kMaxCheckedOutputs) return;
  std::set<std::string> seen;
  for (int m = 0; m < mp; ++m) {
    for (int d = 0; d < dp; ++d) {
      std::string path = output_path(pattern, mp, dp, m, d);
      check_output_file(pattern, path);
      if (!seen.insert(path).second) {
        throw UsageError(fmt::format("{}: names two outputs {} (write {{m}} and {{d}} apart, e.g. '{{m}}-{{d}}')",
                                     quoted(pattern), path));
      }
    }
  }
}

void check_output_directory(const std::string& directory) {
  if (directory.empty()) throw UsageError("-o: the output path is empty");
  PatternRule no_fields;
  no_fields.refused_because = " (synth's -o is a directory; it names its files itself)";
  scan_fields(directory, no_fields);
  std::error_code ec;
  fs::path path(directory);
  if (fs::exists(path, ec) && !fs::is_directory(path, ec)) {
    throw UsageError(fmt::format("{}: exists and is not a directory", quoted(directory)));
  }
  // Created with its parents: the nearest ancestor that exists must be a directory.
  for (fs::path ancestor = fs::absolute(path, ec).parent_path(); !ancestor.empty(); ancestor = ancestor.parent_path()) {
    if (fs::exists(ancestor, ec)) {
      if (!fs::is_directory(ancestor, ec)) {
        throw UsageError(fmt::format("{}: {} is not a directory", quoted(directory), ancestor.string()));
      }
      break;
    }
    if (ancestor == ancestor.parent_path()) break;
  }
}

std::uint64_t parse_byte_size(const std::string& text, const std::string& flag) {
  static constexpr std::pair<std::string_view, std::uint64_t> kUnits[] = {
      {"GiB", 1ull << 30},
      {"MiB", 1ull << 20},
      {"KiB", 1ull << 10},
      {"GB", 1'000'000'000},
      {"MB", 1'000'000},
      {"KB", 1'000},
      {"B", 1},
  };
  std::string upper;
  for (char c : text) upper.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  std::uint64_t unit = 1;
  std::string digits = text;
  for (const auto& [suffix, bytes] : kUnits) {
    std::string upper_suffix;
    for (char c : suffix) upper_suffix.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
    if (upper.size() > suffix.size() && upper.ends_with(upper_suffix)) {
      unit = bytes;
      digits = text.substr(0, text.size() - suffix.size());
      break;
    }
  }
  std::uint64_t count = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), count);
  if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() || count == 0 ||
      count > UINT64_MAX / unit) {
    throw UsageError(fmt::format("{} {}: not a size (such as 5GB, 500MB, 2GiB or a number of bytes)", flag, text));
  }
  return count * unit;
}

CLI::Validator finite_non_negative() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        double value = 0;
        if (!CLI::detail::lexical_cast(text, value) || !std::isfinite(value) || value < 0) {
          return fmt::format("{} is not a finite number >= 0", text);
        }
        return "";
      },
      "NUMBER >= 0");
}

CLI::Validator finite_positive(double max) {
  return CLI::Validator(
      [max](std::string& text) -> std::string {
        double value = 0;
        if (!CLI::detail::lexical_cast(text, value) || !std::isfinite(value) || value <= 0 || value > max) {
          return fmt::format("{} is not a number in (0, {:g}]", text, max);
        }
        return "";
      },
      fmt::format("NUMBER in (0, {:g}]", max));
}

CLI::Validator thread_count() {
  return CLI::Range(0, 1024);
}

}  // namespace ckpt::cli
