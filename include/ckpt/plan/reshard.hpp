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
  bool list_tensors = true;           // fill ReshardPlan::tensors (for --dry-run); hundreds of outputs' worth
};

struct ReshardPlan {
  Plan plan;
  std::vector<std::string> outputs;                // [m * dp + d]
  std::vector<std::vector<OutputTensor>> tensors;  // new tensors of each output, in storage order (list_tensors)
  std::vector<ReplicatedCheck> checks;
};

// The output path for part m, shard d: `{m}` and `{d}` in `pattern` replaced.
// Throws Error when the pattern cannot tell the outputs apart.
std::string output_path(const std::string& pattern, int mp, int dp, int m, int d);

// Output (m, d) is an edited copy of input part m % M, shard d % D (decoded
// through `inputs.checkpoint`), named by `pattern` (see output_path); outputs
// are planned in the order m, then d. Throws Error before anything is written
// when the grid is incomplete, a dimension does not split, or the request is
// impossible.
ReshardPlan plan_reshard(const PlanInputs& inputs, const std::string& pattern, const ReshardOptions& options);

}  // namespace ckpt
