// ckpt-tool manifest INPUT... [-o FILE]
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "commands.hpp"
#include "inputs.hpp"

namespace ckpt::cli {

Action add_manifest_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string output;
    bool force = false;
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs, "checkpoint files, globs or directories")->required();
  app.add_option("-o,--output", options->output, "write here instead of stdout (.zst: zstd-compressed)");
  app.add_flag("-f,--force", options->force, "overwrite an existing output");
  return [options] {
    Manifest manifest = build_manifest(expand_inputs(options->inputs));
    if (options->output.empty()) {
      std::cout << manifest_to_json(manifest).dump(1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    } else {
      write_manifest(manifest, options->output, options->force);
    }
    return 0;
  };
}

}  // namespace ckpt::cli
