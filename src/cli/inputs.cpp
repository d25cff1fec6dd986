#include "inputs.hpp"

#include <fmt/format.h>
#include <glob.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <filesystem>
#include <tuple>

#include "ckpt/format/safetensors.hpp"
#include "ckpt/plan/stitch.hpp"

namespace ckpt::cli {

namespace fs = std::filesystem;

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    std::error_code ec;
    if (inputs.size() > 1 && looks_like_manifest(input)) {
      throw Error(ErrorKind::Usage, Location{input, "", std::nullopt},
                  "a manifest is the whole input set: give it alone, or give the checkpoint files without it");
    }
    if (std::optional<std::string> index = safetensors_index_of(input)) {
      for (std::string& file : safetensors_index_files(*index)) files.push_back(std::move(file));
      continue;
    }
    if (fs::is_directory(input, ec)) {
      // Entries that cannot be stat'ed (a symbolic link loop, a dangling link) are
      // not checkpoint files: skipped, like any other non-file. A folder without
      // *.pt files is read for *.safetensors (a Hugging Face folder).
      std::vector<std::string> safetensors;
      fs::directory_iterator entries(input, ec);
      if (ec)
        throw Error(ErrorKind::Io, Location{input, "", std::nullopt}, "cannot list the directory: " + ec.message());
      for (const auto& entry : entries) {
        std::error_code entry_ec;
        if (!entry.is_regular_file(entry_ec)) continue;
        if (entry.path().extension() == ".pt") files.push_back(entry.path().string());
        if (entry.path().extension() == ".safetensors") safetensors.push_back(entry.path().string());
      }
      if (files.empty()) {
        // Shards of a sharded set are read through its index: without one (a run
        // killed before writing it, a copy that left it out) the set cannot be
        // known to be complete.
        for (const std::string& path : safetensors) {
          if (safetensors_shard_stem(fs::path(path).filename().string())) {
            throw Error(ErrorKind::IncompleteSet, Location{input, "", std::nullopt},
                        fmt::format("{} is a shard of a set, but the folder holds no *.safetensors.index.json: the "
                                    "set may be incomplete (name its files to read them anyway)",
                                    fs::path(path).filename().string()));
          }
        }
        files = std::move(safetensors);
      }
      continue;
    }
    if (fs::exists(input, ec) || input.find_first_of("*?[") == std::string::npos) {
      files.push_back(input);  // a missing plain name is reported when it is opened
      continue;
    }
    glob_t matches{};
    int rc = ::glob(input.c_str(), 0, nullptr, &matches);
    if (rc == 0) {
      for (std::size_t i = 0; i < matches.gl_pathc; ++i) files.emplace_back(matches.gl_pathv[i]);
    }
    globfree(&matches);
    if (rc != 0) throw Error(Location{input, "", std::nullopt}, "no file matches this pattern");
  }
  auto key = [](const std::string& path) {
    FileRole role = parse_file_role(path);
    return std::make_tuple(role.mp_part.value_or(-1), role.dp_shard.value_or(-1), path);
  };
  std::sort(files.begin(), files.end(), [&](const std::string& a, const std::string& b) { return key(a) < key(b); });
  files.erase(std::unique(files.begin(), files.end()), files.end());
  if (files.empty()) throw Error("no input files (directories are searched for *.pt, else *.safetensors files)");
  return files;
}

std::optional<std::string> safetensors_index_of(const std::string& input) {
  std::error_code ec;
  if (input.ends_with(".safetensors.index.json") && fs::is_regular_file(input, ec)) return input;
  if (!fs::is_directory(input, ec)) return std::nullopt;
  std::optional<std::string> found;
  fs::directory_iterator entries(input, ec);
  if (ec) return std::nullopt;
  for (const auto& entry : entries) {
    std::string name = entry.path().filename().string();
    if (entry.path().extension() == ".pt") return std::nullopt;  // a training checkpoint's folder
    if (!name.ends_with(".safetensors.index.json")) continue;
    std::string single = name.substr(0, name.size() - std::string_view(".index.json").size());
    if (fs::exists(fs::path(input) / single, ec)) {
      throw Error(Location{input, "", std::nullopt},
                  fmt::format("both {} and {} here: two sets of weights, and readers differ on which they load "
                              "(transformers takes {}); remove the stale one",
                              single, name, single));
    }
    if (found) {
      throw Error(Location{input, "", std::nullopt},
                  "more than one *.safetensors.index.json here: give the index of the set to read");
    }
    found = entry.path().string();
  }
  return found;
}

namespace {
std::vector<std::string>& manifests_read_list() {
  static std::vector<std::string> paths;
  return paths;
}
}  // namespace

const std::vector<std::string>& manifests_read() {
  return manifests_read_list();
}

Manifest load_inputs(const std::vector<std::string>& inputs, std::optional<std::int64_t> model_parts,
                     DecodedFiles* keep) {
  Manifest manifest;
  if (inputs.size() == 1 && looks_like_manifest(inputs[0])) {
    manifests_read_list().push_back(inputs[0]);
    manifest = read_manifest(inputs[0]);
    check_fresh(manifest);
    check_describes_files(manifest, inputs[0], keep);
  } else {
    manifest = build_manifest(expand_inputs(inputs), keep);
    for (const std::string& input : inputs) {
      std::optional<std::string> index = safetensors_index_of(input);
      if (!index) continue;
      std::vector<std::string> problems = safetensors_index_problems(*index, manifest.files);
      if (!problems.empty()) throw Error(ErrorKind::IncompleteSet, problems.front());
    }
  }
  if (model_parts) manifest.grid = detect_grid(manifest.files, model_parts);
  return manifest;
}

PlanInputs open_inputs(const std::vector<std::string>& inputs, std::optional<std::int64_t> model_parts,
                       bool grid_first) {
  DecodedFiles decoded;  // what describing the files decoded, for the planner
  Manifest manifest = load_inputs(inputs, model_parts, &decoded);
  if (grid_first) complete_grid(manifest);
  return PlanInputs(std::move(manifest), decoded);
}

void add_model_parts_flag(CLI::App& app, std::optional<std::int64_t>& model_parts) {
  app.add_option("--model-parts", model_parts,
                 "the inputs' model-parallel part count, in place of cfg's model_parallel_size (a stale cfg)")
      ->check(CLI::Range(1, kMaxGridSide - 1));
}

std::string human_bytes(std::uint64_t nbytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(nbytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  return unit == 0 ? fmt::format("{} B", nbytes) : fmt::format("{:.1f} {}", value, kUnits[unit]);
}

std::string rate_text(std::uint64_t nbytes, double seconds) {
  if (seconds < 1e-3) return "";
  return fmt::format(" ({}/s)", human_bytes(static_cast<std::uint64_t>(static_cast<double>(nbytes) / seconds)));
}

std::string grouped(std::uint64_t count) {
  std::string digits = std::to_string(count);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i != 0 && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

}  // namespace ckpt::cli
