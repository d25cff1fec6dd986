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

}  // namespace ckpt
