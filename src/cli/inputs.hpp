// Turning command-line INPUT arguments into checkpoint files or a manifest.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/io/units.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/plan/plan_inputs.hpp"

namespace CLI {
class App;
}

namespace ckpt::cli {

// Files, globs, folders and indexes become files through expand_inputs
// (manifest/input_layouts.hpp: each layout says what its folders hold).

// A single `.json`/`.json.zst` argument is read as a manifest (and checked to be
// fresh, and noted in the session's manifests_read: run_plan tells the
// executor they are inputs, never to be written); anything else is indexed now.
// With `keep`, the checkpoints decoded on the way are kept there (DecodedFiles).
Manifest load_inputs(const std::vector<std::string>& inputs, std::optional<std::int64_t> model_parts = std::nullopt,
                     DecodedFiles* keep = nullptr);

// What stitch, reshard and diff read: load_inputs, then every file mapped. With
// `grid_first`, the files must be one complete grid (complete_grid's Error),
// checked before any file is mapped.
PlanInputs open_inputs(const std::vector<std::string>& inputs, std::optional<std::int64_t> model_parts,
                       bool grid_first = false);

// --model-parts N: the part count of the input set, in place of what its cfg
// declares (for stitch, reshard, inspect, verify and diff).
void add_model_parts_flag(CLI::App& app, std::optional<std::int64_t>& model_parts);

// --tag TAG: the step folder of a DeepSpeed save to read, in place of the
// one its `latest` names.
void add_tag_flag(CLI::App& app, std::string& tag);
// `inputs` with every folder that holds a folder `tag` replaced by that one;
// unchanged when `tag` is empty. Throws a usage Error when none holds it.
std::vector<std::string> with_tag(std::vector<std::string> inputs, const std::string& tag);

using ckpt::human_bytes;  // "12.3 MiB" (io/units.hpp)
// " (12.3 MiB/s)" for `nbytes` in `seconds`; "" below a millisecond, which no
// clock here measures a rate from.
std::string rate_text(std::uint64_t nbytes, double seconds);
// 7094016 -> "7,094,016", whatever the locale.
std::string grouped(std::uint64_t count);

}  // namespace ckpt::cli
