// Replicated tensors (layer norms, row-parallel biases) should be identical in
// every model part; metaseq's scripts only log a difference. We compare them in
// bounded chunks before writing anything.
#pragma once

#include <string>
#include <vector>

#include "ckpt/plan/stitch.hpp"

namespace ckpt {

// One message per tensor whose parts differ, with the largest difference.
std::vector<std::string> compare_replicated(const std::vector<ReplicatedCheck>& checks,
                                            const std::vector<const MappedFile*>& files);

}  // namespace ckpt
