#include "ckpt/plan/checkpoint_builder.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <unordered_map>

#include "ckpt/format/pyobject.hpp"
#include "ckpt/format/python_globals.hpp"
#include "ckpt/layout/metaseq.hpp"
#include "ckpt/manifest/manifest.hpp"

namespace ckpt {

using pickle::NodeId;

CheckpointBuilder::CheckpointBuilder() = default;

CheckpointBuilder::CheckpointBuilder(const Checkpoint& base)
    : base_(&base), graph_(pickle::Graph::over(base.shared_graph())) {
  if (!graph_.is_mapping(graph_.root)) {
    throw Error(Location{base.path(), base.pickle_record().name, std::nullopt},
                "the checkpoint's top level is not a dict");
  }
  for (const auto& [k, v] : graph_.mapping_entries(graph_.root)) {
    auto key = as_str(graph_, k);
    if (!key) throw Error(Location{base.path(), base.pickle_record().name, std::nullopt}, "non-string top-level key");
    top_level_.emplace_back(*key, v);
  }
  base_model_ = top_level("model");
}

NodeId CheckpointBuilder::add_tensor(const NamedTensor& tensor) {
  std::string key = std::to_string(payloads_.size());
  payloads_.push_back({key, plan_tensor_record(tensor)});
  // torch pickles a parameter's `.data`, whose own requires_grad is False.
  const bool parameter = tensor.kind.wrap != TensorWrap::Tensor;
  NodeId data =
      ckpt::add_tensor(graph_, tensor.dtype(), tensor.source.shape, key, !parameter && tensor.kind.requires_grad);
  if (!parameter) return data;
  NodeId state = tensor.kind.wrap == TensorWrap::ParameterWithState ? parameter_state(tensor.name) : pickle::kNoNode;
  return add_parameter(graph_, data, tensor.kind.requires_grad, state);
}

NodeId CheckpointBuilder::parameter_state(const std::string& key) const {
  NodeId value = base_model_ == pickle::kNoNode ? pickle::kNoNode : graph_.lookup(base_model_, key);
  std::optional<pickle::NodeView> cls = value == pickle::kNoNode ? std::nullopt : graph_.object_class(value);
  if (cls && is_global(*cls, py::kRebuildParameterWithState)) {
    const auto& args = graph_[graph_[value].args].items;
    if (args.size() == 4) return args[3];
  }
  throw Error(Location{base_ != nullptr ? base_->path() : "", state_dict_path(kModelPrefix, key), std::nullopt},
              "an nn.Parameter with Python attributes (_rebuild_parameter_with_state) that is not the one under "
              "this key of the file whose objects are written: its attributes cannot be carried");
}

NodeId CheckpointBuilder::add_inline_tensor(DType dtype, const std::vector<std::int64_t>& shape,
                                            std::vector<std::byte> data) {
  TensorSource source;
  source.dtype = dtype;
  source.shape = shape;
  check_invariant(source.nbytes() == data.size(), "inline tensor data does not match its shape");
  PlannedRecord record;
  record.nbytes = data.size();
  record.inline_bytes = std::move(data);
  std::string key = std::to_string(payloads_.size());
  payloads_.push_back({key, std::move(record)});
  return ckpt::add_tensor(graph_, dtype, shape, key);
}

NodeId CheckpointBuilder::add_state_dict(const std::vector<NamedTensor>& tensors) {
  NodeId dict = add_ordered_dict(graph_);
  std::map<std::string, NodeId> by_name;
  for (const NamedTensor& tensor : tensors) {
    NodeId node = pickle::kNoNode;
    if (tensor.alias_of) {
      auto it = by_name.find(*tensor.alias_of);
      if (it == by_name.end())
        throw Error(fmt::format("{}: tied to {}, which is not in the state dict", tensor.name, *tensor.alias_of));
      node = it->second;
    } else {
      node = add_tensor(tensor);
    }
    by_name[tensor.name] = node;
    NodeId key = graph_.str(tensor.name);
    graph_.append_entry(dict, key, node);
  }
  return dict;
}

NodeId CheckpointBuilder::add_object(const Checkpoint& item, std::uint32_t file, std::uint64_t offset) {
  std::unordered_map<NodeId, NodeId> copied;
  NodeId value = copy_value(graph_, item.graph(), item.graph().root, &copied);
  std::vector<std::pair<NodeId, NodeId>> persids;  // in the item's decoding order: storages numbered as it met them
  for (const auto& [from, id] : copied) {
    if (graph_[id].kind == pickle::Kind::PersId) persids.emplace_back(from, id);
  }
  std::sort(persids.begin(), persids.end());
  std::map<std::string, std::string> renamed;  // the item's storage key -> this file's
  for (const auto& [from, id] : persids) {
    std::optional<StorageId> storage = parse_storage_id(graph_, id);
    auto ref = storage ? item.storages().find(storage->key) : item.storages().end();
    if (ref == item.storages().end()) continue;
    auto [it, inserted] = renamed.try_emplace(storage->key, std::to_string(payloads_.size()));
    if (inserted) {
      PlannedRecord record;
      record.append_copy(file, offset + ref->second.record->data_offset, ref->second.record->nbytes);
      payloads_.push_back({it->second, std::move(record)});
    }
    set_storage_key(graph_, id, it->second);
  }
  return value;
}

void CheckpointBuilder::replace_tensor(NodeId node, const NamedTensor& tensor) {
  std::string key = std::to_string(payloads_.size());
  payloads_.push_back({key, plan_tensor_record(tensor)});
  // The base's requires_grad stays: the tensor's bytes change, not what torch rebuilds.
  const auto& old_args = graph_[graph_[node].args].items;
  bool requires_grad =
      old_args.size() > 4 && graph_[old_args[4]].kind == pickle::Kind::Bool && graph_[old_args[4]].boolean;
  NodeId fresh = ckpt::add_tensor(graph_, tensor.dtype(), tensor.source.shape, key, requires_grad);
  // Keep the node id (and so every reference), take the fresh node's contents.
  pickle::Node updated = graph_[node].copy();
  updated.callable = graph_[fresh].callable;
  updated.args = graph_[fresh].args;
  updated.op = pickle::ObjectOp::Reduce;
  graph_.replace(node, updated);
}

bool CheckpointBuilder::set_entry(NodeId mapping, std::string_view key, NodeId value) {
  if (mapping >= graph_.size()) return false;
  std::span<const pickle::Entry> entries = graph_.mapping_entries(mapping);
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (graph_.is_str(entries[i].first, key)) {
      graph_.set_entry_value(mapping, i, value);
      return true;
    }
  }
  return false;
}

