// ckpt-tool inspect (MANIFEST | INPUT...) [--json] [--tensors [--filter REGEX]]
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <iostream>
#include <regex>

#include "command_line.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "inspect_render.hpp"
#include "usage.hpp"

namespace ckpt::cli {

using json = nlohmann::ordered_json;

Action add_inspect_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string tag;
    bool json_output = false;
    bool tensors = false;
    bool wide = false;
    std::optional<std::regex> filter;  // compiled while parsing: a bad one is a usage error
    std::optional<std::int64_t> model_parts;
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs, "a manifest (.json/.json.zst), or checkpoint files, globs, directories")
      ->required();
  app.add_flag("--json", options->json_output, "print JSON for machines");
  app.add_flag("--tensors", options->tensors, "list every tensor");
  app.add_flag("--wide", options->wide,
               fmt::format("show the grid as a table of every shard's size even past {} shards per part (by "
                           "default a line per part: shard count, size range, the shards that stand out)",
                           kMaxTableShards));
  add_model_parts_flag(app, options->model_parts);
  add_tag_flag(app, options->tag);
  app.add_option_function<std::string>(
      "--filter",
      [options](const std::string& text) {
        options->filter.reset();
        if (text.empty()) return;
        try {
          options->filter.emplace(text);
        } catch (const std::regex_error& e) {
          throw CLI::ValidationError("--filter", fmt::format("invalid regular expression '{}': {}", text, e.what()));
        }
      },
      "with --tensors: only tensors whose path matches this regex");
  return [options] {
    Manifest manifest = load_inputs(with_tag(options->inputs, options->tag), options->model_parts);
    InspectRequest request{options->tensors, options->filter ? &*options->filter : nullptr, options->wide};
    if (options->json_output) {
      out() << inspect_json(manifest, request).dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    } else {
      print_inspect_text(manifest, request, out());
    }
    return 0;
  };
}

}  // namespace ckpt::cli
