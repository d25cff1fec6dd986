// Planning a torch.save file: the pickle, its storages and torch's bookkeeping
// records, as a PlannedFile for the executor.
//
// Records, in order: <a>/data.pkl, <a>/byteorder ("little"), <a>/data/<key> in
// numeric key order, <a>/version ("3\n"). torch.load of any version since 1.6
// reads this; data is 64-byte aligned by the zip layout.
#pragma once

#include <string>
#include <vector>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/format/torch_pickle.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

struct PlannedStorage {
  std::string key;     // record <archive>/data/<key>
  PlannedRecord data;  // name is filled in by plan_torch_file
};

PlannedFile plan_torch_file(std::string path, const std::string& archive_name, const pickle::Graph& graph,
                            std::vector<PlannedStorage> storages);

// `checkpoint`'s file as a plan's input: its storage records, from its zip directory.
PlanSource plan_source(const Checkpoint& checkpoint);

// Every storage of `checkpoint`, copied whole from its record.
std::vector<PlannedStorage> copy_all_storages(const Checkpoint& checkpoint, Plan& plan);

// The storage the PersId node `persid` refers to renamed `key` (record
// <archive>/data/<key>), in a fresh id tuple: the old one's nodes may be
// shared with other values.
void set_storage_key(pickle::Graph& graph, pickle::NodeId persid, const std::string& key);

// For a graph copied from `from` and then edited: the storages of `from` that
// are still reachable from graph.root get new keys, counting from `next_key`,
// and are planned as whole-record copies from the plan's source `source` (from's
// file). Storages not in `from` are left alone.
std::vector<PlannedStorage> carry_storages(pickle::Graph& graph, const Checkpoint& from, std::uint32_t source,
                                           std::uint64_t& next_key);

}  // namespace ckpt