NodeId CheckpointBuilder::top_level(const std::string& key) const {
  for (const auto& [name, node] : top_level_) {
    if (name == key) return node;
  }
  return pickle::kNoNode;
}

void CheckpointBuilder::set_top_level(const std::string& key, NodeId value) {
  for (auto& [name, node] : top_level_) {
    if (name == key) {
      node = value;
      return;
    }
  }
  top_level_.emplace_back(key, value);
}

void CheckpointBuilder::drop_top_level(const std::string& key) {
  std::erase_if(top_level_, [&](const auto& entry) { return entry.first == key; });
}

std::vector<std::string> CheckpointBuilder::top_level_keys() const {
  std::vector<std::string> keys;
  for (const auto& [name, node] : top_level_) keys.push_back(name);
  return keys;
}

void CheckpointBuilder::set_model_parallel_size(std::int64_t parts) {
  for (const auto& [name, node] : top_level_) {
    for (const auto& keys : kModelParallelSizeKeys) {
      if (name == keys.front()) config_set_int(graph_, node, {keys.begin() + 1, keys.end()}, parts);
    }
  }
}

PlannedFile CheckpointBuilder::finish(const std::string& path, const std::vector<std::uint32_t>& sources, Plan& plan) {
  return finish(path, sources, base_ != nullptr ? plan.add_source(plan_source(*base_)) : 0);
}

PlannedFile CheckpointBuilder::finish_value(const std::string& path, const std::string& archive_name, NodeId root,
                                            const std::vector<std::uint32_t>& sources) {
  check_invariant(base_ == nullptr, "a single value planned over a base checkpoint");
  graph_.root = root;
  return plan_torch_file(path, archive_name, graph_, take_storages(sources));
}

