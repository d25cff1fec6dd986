// --dry-run: a plan for people.
#pragma once

#include <cstdio>
#include <vector>

#include "ckpt/exec.hpp"
#include "ckpt/plan.hpp"
#include "ckpt/tensor_source.hpp"

namespace ckpt::cli {

// `tensors[k]` is output file k's state dict, whose storages are the records
// <archive>/data/0, 1, ... in order (aliases have none).
void print_plan(const Plan& plan, const std::vector<std::vector<OutputTensor>>& tensors, std::FILE* out);

// --stats: seconds and GB/s of each stage, on stderr.
void print_stats(const ExecStats& stats, double plan_seconds);

}  // namespace ckpt::cli
