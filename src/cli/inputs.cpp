#include "inputs.hpp"

#include <fmt/format.h>
#include <glob.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <filesystem>
#include <tuple>

#include "ckpt/format/safetensors.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest_json.hpp"
#include "ckpt/plan/stitch.hpp"
#include "command_line.hpp"

namespace ckpt::cli {

namespace fs = std::filesystem;

Manifest load_inputs(const std::vector<std::string>& inputs, std::optional<std::int64_t> model_parts,
                     DecodedFiles* keep) {
  Manifest manifest;
  if (inputs.size() == 1 && looks_like_manifest(inputs[0])) {
    session().manifests_read.push_back(inputs[0]);
    manifest = read_checked_manifest(inputs[0], keep);
  } else {
    manifest = build_manifest(expand_inputs(inputs), keep);
    std::vector<std::string> problems = index_problems(inputs, manifest.files);
    if (!problems.empty()) throw Error(ErrorKind::IncompleteSet, problems.front());
  }
  if (model_parts) manifest.grid = detect_grid(manifest.files, model_parts);
  return manifest;
}

PlanInputs open_inputs(const std::vector<std::string>& inputs, std::optional<std::int64_t> model_parts,
                       bool grid_first) {
  DecodedFiles decoded;  // what describing the files decoded, for the planner
  Manifest manifest = load_inputs(inputs, model_parts, &decoded);
  if (grid_first && input_layout(manifest).training) complete_grid(manifest);  // (one state dict has none)
  return PlanInputs(std::move(manifest), decoded);
}

void add_model_parts_flag(CLI::App& app, std::optional<std::int64_t>& model_parts) {
  app.add_option("--model-parts", model_parts,
                 "the inputs' model-parallel part count, in place of cfg's model_parallel_size (a stale cfg)")
      ->check(CLI::Range(1, kMaxGridSide - 1));
}

void add_tag_flag(CLI::App& app, std::string& tag) {
  app.add_option("--tag", tag,
                 "a DeepSpeed checkpoint: read this step folder (global_step1200) of the folder given, not the one "
                 "its `latest` names")
      ->check(
          [](const std::string& value) { return value.empty() ? std::string("a step folder's name") : std::string(); });
}

std::vector<std::string> with_tag(std::vector<std::string> inputs, const std::string& tag) {
  if (tag.empty()) return inputs;
  if (tag.find('/') != std::string::npos || tag == "." || tag == "..") {
    throw Error(ErrorKind::Usage, fmt::format("--tag {}: a step folder's name, without '/'", tag));
  }
  // Every folder given must hold it (diff A B --tag T reads step T of both);
  // a file is left as it is.
  bool found = false;
  for (std::string& input : inputs) {
    std::error_code ec;
    if (!fs::is_directory(input, ec)) continue;
    if (!fs::is_directory(fs::path(input) / tag, ec)) {
      throw Error(ErrorKind::Usage, Location{input, "", std::nullopt},
                  fmt::format("--tag {}: no step folder of that name here", tag));
    }
    input = (fs::path(input) / tag).string();
    found = true;
  }
  if (!found) throw Error(ErrorKind::Usage, fmt::format("--tag {}: no input is a folder", tag));
  return inputs;
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