std::vector<PlannedStorage> CheckpointBuilder::take_storages(const std::vector<std::uint32_t>& sources) {
  std::vector<PlannedStorage> storages;
  storages.reserve(payloads_.size());
  // Each record was planned with manifest file indices as sources: now the plan's.
  for (; !payloads_.empty(); payloads_.pop_front()) {
    PlannedStorage storage{payloads_.front().key, std::move(payloads_.front().record)};
    map_record_sources(storage.data, sources);
    storages.push_back(std::move(storage));
  }
  return storages;
}

PlannedFile CheckpointBuilder::finish(const std::string& path, const std::vector<std::uint32_t>& sources,
                                      std::uint32_t base_source) {
  // The base's root keeps its type: a dict, or an OrderedDict (an Object with entries).
  pickle::Node root;
  root.kind = pickle::Kind::Dict;
  if (base_ != nullptr && graph_[base_->graph().root].kind == pickle::Kind::Object) {
    root = graph_[base_->graph().root].copy();
    root.entries.clear();
  }
  for (const auto& [name, node] : top_level_) root.entries.emplace_back(graph_.str(name), node);
  graph_.root = graph_.add(std::move(root));

  std::uint64_t next_key = payloads_.size();
  std::vector<PlannedStorage> storages = take_storages(sources);
  if (base_ != nullptr) {
    for (PlannedStorage& carried : carry_storages(graph_, *base_, base_source, next_key))
      storages.push_back(std::move(carried));
  }
  return plan_torch_file(path, archive_name_for(path), graph_, std::move(storages));
}

PlannedRecord plan_tensor_record(const NamedTensor& tensor, const std::vector<std::uint32_t>& sources) {
  PlannedRecord record = plan_tensor_record(tensor);
  map_record_sources(record, sources);
  return record;
}

void map_record_sources(PlannedRecord& record, const std::vector<std::uint32_t>& sources) {
  if (record.copies.empty()) return;  // inline bytes, or an empty tensor
  for (Piece& piece : record.copies) {
    if (piece.mapped()) piece.source = sources.at(piece.source);
  }
  // Plain copies in order merge into as few as possible.
  if (!std::all_of(record.copies.begin(), record.copies.end(), [](const Piece& piece) { return piece.plain(); })) {
    return;
  }
  std::vector<Piece> plain = std::move(record.copies);
  std::sort(plain.begin(), plain.end(), [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
  record.copies.clear();
  record.nbytes = 0;
  for (const Piece& piece : plain) record.append_plain(piece);
}

PlannedRecord plan_tensor_record(const NamedTensor& tensor) {
  PlannedRecord record;
  DType from = tensor.source.dtype;
  DType to = tensor.dtype();
  std::uint64_t in_size = dtype_info(from).itemsize;
  std::uint64_t out_size = dtype_info(to).itemsize;
  // Offsets in the tensor's bytes scale with the itemsize when converting.
  auto dest = [&](std::uint64_t source_bytes) { return source_bytes / in_size * out_size; };
  record.nbytes = dest(tensor.source.nbytes());
  for (const Piece& tensor_piece : tensor.source.pieces) {
    Piece piece;
    bool zeros = tensor_piece.source == Piece::kZeros;
    bool synthetic = tensor_piece.source == Piece::kSynthetic;
    piece.source = tensor_piece.source;
    piece.source_offset = zeros ? 0 : tensor_piece.source_offset;
    piece.offset = dest(tensor_piece.offset);
    piece.nbytes = dest(tensor_piece.nbytes);
    piece.rows = tensor_piece.rows;
    piece.source_stride = tensor_piece.rows > 1 ? tensor_piece.source_stride : 0;
    piece.stride = tensor_piece.rows > 1 ? dest(tensor_piece.stride) : 0;
    if (synthetic) {  // generated directly in the output dtype
      check_invariant(from == to, tensor.name + ": synthetic data cannot be converted");
      piece.source_dtype = piece.dest_dtype = to;
    } else if (!zeros) {  // zeros are zeros in any dtype
      piece.source_dtype = from;
      piece.dest_dtype = to;
    }
    record.copies.push_back(piece);
  }
  return record;
}

}  // namespace ckpt
