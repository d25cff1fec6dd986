// Planning a torch.save file: its records in torch's order, storages copied.
#include "ckpt/plan/torch_file.hpp"

#include <algorithm>
#include <map>

#include "ckpt/format/pyobject.hpp"

namespace ckpt {

namespace {

PlannedRecord inline_record(std::string name, std::string_view text) {
  PlannedRecord record;
  record.name = std::move(name);
  record.nbytes = text.size();
  for (char c : text) record.inline_bytes.push_back(static_cast<std::byte>(c));
  return record;
}

// "2" < "10": numeric keys by value, others after them in byte order.
bool key_less(const std::string& a, const std::string& b) {
  auto numeric = [](const std::string& s) {
    return !s.empty() && s.size() < 19 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  bool na = numeric(a);
  bool nb = numeric(b);
  if (na && nb) {  // by value: without leading zeros, the shorter number is the smaller
    auto digits = [](const std::string& s) {
      std::string_view view(s);
      return view.substr(std::min(view.find_first_not_of('0'), view.size()));
    };
    std::string_view da = digits(a);
    std::string_view db = digits(b);
    return da.size() != db.size() ? da.size() < db.size() : da < db;
  }
  if (na != nb) return na;
  return a < b;
}

}  // namespace

PlannedFile plan_torch_file(std::string path, const std::string& archive_name, const pickle::Graph& graph,
                            std::vector<PlannedStorage> storages) {
  PlannedFile file;
  file.path = std::move(path);
  InlineRecordWriter pickle_record(archive_name + "/data.pkl");
  pickle::encode(graph, [&](Bytes piece) { pickle_record.append(piece); });
  file.records.push_back(pickle_record.finish());
  file.records.push_back(inline_record(archive_name + "/byteorder", "little"));
  auto by_key = [](const PlannedStorage& a, const PlannedStorage& b) { return key_less(a.key, b.key); };
  if (!std::is_sorted(storages.begin(), storages.end(), by_key)) std::sort(storages.begin(), storages.end(), by_key);
  for (std::size_t i = 0; i + 1 < storages.size(); ++i) {
    check_invariant(storages[i].key != storages[i + 1].key, "two storages planned under key " + storages[i].key);
  }
  for (PlannedStorage& storage : storages) {
    storage.data.name = archive_name + "/data/" + storage.key;
    file.records.push_back(std::move(storage.data));
  }
  file.records.push_back(inline_record(archive_name + "/version", "3\n"));
  return file;
}

PlanSource plan_source(const Checkpoint& checkpoint) {
  std::vector<CheckedRange> records;
  for (const auto& [key, storage] : checkpoint.storages()) {
    records.push_back({storage.record->data_offset, storage.record->nbytes, storage.record->crc32});
  }
  return plan_source(checkpoint.file(), std::move(records));
}

std::vector<PlannedStorage> copy_all_storages(const Checkpoint& checkpoint, Plan& plan) {
  std::uint32_t source = plan.add_source(plan_source(checkpoint));
  std::vector<PlannedStorage> out;
  for (const auto& [key, storage] : checkpoint.storages()) {
    PlannedStorage planned;
    planned.key = key;
    planned.data.append_copy(source, storage.record->data_offset, storage.record->nbytes);
    out.push_back(std::move(planned));
  }
  return out;
}

std::vector<PlannedStorage> carry_storages(pickle::Graph& graph, const Checkpoint& from, std::uint32_t source,
                                           std::uint64_t& next_key) {
  std::map<std::string, std::string> renamed;  // old key -> new key
  std::vector<PlannedStorage> out;
  for (pickle::NodeId id : reachable(graph, graph.root)) {
    if (id >= from.graph().size() || graph[id].kind != pickle::Kind::PersId) continue;
    auto storage_id = parse_storage_id(graph, id);
    if (!storage_id || from.storages().count(storage_id->key) == 0) continue;
    auto [it, inserted] = renamed.try_emplace(storage_id->key, std::to_string(next_key));
    if (inserted) {
      ++next_key;
      const ZipRecord& record = *from.storages().at(storage_id->key).record;
      PlannedStorage planned;
      planned.key = it->second;
      planned.data.append_copy(source, record.data_offset, record.nbytes);
      out.push_back(std::move(planned));
    }
    set_storage_key(graph, id, it->second);
  }
  return out;
}

void set_storage_key(pickle::Graph& graph, pickle::NodeId persid, const std::string& key) {
  std::span<const pickle::NodeId> old_items = graph[graph[persid].callable].items;
  std::vector<pickle::NodeId> items(old_items.begin(), old_items.end());
  items.at(2) = graph.str(key);
  pickle::Node node = graph[persid].copy();
  node.callable = graph.tuple(items);
  graph.replace(persid, node);
}

}  // namespace ckpt
