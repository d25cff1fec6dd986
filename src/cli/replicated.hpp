// Replicated tensors (layer norms, row-parallel biases) should be identical in
// every model part; metaseq's scripts only log a difference. We compare them in
// bounded chunks before writing anything.
#pragma once

#include <string>
#include <vector>

#include "ckpt/stitch.hpp"

namespace ckpt::cli {

// One message per tensor whose parts differ, with the largest difference.
std::vector<std::string> compare_replicated(const std::vector<ReplicatedCheck>& checks,
                                            const std::vector<const MappedFile*>& files);
// Prints each as a warning, or throws the first when `strict`.
void report_replicated(const std::vector<ReplicatedCheck>& checks, const std::vector<const MappedFile*>& files,
                       bool strict);

}  // namespace ckpt::cli
