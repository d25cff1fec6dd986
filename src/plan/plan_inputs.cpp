#include "ckpt/plan/plan_inputs.hpp"

#include <fmt/format.h>

#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/input_layouts.hpp"

namespace ckpt {

PlanInputs::PlanInputs(Manifest manifest) : manifest_(std::move(manifest)) {
  for (const ManifestFile& file : manifest_.files) {
    mapped_.push_back(std::make_unique<MappedFile>(file.path));
    files_.push_back(mapped_.back().get());
  }
  opened_ = std::make_unique<Opened>();
  opened_->checkpoints.resize(files_.size());
}

PlanInputs::PlanInputs(Manifest manifest, DecodedFiles& decoded) : manifest_(std::move(manifest)) {
  opened_ = std::make_unique<Opened>();
  opened_->checkpoints.resize(manifest_.files.size());
  for (std::size_t i = 0; i < manifest_.files.size(); ++i) {
    DecodedFiles::Decoded kept = decoded.take(manifest_.files[i].path);
    if (kept.file) {
      const Checkpoint& checkpoint = *kept.checkpoint;
      opened_->decoded.add(checkpoint.zip().data(checkpoint.pickle_record()), kept.checkpoint);
      opened_->checkpoints[i] = std::move(kept.checkpoint);
      mapped_.push_back(std::move(kept.file));
    } else {
      mapped_.push_back(std::make_unique<MappedFile>(manifest_.files[i].path));
    }
    files_.push_back(mapped_.back().get());
  }
}

namespace {

// The storage records of `file`, from its manifest entry: each tensor's storage
// begins `storage_offset` elements before the tensor.
std::vector<CheckedRange> storage_records(const ManifestFile& file) {
  std::vector<CheckedRange> records;
  records.reserve(file.tensors.size());
  for (std::size_t i = 0; i < file.tensors.size(); ++i)
    records.push_back({file.storage_start(i), file.tensors[i].storage_nbytes, file.places[i].record_crc32});
  return records;
}

}  // namespace

PlanSource PlanInputs::source(int index) const {
  check_invariant(index >= 0 && static_cast<std::size_t>(index) < files_.size(),
                  fmt::format("source {} of {} input files", index, files_.size()));
  const ManifestFile& file = manifest_.files[static_cast<std::size_t>(index)];
  PlanSource source = plan_source(*files_[static_cast<std::size_t>(index)], storage_records(file));
  source.has_crcs = input_layout(file.format).has_crcs;
  return source;
}

std::shared_ptr<const Checkpoint> PlanInputs::open(int index) const {
  check_invariant(index >= 0 && static_cast<std::size_t>(index) < files_.size(),
                  fmt::format("checkpoint {} of {} input files", index, files_.size()));
  {
    std::lock_guard lock(opened_->mutex);
    if (auto kept = opened_->checkpoints[static_cast<std::size_t>(index)]) return kept;
  }
  const MappedFile& file = *files_[static_cast<std::size_t>(index)];
  ZipArchive zip(file);
  Bytes pickle = zip.data(*locate_torch_zip(zip).pickle);
  std::shared_ptr<const Checkpoint> same = opened_->decoded.find(pickle);
  if (same == nullptr) {  // the first file of these pickle bytes: this one
    same = std::make_shared<const Checkpoint>(file);
    opened_->decoded.add(pickle, same);
    file.drop_resident_pages();
    return same;
  }
  auto opened = std::make_shared<const Checkpoint>(file, std::move(zip), *same);
  file.drop_resident_pages();  // the directory and the pickle, read from the mapping
  return opened;
}

const Checkpoint& PlanInputs::checkpoint(int index) const {
  std::shared_ptr<const Checkpoint> opened;
  {
    std::lock_guard lock(opened_->mutex);
    check_invariant(index >= 0 && static_cast<std::size_t>(index) < files_.size(),
                    fmt::format("checkpoint {} of {} input files", index, files_.size()));
    if (opened_->checkpoints[static_cast<std::size_t>(index)])
      return *opened_->checkpoints[static_cast<std::size_t>(index)];
  }
  opened = open(index);
  std::lock_guard lock(opened_->mutex);
  std::shared_ptr<const Checkpoint>& slot = opened_->checkpoints[static_cast<std::size_t>(index)];
  if (!slot) slot = std::move(opened);
  return *slot;
}

}  // namespace ckpt
