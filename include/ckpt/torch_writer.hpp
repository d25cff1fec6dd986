// Planning a torch.save file: the pickle, its storages and torch's bookkeeping
// records, as a PlannedFile for the executor.
//
// Records, in order: <a>/data.pkl, <a>/byteorder ("little"), <a>/data/<key> in
// numeric key order, <a>/version ("3\n"). torch.load of any version since 1.6
// reads this; data is 64-byte aligned by the zip layout.
#pragma once

#include <string>
#include <vector>

#include "ckpt/checkpoint.hpp"
#include "ckpt/pickle.hpp"
#include "ckpt/plan.hpp"

namespace ckpt {

struct PlannedStorage {
  std::string key;      // record <archive>/data/<key>
  PlannedRecord data;   // name is filled in by plan_torch_file
};

PlannedFile plan_torch_file(std::string path, const std::string& archive_name, const pickle::Graph& graph,
                            std::vector<PlannedStorage> storages);

// The archive name torch.save would give `path`: the file's stem.
std::string archive_name_for(const std::string& path);

// Every storage of `checkpoint`, copied whole from its record.
std::vector<PlannedStorage> copy_all_storages(const Checkpoint& checkpoint, Plan& plan);

// Building new objects in a graph, the way torch.save pickles them.
// A contiguous tensor of `shape` over all of storage `storage_key`:
// _rebuild_tensor_v2(('storage', torch.<Type>Storage, key, 'cpu', numel), 0, shape, stride, False, OrderedDict()).
pickle::NodeId add_tensor(pickle::Graph& graph, DType dtype, const std::vector<std::int64_t>& shape,
                          const std::string& storage_key);
// collections.OrderedDict() (fill its `entries`).
pickle::NodeId add_ordered_dict(pickle::Graph& graph);
// torch.Size((d0, d1, ...)).
pickle::NodeId add_torch_size(pickle::Graph& graph, const std::vector<std::int64_t>& shape);
// A list of nodes, and a list of ints.
pickle::NodeId add_list(pickle::Graph& graph, std::vector<pickle::NodeId> items);
pickle::NodeId add_int_list(pickle::Graph& graph, const std::vector<std::int64_t>& values);

// For a graph copied from `from` and then edited: the storages of `from` that
// are still reachable from graph.root get new keys, counting from `next_key`,
// and are planned as whole-record copies. Storages not in `from` are left alone.
std::vector<PlannedStorage> carry_storages(pickle::Graph& graph, const Checkpoint& from, Plan& plan,
                                           std::uint64_t& next_key);

}  // namespace ckpt
