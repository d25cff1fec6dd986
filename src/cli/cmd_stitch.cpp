// ckpt-tool stitch INPUT... -o OUT.pt
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <memory>
#include <set>

#include "ckpt/format/safetensors.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/plan/reshard.hpp"
#include "ckpt/plan/stitch.hpp"
#include "commands.hpp"
#include "inputs.hpp"
#include "plan_print.hpp"
#include "usage.hpp"

namespace ckpt::cli {

namespace {

// The output format flags into `stitch`; UsageError for flags that do not go together.
template <typename Options>
void set_format(const Options& options, StitchOptions& stitch) {
  std::string format = options.format;
  if (format.empty()) format = options.output.ends_with(".safetensors") ? "safetensors" : "torch";
  stitch.format = format == "safetensors" ? OutputFormat::Safetensors
                  : format == "hf"        ? OutputFormat::HfOpt
                                          : OutputFormat::Torch;
  auto refuse = [&](const char* flag, const char* because) { throw UsageError(fmt::format("{} {}", flag, because)); };
  if (options.max_shard_size_given) {
    if (stitch.format == OutputFormat::Torch) refuse("--max-shard-size", "needs --format safetensors or hf");
    stitch.max_shard_bytes = parse_byte_size(options.max_shard_size, "--max-shard-size");
  }
  if (options.weights_only && stitch.format != OutputFormat::Torch) {
    refuse("--weights-only", "is for --format torch (safetensors holds weights only anyway)");
  }
  if (options.no_cfg && !options.weights_only) refuse("--no-cfg", "needs --weights-only");
  if (options.optimizer_state && (stitch.format != OutputFormat::Torch || options.weights_only)) {
    refuse("--optimizer-state", "is for --format torch without --weights-only");
  }
  if (options.optimizer_state && options.ema)
    refuse("--optimizer-state", "is the state of the weights, not of --ema's");
  stitch.optimizer_state = options.optimizer_state;
  if (!options.hf_config.empty() && stitch.format != OutputFormat::HfOpt) refuse("--hf-config", "needs --format hf");
  if (stitch.format == OutputFormat::HfOpt && options.no_stitch_megatron) {
    refuse("--no-stitch-megatron", "does not go with --format hf: a Hugging Face OPT folder is the whole model");
  }
  if (stitch.format == OutputFormat::HfOpt && options.fused_qkv) {
    refuse("--fused-qkv", "does not go with --format hf: transformers' OPT has separate q, k and v");
  }
  if (stitch.format == OutputFormat::Safetensors && !options.output.ends_with(".safetensors")) {
    refuse("-o", "must end in .safetensors with --format safetensors");
  }
  stitch.weights_only = options.weights_only;
  stitch.keep_cfg = !options.no_cfg;
  for (const std::string& item : options.hf_config) {
    std::size_t equals = item.find('=');
    if (equals == std::string::npos || equals == 0) refuse("--hf-config", "takes KEY=VALUE");
    std::string value = item.substr(equals + 1);
    nlohmann::ordered_json parsed = nlohmann::ordered_json::parse(value, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded()) parsed = value;  // a bare word is a string
    stitch.hf_config.emplace_back(item.substr(0, equals), std::move(parsed));
  }
}

// A folder made for the output, removed again (with the parents made with it)
// unless keep() is called: a failed run leaves nothing behind.
class CreatedDirectory {
 public:
  explicit CreatedDirectory(const std::string& path) {
    std::filesystem::path at = std::filesystem::absolute(path).lexically_normal();
    if (!at.has_filename()) at = at.parent_path();
    std::error_code ec;
    for (std::filesystem::path p = at; !std::filesystem::exists(p, ec); p = p.parent_path()) made_.push_back(p);
    std::filesystem::create_directories(at, ec);
    if (ec)
      throw Error(kind_of_errno(ec.value()), Location{path, "", std::nullopt},
                  "cannot create the folder: " + ec.message());
  }
  ~CreatedDirectory() {
    std::error_code ec;
    for (const auto& p : made_) std::filesystem::remove(p, ec);  // only while empty
  }
  CreatedDirectory(const CreatedDirectory&) = delete;
  CreatedDirectory& operator=(const CreatedDirectory&) = delete;
  void keep() { made_.clear(); }

