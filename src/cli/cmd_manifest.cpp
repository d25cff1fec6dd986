// ckpt-tool manifest INPUT... [-o FILE]
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest_json.hpp"
#include "command_line.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "usage.hpp"

namespace ckpt::cli {

Action add_manifest_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string tag;
    std::string output;
    bool force = false;
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs, "checkpoint files, globs or directories")->required();
  CLI::Option* output =
      app.add_option("-o,--output", options->output, "write here instead of stdout (.zst: zstd-compressed)");
  app.add_flag("-f,--force", options->force, "overwrite an existing output");
  add_tag_flag(app, options->tag);
  return [options, output] {
    bool to_stdout = output->count() == 0;
    if (!to_stdout) {
      PatternRule no_fields;
      no_fields.refused_because = " (a manifest is one file)";
      check_output_pattern(options->output, no_fields);
      check_output_file(options->output, options->output);
    }
    Manifest manifest = build_manifest(expand_inputs(with_tag(options->inputs, options->tag)));
    if (to_stdout) {
      out() << manifest_to_json(manifest).dump(1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
    } else {
      write_manifest(manifest, options->output, options->force);
    }
    return 0;
  };
}

}  // namespace ckpt::cli
