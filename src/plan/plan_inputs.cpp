#include "ckpt/plan/plan_inputs.hpp"

#include <fmt/format.h>

namespace ckpt {

PlanInputs::PlanInputs(Manifest manifest) : manifest_(std::move(manifest)) {
  for (const ManifestFile& file : manifest_.files) {
    mapped_.push_back(std::make_unique<MappedFile>(file.path));
    files_.push_back(mapped_.back().get());
  }
  checkpoints_.resize(files_.size());
}

const Checkpoint& PlanInputs::checkpoint(int index) const {
  check_invariant(index >= 0 && static_cast<std::size_t>(index) < files_.size(),
                  fmt::format("checkpoint {} of {} input files", index, files_.size()));
  std::unique_ptr<Checkpoint>& slot = checkpoints_[static_cast<std::size_t>(index)];
  if (!slot) slot = std::make_unique<Checkpoint>(*files_[static_cast<std::size_t>(index)]);
  return *slot;
}

}  // namespace ckpt
