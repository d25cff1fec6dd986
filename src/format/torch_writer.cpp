#include "ckpt/torch_writer.hpp"

#include "ckpt/pyobject.hpp"

#include <algorithm>
#include <map>
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

namespace {

pickle::NodeId add_storage_id(pickle::Graph& graph, DType dtype, const std::string& key, std::uint64_t numel) {
  pickle::NodeId id = graph.tuple({graph.str("storage"), graph.global("torch", dtype_info(dtype).storage_name),
                                   graph.str(key), graph.str("cpu"), graph.integer(static_cast<std::int64_t>(numel))});
  pickle::Node persid;
  persid.kind = pickle::Kind::PersId;
  persid.callable = id;
  return graph.add(std::move(persid));
}

pickle::NodeId add_reduce(pickle::Graph& graph, pickle::NodeId callable, pickle::NodeId args) {
  pickle::Node node;
  node.kind = pickle::Kind::Object;
  node.op = pickle::ObjectOp::Reduce;
  node.callable = callable;
  node.args = args;
  return graph.add(std::move(node));
}

pickle::NodeId int_tuple(pickle::Graph& graph, const std::vector<std::int64_t>& values) {
  std::vector<pickle::NodeId> items;
  for (std::int64_t value : values) items.push_back(graph.integer(value));
  return graph.tuple(std::move(items));
}

}  // namespace

pickle::NodeId add_torch_size(pickle::Graph& graph, const std::vector<std::int64_t>& shape) {
  return add_reduce(graph, graph.global("torch", "Size"), graph.tuple({int_tuple(graph, shape)}));
}

pickle::NodeId add_list(pickle::Graph& graph, std::vector<pickle::NodeId> items) {
  pickle::Node list;
  list.kind = pickle::Kind::List;
  list.items = std::move(items);
  return graph.add(std::move(list));
}

pickle::NodeId add_int_list(pickle::Graph& graph, const std::vector<std::int64_t>& values) {
  std::vector<pickle::NodeId> items;
  for (std::int64_t value : values) items.push_back(graph.integer(value));
  return add_list(graph, std::move(items));
}

pickle::NodeId add_ordered_dict(pickle::Graph& graph) {
  return add_reduce(graph, graph.global("collections", "OrderedDict"), graph.tuple({}));
}

pickle::NodeId add_tensor(pickle::Graph& graph, DType dtype, const std::vector<std::int64_t>& shape,
                          const std::string& storage_key) {
  std::vector<std::int64_t> stride(shape.size(), 1);
  std::uint64_t numel = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    stride[i] = static_cast<std::int64_t>(numel);
    numel *= static_cast<std::uint64_t>(shape[i]);
  }
  pickle::NodeId args = graph.tuple({add_storage_id(graph, dtype, storage_key, numel), graph.integer(0),
                                     int_tuple(graph, shape), int_tuple(graph, stride), graph.boolean(false),
                                     add_ordered_dict(graph)});
  return add_reduce(graph, graph.global("torch._utils", "_rebuild_tensor_v2"), args);
}

std::vector<PlannedStorage> carry_storages(pickle::Graph& graph, const Checkpoint& from, Plan& plan,
                                           std::uint64_t& next_key) {
  std::map<std::string, std::string> renamed;  // old key -> new key
  std::vector<PlannedStorage> out;
  std::uint32_t source = 0;
  bool have_source = false;
  for (pickle::NodeId id : reachable(graph, graph.root)) {
    if (id >= from.graph().size() || graph[id].kind != pickle::Kind::PersId) continue;
    auto storage_id = parse_storage_id(graph, id);
    if (!storage_id || from.storages().count(storage_id->key) == 0) continue;
    auto [it, inserted] = renamed.try_emplace(storage_id->key, std::to_string(next_key));
    if (inserted) {
      ++next_key;
      if (!have_source) {
        source = plan.add_source(from.file());
        have_source = true;
      }
      const ZipRecord& record = *from.storages().at(storage_id->key).record;
      PlannedStorage planned;
      planned.key = it->second;
      planned.data.append_copy(source, record.data_offset, record.nbytes);
      out.push_back(std::move(planned));
    }
    // A fresh id tuple: the old one's nodes may be shared with other values.
    pickle::NodeId old_tuple = graph[id].callable;
    std::vector<pickle::NodeId> items = graph[old_tuple].items;
    items[2] = graph.str(it->second);
    pickle::NodeId fresh = graph.tuple(std::move(items));
    graph[id].callable = fresh;
  }
  return out;
}

}  // namespace ckpt
