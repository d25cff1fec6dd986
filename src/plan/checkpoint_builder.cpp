#include "ckpt/checkpoint_builder.hpp"

#include <fmt/format.h>

#include "ckpt/pyobject.hpp"

namespace ckpt {

using pickle::NodeId;

CheckpointBuilder::CheckpointBuilder(const Checkpoint& base) : base_(base), graph_(base.graph()) {
  const auto* entries = graph_.mapping_entries(graph_.root);
  if (entries == nullptr) {
    throw Error(Location{base.path(), base.pickle_record().name, std::nullopt},
                "the checkpoint's top level is not a dict");
  }
  for (const auto& [k, v] : *entries) {
    auto key = as_str(graph_, k);
    if (!key) throw Error(Location{base.path(), base.pickle_record().name, std::nullopt}, "non-string top-level key");
    top_level_.emplace_back(*key, v);
  }
}

NodeId CheckpointBuilder::add_tensor(const OutputTensor& tensor) {
  std::string key = std::to_string(payloads_.size());
  payloads_.emplace_back(key, tensor);
  return ckpt::add_tensor(graph_, tensor.dtype, tensor.shape, key);
}

NodeId CheckpointBuilder::add_state_dict(const std::vector<OutputTensor>& tensors) {
  NodeId dict = add_ordered_dict(graph_);
  std::map<std::string, NodeId> by_name;
  for (const OutputTensor& tensor : tensors) {
    NodeId node = pickle::kNoNode;
    if (tensor.alias_of) {
      auto it = by_name.find(*tensor.alias_of);
      if (it == by_name.end()) throw Error(fmt::format("{}: tied to {}, which is not in the state dict", tensor.name, *tensor.alias_of));
      node = it->second;
    } else {
      node = add_tensor(tensor);
    }
    by_name[tensor.name] = node;
    NodeId key = graph_.str(tensor.name);
    graph_[dict].entries.emplace_back(key, node);
  }
  return dict;
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

void CheckpointBuilder::set_model_parallel_size(std::int64_t parts) {
  for (const auto& [name, node] : top_level_) {
    if (name == "cfg") config_set_int(graph_, node, {"model", "model_parallel_size"}, parts);
    if (name == "args") config_set_int(graph_, node, {"model_parallel_size"}, parts);
  }
}

PlannedFile CheckpointBuilder::finish(const std::string& path, const std::vector<std::uint32_t>& sources, Plan& plan) {
  pickle::Node root;
  root.kind = pickle::Kind::Dict;
  for (const auto& [name, node] : top_level_) root.entries.emplace_back(graph_.str(name), node);
  graph_.root = graph_.add(std::move(root));

  std::vector<PlannedStorage> storages;
  for (const auto& [key, tensor] : payloads_) {
    PlannedStorage storage;
    storage.key = key;
    storage.data = plan_tensor_record(tensor, sources);
    storages.push_back(std::move(storage));
  }
  std::uint64_t next_key = payloads_.size();
  for (PlannedStorage& carried : carry_storages(graph_, base_, plan, next_key)) storages.push_back(std::move(carried));
  return plan_torch_file(path, archive_name_for(path), graph_, std::move(storages));
}

namespace {

std::uint32_t source_of_segment(const ByteSegment& segment, const std::vector<std::uint32_t>& sources) {
  if (segment.file == ByteSegment::kZeroFile) return CopyOp::kZeros;
  return sources.at(segment.file);
}

}  // namespace

PlannedRecord plan_tensor_record(const OutputTensor& tensor, const std::vector<std::uint32_t>& sources) {
  PlannedRecord record;
  DType from = tensor.source_dtype();
  DType to = tensor.dtype;
  std::uint64_t in_size = dtype_info(from).itemsize;
  std::uint64_t out_size = dtype_info(to).itemsize;
  auto dest_bytes = [&](std::uint64_t source_bytes) { return source_bytes / in_size * out_size; };
  auto make_op = [&](const ByteSegment& segment, std::uint64_t skip, std::uint64_t dest_offset,
                     std::uint64_t source_bytes) {
    CopyOp op;
    op.source = source_of_segment(segment, sources);
    op.source_offset = op.source == CopyOp::kZeros ? 0 : segment.byte_offset + skip;
    op.dest_offset = dest_offset;
    op.nbytes = dest_bytes(source_bytes);
    op.source_dtype = from;
    op.dest_dtype = to;
    if (op.source == CopyOp::kZeros) op.source_dtype = op.dest_dtype = DType::UInt8;  // zeros in any dtype
    return op;
  };

  if (tensor.rows <= 1) {
    for (const TensorSource& part : tensor.parts) {
      for (const ByteSegment& segment : part.segments) {
        if (from == to || segment.file == ByteSegment::kZeroFile) {
          record.append_copy(source_of_segment(segment, sources), segment.byte_offset, dest_bytes(segment.nbytes));
        } else {
          record.copies.push_back(make_op(segment, 0, record.nbytes, segment.nbytes));
          record.nbytes += dest_bytes(segment.nbytes);
        }
      }
    }
    return record;
  }

  // Rows interleaved: output row r is part 0's row r, part 1's row r, ...
  std::uint64_t rows = tensor.rows;
  std::uint64_t out_row = 0;
  for (const TensorSource& part : tensor.parts) out_row += dest_bytes(part.nbytes() / rows);
  record.row_nbytes = out_row;
  record.nbytes = out_row * rows;
  std::uint64_t column = 0;  // destination offset of this part inside an output row
  for (const TensorSource& part : tensor.parts) {
    std::uint64_t part_row = part.nbytes() / rows;  // source bytes
    std::uint64_t position = 0;                     // source bytes of the part consumed so far
    for (const ByteSegment& segment : part.segments) {
      std::uint64_t end = position + segment.nbytes;
      while (position < end) {
        std::uint64_t row = position / part_row;
        std::uint64_t within = position % part_row;
        std::uint64_t skip = position - (end - segment.nbytes);
        std::uint64_t dest = row * out_row + column + dest_bytes(within);
        if (within != 0 || end - position < part_row) {  // part of one row
          std::uint64_t length = std::min(part_row - within, end - position);
          record.copies.push_back(make_op(segment, skip, dest, length));
          position += length;
          continue;
        }
        std::uint64_t whole_rows = (end - position) / part_row;
        CopyOp op = make_op(segment, skip, dest, part_row);
        op.rows = whole_rows;
        op.source_stride = part_row;
        op.dest_stride = out_row;
        record.copies.push_back(op);
        position += whole_rows * part_row;
      }
    }
    column += dest_bytes(part_row);
  }
  return record;
}

}  // namespace ckpt
