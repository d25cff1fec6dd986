// ckpt-tool apply PLAN: writes the outputs of a plan saved with --save-plan.
#include <CLI/CLI.hpp>
#include <chrono>
#include <memory>

#include "ckpt/plan/plan_file.hpp"
#include "commands.hpp"
#include "plan_print.hpp"

namespace ckpt::cli {

Action add_apply_command(CLI::App& app) {
  struct Options {
    std::string plan;
    WriteFlags write;
  };
  auto options = std::make_shared<Options>();
  app.add_option("PLAN", options->plan, "a plan written by stitch or reshard --save-plan")->required();
  add_exec_flags(app, options->write);
  return [options] {
    auto started = std::chrono::steady_clock::now();
    Plan plan = read_plan(options->plan);
    plan.read_only.push_back(options->plan);
    run_plan(plan, {}, options->write, started);
    return 0;
  };
}

}  // namespace ckpt::cli
