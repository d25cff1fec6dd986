// `reshard`: any (MP, DP) grid of a metaseq/fairscale checkpoint to any other,
// optimizer state included, in one pass. Plans only.
#pragma once

#include <string>
#include <vector>

#include "ckpt/plan/plan.hpp"
#include "ckpt/plan/plan_inputs.hpp"
#include "ckpt/plan/stitch.hpp"

namespace ckpt {

struct ReshardOptions {
  int mp = 1;                         // model-parallel parts to write
  int dp = 1;                         // FSDP world size to write
  bool unflatten = false;             // with dp == 1: consolidated (unflattened) parts
  bool drop_optimizer_state = false;  // write no last_optimizer_state
  bool split_qkv = false;             // separate k_proj, v_proj, q_proj (no layout): not metaseq's fused qkv_proj
  bool list_tensors = true;           // fill ReshardPlan::tensors (for --dry-run); hundreds of outputs' worth
};

struct ReshardPlan {
  Plan plan;
  std::vector<std::string> outputs;               // [m * dp + d]
  std::vector<std::vector<NamedTensor>> tensors;  // new tensors of each output, in storage order (list_tensors)
  std::vector<ReplicatedCheck> checks;
  std::vector<std::string> notes;  // what the user should know (what is not written)
};

// The output path for part m, shard d: `{m}` and `{d}` in `pattern` replaced.
// Throws Error when the pattern cannot tell the outputs apart.
std::string output_path(const std::string& pattern, int mp, int dp, int m, int d);

// The weights of `inputs` (a grid, or one consolidated file) re-cut into
// options.mp parts of options.dp FSDP shards. Output (m, d) is an edited copy
// of base part m % M, shard d % D, whose FSDP layout (flat parameters, buffers,
// ties) and other objects it carries: the base grid is `inputs` itself, or
// `layout_from`, a shard set of the same model. The input's optimizer state
// (FSDP flat states, or torch's per-parameter states of a consolidated file)
// is re-cut with its weights and written in place of the base's; a template's
// own is never carried. Outputs are named by `pattern` (see
// output_path) and planned in the order m, then d. Throws Error before
// anything is written when a grid is incomplete, a dimension does not split,
// the template's names and shapes are not the weights', or the request is
// impossible.
ReshardPlan plan_reshard(const PlanInputs& inputs, const std::string& pattern, const ReshardOptions& options,
                         const PlanInputs* layout_from = nullptr);

}  // namespace ckpt
