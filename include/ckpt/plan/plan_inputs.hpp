// What the stitch and reshard planners read: an input set's manifest, each of
// its files mapped, and each file's decoded checkpoint, decoded on first use.
//
//   PlanInputs inputs(build_manifest({"a-shard0.pt", "a-shard1.pt"}));
//   StitchPlan plan = plan_stitch(inputs, {"out.pt"}, StitchOptions{});
//
// The planners take the tensors' byte ranges from the manifest, register every
// mapped file as a source of the plan, and decode only the few files whose
// other objects (cfg, extra_state, ...) an output carries.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "ckpt/format/by_pickle_bytes.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/manifest.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

class PlanInputs {
 public:
  // Maps every file of `manifest`, in order; throws Error naming the first one
  // that cannot be mapped.
  explicit PlanInputs(Manifest manifest);
  // The same, taking the mappings and checkpoints `decoded` kept for these
  // files while the manifest was made (nothing is decoded twice).
  PlanInputs(Manifest manifest, DecodedFiles& decoded);

  const Manifest& manifest() const { return manifest_; }
  // files()[i] maps manifest().files[i].
  const std::vector<const MappedFile*>& files() const { return files_; }
  // manifest().files[index] as a plan's input: its identity and its storage
  // records, with their CRCs, from the manifest.
  PlanSource source(int index) const;
  // The decoded checkpoint of manifest().files[index] (throws Error for a
  // malformed file). Files with the same pickle bytes (the shards of a model
  // part, but for padding) share one decoded graph: each pickle is decoded
  // once. Thread-safe.
  std::shared_ptr<const Checkpoint> open(int index) const;
  // The same, opened on the first call and kept: for the few files a planner
  // returns to.
  const Checkpoint& checkpoint(int index) const;

 private:
  Manifest manifest_;
  std::vector<std::unique_ptr<MappedFile>> mapped_;
  std::vector<const MappedFile*> files_;
  struct Opened {
    std::mutex mutex;                                            // guards checkpoints
    std::vector<std::shared_ptr<const Checkpoint>> checkpoints;  // parallel to files_, null until opened
    ByPickleBytes<Checkpoint> decoded;                           // every pickle decoded: what open() shares
  };
  std::unique_ptr<Opened> opened_;
};

}  // namespace ckpt
