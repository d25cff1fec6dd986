// ckpt-tool verify INPUT...: every problem found, one per line; exit 1 if any.
#include <fmt/format.h>
#include <fmt/ostream.h>
#include <fmt/ranges.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <map>
#include <memory>

#include "ckpt/exec/job_exec.hpp"
#include "ckpt/exec/verify.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest_json.hpp"
#include "command_line.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "usage.hpp"

namespace ckpt::cli {

Action add_verify_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string tag;
    unsigned threads = 0;
    bool quiet = false;
    std::optional<std::int64_t> model_parts;
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs, "checkpoint files, globs, directories, or a manifest")->required();
  app.add_option("--threads", options->threads, "CRC threads (default: all cores)")->check(thread_count());
  app.add_flag("-q,--quiet", options->quiet, "print problems only, no summary");
  add_model_parts_flag(app, options->model_parts);
  add_tag_flag(app, options->tag);
  return [options] {
    auto start = std::chrono::steady_clock::now();
    options->inputs = with_tag(options->inputs, options->tag);
    std::vector<std::string> paths;
    if (options->inputs.size() == 1 && looks_like_manifest(options->inputs[0])) {
      Manifest manifest = read_checked_manifest(options->inputs[0]);
      for (const ManifestFile& file : manifest.files) paths.push_back(file.path);
    } else {
      paths = expand_inputs(options->inputs);
    }
    VerifyReport report;
    if (Job* job = job_to_lead()) {  // the CRC pass over every rank, the rest here
      VerifyReport crcs = lead_crc_check(*job, paths, options->threads);
      report = verify_files(paths, options->threads, options->model_parts, options->inputs, &crcs);
    } else {
      report = verify_files(paths, options->threads, options->model_parts, options->inputs);
    }
    for (const std::string& problem : report.problems) fmt::print(out(), "{}\n", printable(problem));
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!options->quiet) {
      // What was checked: the record data of files with checksums (CRC-32),
      // the headers of the others (a layout without checksums: safetensors).
      std::map<std::string_view, std::size_t> unchecked;  // layout name -> files
      for (const std::string& path : paths) {
        if (const InputLayout& layout = input_layout_of_path(path); !layout.has_crcs) ++unchecked[layout.name];
      }
      std::size_t without_crcs = 0;
      std::vector<std::string> checked;
      for (const auto& [name, files] : unchecked) {
        fmt::print(stderr, "ckpt-tool: note: {} files: headers checked, data not checked against checksums\n", name);
        without_crcs += files;
      }
      if (without_crcs < paths.size()) checked.push_back(human_bytes(report.bytes) + " of record data checked");
      for (const auto& [name, files] : unchecked)
        checked.push_back(fmt::format("{} {} header(s) checked", files, name));
      fmt::print(out(), "{}: {} file(s), {} record(s), {} in {:.2f} s{}; {} problem(s)\n",
                 report.problems.empty() ? "ok" : "FAILED", report.files, report.records, fmt::join(checked, ", "),
                 seconds, report.bytes > 0 ? rate_text(report.bytes, seconds) : "", report.problems.size());
    }
    return report.problems.empty() ? 0 : 1;
  };
}

}  // namespace ckpt::cli