 private:
  std::vector<std::filesystem::path> made_;  // deepest first
};

// Files of an earlier safetensors export beside `plan`'s: the set's single file,
// index and shards (`<stem>-NNNNN-of-NNNNN.safetensors`) that this run does not
// write. Left there, a reader would mix the two sets (transformers loads
// model.safetensors before an index).
std::vector<std::string> stale_set_files(const Plan& plan, const std::vector<std::string>& outputs, bool folder) {
  std::set<std::string> written;
  for (const PlannedFile& file : plan.files) written.insert(std::filesystem::absolute(file.path).lexically_normal());
  std::vector<std::string> stale;
  for (const std::string& output : outputs) {
    std::filesystem::path path =
        folder ? std::filesystem::path(output) / "model.safetensors" : std::filesystem::path(output);
    std::filesystem::path dir = std::filesystem::absolute(path).lexically_normal().parent_path();
    std::string stem = path.stem().string();
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      std::string name = entry.path().filename().string();
      bool ours = name == stem + ".safetensors" || name == stem + ".safetensors.index.json" ||
                  safetensors_shard_stem(name) == std::optional<std::string_view>(stem);
      if (ours && written.count(entry.path().lexically_normal().string()) == 0) stale.push_back(entry.path().string());
    }
  }
  std::sort(stale.begin(), stale.end());
  return stale;
}

}  // namespace

