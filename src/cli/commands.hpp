// One function per command; each registers its flags on a CLI11 subcommand and
// returns the action to run once parsing succeeded.
#pragma once

#include <functional>

namespace CLI {
class App;
}

namespace ckpt::cli {

using Action = std::function<int()>;

Action add_manifest_command(CLI::App& app);
Action add_inspect_command(CLI::App& app);
Action add_stitch_command(CLI::App& app);
Action add_reshard_command(CLI::App& app);
Action add_diff_command(CLI::App& app);
Action add_verify_command(CLI::App& app);
Action add_synth_command(CLI::App& app);
Action add_apply_command(CLI::App& app);

}  // namespace ckpt::cli
