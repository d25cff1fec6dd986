#include "ckpt/torch_writer.hpp"

#include <algorithm>
#include <filesystem>

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
  if (na && nb) return std::stoull(a) < std::stoull(b);
  if (na != nb) return na;
  return a < b;
}

}  // namespace

std::string archive_name_for(const std::string& path) {
  std::string stem = std::filesystem::path(path).stem().string();
  return stem.empty() ? "archive" : stem;
}

PlannedFile plan_torch_file(std::string path, const std::string& archive_name, const pickle::Graph& graph,
                            std::vector<PlannedStorage> storages) {
  PlannedFile file;
  file.path = std::move(path);
  std::vector<std::byte> pickle_bytes = pickle::encode(graph);
  PlannedRecord pickle_record;
  pickle_record.name = archive_name + "/data.pkl";
  pickle_record.nbytes = pickle_bytes.size();
  pickle_record.inline_bytes = std::move(pickle_bytes);
  file.records.push_back(std::move(pickle_record));
  file.records.push_back(inline_record(archive_name + "/byteorder", "little"));
  std::sort(storages.begin(), storages.end(),
            [](const PlannedStorage& a, const PlannedStorage& b) { return key_less(a.key, b.key); });
  for (std::size_t i = 0; i + 1 < storages.size(); ++i) {
    if (storages[i].key == storages[i + 1].key) throw Error("two storages planned under key " + storages[i].key);
  }
  for (PlannedStorage& storage : storages) {
    storage.data.name = archive_name + "/data/" + storage.key;
    file.records.push_back(std::move(storage.data));
  }
  file.records.push_back(inline_record(archive_name + "/version", "3\n"));
  return file;
}

std::vector<PlannedStorage> copy_all_storages(const Checkpoint& checkpoint, Plan& plan) {
  std::uint32_t source = plan.add_source(checkpoint.file());
  std::vector<PlannedStorage> out;
  for (const auto& [key, storage] : checkpoint.storages()) {
    PlannedStorage planned;
    planned.key = key;
    planned.data.append_copy(source, storage.record->data_offset, storage.record->nbytes);
    out.push_back(std::move(planned));
  }
  return out;
}

}  // namespace ckpt