Action add_stitch_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> inputs;
    std::string output;
    bool no_stitch_megatron = false;
    bool fused_qkv = false;
    std::string dtype;
    WriteFlags write;
    bool ema = false;
    std::string format;  // "": from -o (.safetensors), else torch
    std::string max_shard_size;
    bool weights_only = false;
    bool no_cfg = false;
    bool optimizer_state = false;
    bool max_shard_size_given = false;
    std::vector<std::string> hf_config;
  };
  auto options = std::make_shared<Options>();
  app.add_option("INPUT", options->inputs,
                 "shard files, globs, directories, or a manifest written by `ckpt-tool manifest`")
      ->required();
  app.add_option("-o,--output", options->output,
                 "output file (--format hf: a folder); with --no-stitch-megatron a pattern containing {m}")
      ->required();
  app.add_option("--format", options->format,
                 "torch (default; safetensors when -o ends in .safetensors), safetensors, or hf: a folder of "
                 "safetensors under transformers' OPT names and "
                 "config.json")
      ->check(CLI::IsMember({"torch", "safetensors", "hf"}));
  app.add_option_function<std::string>(
      "--max-shard-size",
      [options](const std::string& size) {
        options->max_shard_size = size;
        options->max_shard_size_given = true;
      },
      "safetensors and hf: at most this many tensor bytes per file (5GB, 500MB, 2GiB), files named "
      "<stem>-00001-of-0000N.safetensors beside <stem>.safetensors.index.json");
  app.add_flag("--weights-only", options->weights_only,
               "torch: write only the state dict and cfg as plain values, what torch.load(weights_only=True) reads");
  app.add_flag("--no-cfg", options->no_cfg, "with --weights-only: drop cfg and args too");
  app.add_flag("--optimizer-state", options->optimizer_state,
               "torch: keep last_optimizer_state, consolidated per parameter as torch's optimizer saves it "
               "(reshard cuts it again with the weights)");
  app.add_option("--hf-config", options->hf_config,
                 "hf: set a config.json field, KEY=VALUE (VALUE as JSON, else a string); repeatable");
  app.add_flag("--no-stitch-megatron", options->no_stitch_megatron, "write one consolidated file per model part");
  app.add_flag("--fused-qkv", options->fused_qkv, "keep one qkv_proj per layer, laid out [k_all; v_all; q_all]");
  app.add_option("--dtype", options->dtype, "convert floating weights: fp16, bf16 or fp32")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32", "float16", "bfloat16", "float32"}));
  app.add_flag("--ema", options->ema, "take the weights from extra_state's EMA copy (ema_fp32_params or ema)");
  add_write_flags(app, options->write);
  return [options] {
    // The pattern before any input is read; its paths once the part count is known.
    PatternRule rule;
    if (options->no_stitch_megatron) {
      rule.m = PatternRule::kRequired;
      rule.refused_because = " (stitch writes no shards)";
      rule.required_because = ": --no-stitch-megatron writes one file per model part";
    } else {
      rule.refused_because = " (stitch writes one file; --no-stitch-megatron writes one per model part, named by {m})";
    }
    rule.syntax_only = options->write.dry_run;
    StitchOptions stitch;
    set_format(*options, stitch);
    const bool folder = stitch.format == OutputFormat::HfOpt;
    if (folder) {
      check_output_directory(options->output);
    } else {
      check_output_pattern(options->output, rule);
      if (!options->no_stitch_megatron && !options->write.dry_run) check_output_file(options->output, options->output);
    }
    auto started = std::chrono::steady_clock::now();
    note_phase(options->write, "reading the inputs");
    PlanInputs inputs = open_inputs(options->inputs, options->write.model_parts, /*grid_first=*/true);
    std::vector<std::vector<int>> grid = complete_grid(inputs.manifest());
    std::vector<std::string> outputs;
    stitch.stitch_megatron = !options->no_stitch_megatron;
    stitch.glue.fused_qkv = options->fused_qkv;
    if (!options->dtype.empty()) stitch.dtype = dtype_from_name(options->dtype);
    if (options->ema) stitch.state_dict = ema_state_dict(inputs.manifest().files[grid[0][0]]);
    if (stitch.stitch_megatron) {
      outputs.push_back(options->output);
    } else {
      const int parts = static_cast<int>(grid.size());
      for (int m = 0; m < parts; ++m) {
        std::string path = output_path(options->output, parts, 1, m, 0);
        if (!options->write.dry_run) check_output_file(options->output, path);
        outputs.push_back(path);
      }
    }

    note_phase(options->write, "planning");
    StitchPlan plan = plan_stitch(inputs, outputs, stitch);
    report_replicated(plan.checks, inputs.files(), options->write.replicated_from_part_0);
    if (!options->write.quiet) {
      for (const std::string& note : plan.notes) print_notice(printable(note));
    }
    std::vector<std::string> stale;
    if (stitch.format != OutputFormat::Torch && !options->write.dry_run) {
      stale = stale_set_files(plan.plan, folder ? std::vector<std::string>{options->output} : outputs, folder);
      if (!stale.empty() && !options->write.force) {
        throw Error(Location{stale.front(), "", std::nullopt},
                    fmt::format("a file of another safetensors set is here ({} in all): readers would mix the two; "
                                "--force writes this set and removes them",
                                stale.size()));
      }
    }
    // Once this set is in place, what is left of the other goes.
    auto remove_stale = [&] {
      std::set<std::string> folders;
      for (const std::string& path : stale) {
        std::error_code ec;
        std::filesystem::remove(path, ec);
        folders.insert(std::filesystem::path(path).parent_path().string());
        if (!options->write.quiet) print_notice("removed " + path + " (of the set written before)");
      }
      for (const std::string& folder : folders) sync_directory(folder.empty() ? "." : folder);  // the removals durable
    };
    if (!options->write.dry_run) plan.tensors = {};  // only a dry run prints them
    if (folder && !options->write.dry_run) {
      CreatedDirectory created(options->output);
      run_plan(plan.plan, plan.tensors, options->write, started);
      created.keep();
      remove_stale();
      return 0;
    }
    run_plan(plan.plan, plan.tensors, options->write, started);
    remove_stale();
    return 0;
  };
}

}  // namespace ckpt::cli
