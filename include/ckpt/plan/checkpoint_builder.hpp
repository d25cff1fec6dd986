// Planning an output checkpoint: a copy of a base checkpoint's objects with the
// state dict (and whatever else a command replaces) rebuilt from NamedTensors.
//
// Used by stitch and reshard alike. The builder edits a copy of the base graph,
// so every object the command does not touch (cfg, extra_state, classes only the
// training code defines) is written back exactly as it was read; storages the
// kept objects still reference are copied from the base file.
#pragma once

#include <deque>
#include <map>
#include <string>
#include <vector>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/plan/plan.hpp"
#include "ckpt/plan/torch_file.hpp"

namespace ckpt {

class CheckpointBuilder {
 public:
  explicit CheckpointBuilder(const Checkpoint& base);
  // A checkpoint built from nothing (`synth`): an empty top-level dict.
  CheckpointBuilder();

  pickle::Graph& graph() { return graph_; }
  // A new tensor node whose data is `tensor` (written in tensor.dtype), an
  // nn.Parameter around it when tensor.kind says so, with tensor.kind's
  // requires_grad. A parameter with Python attributes takes them from the
  // base's parameter under the same key of its `model` state dict (Error if
  // there is none).
  pickle::NodeId add_tensor(const NamedTensor& tensor);
  // A new tensor node holding small data given here (a version buffer).
  pickle::NodeId add_inline_tensor(DType dtype, const std::vector<std::int64_t>& shape, std::vector<std::byte> data);
  // An OrderedDict of the tensors, in order; an alias shares its target's node.
  pickle::NodeId add_state_dict(const std::vector<NamedTensor>& tensors);
  // A copy of the object `item` holds (a torch.save archive lying at byte
  // `offset` of manifest file `file`, as a DCP object item does), its storages
  // copied whole from their records there.
  pickle::NodeId add_object(const Checkpoint& item, std::uint32_t file, std::uint64_t offset);
  // Turns the tensor node `node` of the base graph into a new tensor holding
  // `tensor`: every reference to it (dict entries, nn.Parameter wrappers) now
  // sees the new data, so key order, surrounding objects and its
  // requires_grad stay as they were.
  void replace_tensor(pickle::NodeId node, const NamedTensor& tensor);
  // The value under a string key of a dict-like node, replaced; false if absent.
  bool set_entry(pickle::NodeId mapping, std::string_view key, pickle::NodeId value);
  // The top-level value under `key`, or kNoNode.
  pickle::NodeId top_level(const std::string& key) const;
  // The top-level keys, in order.
  std::vector<std::string> top_level_keys() const;
  // Top-level keys: replaced in place, appended when new, or dropped.
  void set_top_level(const std::string& key, pickle::NodeId value);
  void drop_top_level(const std::string& key);
  // model_parallel_size in cfg.model (dict, Namespace or OmegaConf) and in a
  // top-level `args` Namespace, where present.
  void set_model_parallel_size(std::int64_t parts);

  // The planned file: the top level a dict, or an OrderedDict when the base's
  // is one. `sources[i]` is the plan source of manifest file i. Called once:
  // the tensors added go into the plan, freed from the builder as they do.
  PlannedFile finish(const std::string& path, const std::vector<std::uint32_t>& sources, Plan& plan);
  // A file whose pickle is `root` alone (a DCP item: one tensor or one object),
  // archive `archive_name`; for a builder made from nothing.
  PlannedFile finish_value(const std::string& path, const std::string& archive_name, pickle::NodeId root,
                           const std::vector<std::uint32_t>& sources);
  // The same with the base's file already a source of the plan, as
  // `base_source`: touches no shared state, so outputs can be finished in parallel.
  PlannedFile finish(const std::string& path, const std::vector<std::uint32_t>& sources, std::uint32_t base_source);

 private:
  struct Payload {
    std::string key;
    PlannedRecord record;  // its sources manifest file indices until finish() maps them
  };
  pickle::NodeId parameter_state(const std::string& key) const;
  // The payloads as the file's storages, their sources made the plan's; the
  // builder keeps none.
  std::vector<PlannedStorage> take_storages(const std::vector<std::uint32_t>& sources);

  const Checkpoint* base_ = nullptr;
  pickle::Graph graph_;
  pickle::NodeId base_model_ = pickle::kNoNode;                    // the base's `model` state dict
  std::vector<std::pair<std::string, pickle::NodeId>> top_level_;  // in order
  std::deque<Payload> payloads_;  // storage key i -> data (a deque: no copy of them all as it grows)
};

// The record holding one output tensor's data: one copy per source piece
// (strided where the piece is), converting when the output dtype differs. Its
// sources are the tensor's (manifest file indices) until map_record_sources
// turns them into plan sources (`sources[i]` for file i) and merges plain
// ranges; the second form does both.
PlannedRecord plan_tensor_record(const NamedTensor& tensor);
PlannedRecord plan_tensor_record(const NamedTensor& tensor, const std::vector<std::uint32_t>& sources);
void map_record_sources(PlannedRecord& record, const std::vector<std::uint32_t>& sources);

}  // namespace ckpt
