// torch.save's objects, built into a pickle graph the way torch pickles them.
#include "ckpt/format/torch_pickle.hpp"

#include <filesystem>

#include "ckpt/format/python_globals.hpp"

namespace ckpt {

std::string archive_name_for(const std::string& path) {
  std::string stem = std::filesystem::path(path).stem().string();
  return stem.empty() ? "archive" : stem;
}

namespace {

pickle::NodeId add_storage_id(pickle::Graph& graph, DType dtype, const std::string& key, std::uint64_t numel) {
  pickle::NodeId id =
      graph.tuple({graph.constant_str("storage"), graph.global(py::kStorageModule, dtype_info(dtype).storage_name),
                   graph.str(key), graph.constant_str("cpu"), graph.integer(static_cast<std::int64_t>(numel))});
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
  return add_reduce(graph, add_global(graph, py::kTorchSize), graph.tuple({int_tuple(graph, shape)}));
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
  return add_reduce(graph, add_global(graph, py::kOrderedDict), graph.empty_tuple());
}

pickle::NodeId add_tensor(pickle::Graph& graph, DType dtype, const std::vector<std::int64_t>& shape,
                          const std::string& storage_key, bool requires_grad) {
  std::vector<std::int64_t> stride(shape.size(), 1);
  std::uint64_t numel = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    stride[i] = static_cast<std::int64_t>(numel);
    numel *= static_cast<std::uint64_t>(shape[i]);
  }
  pickle::NodeId args =
      graph.tuple({add_storage_id(graph, dtype, storage_key, numel), graph.integer(0), int_tuple(graph, shape),
                   int_tuple(graph, stride), graph.boolean(requires_grad), add_ordered_dict(graph)});
  return add_reduce(graph, add_global(graph, py::kRebuildTensorV2), args);
}

pickle::NodeId add_parameter(pickle::Graph& graph, pickle::NodeId data, bool requires_grad, pickle::NodeId state) {
  std::vector<pickle::NodeId> args{data, graph.boolean(requires_grad), add_ordered_dict(graph)};
  if (state == pickle::kNoNode) return add_reduce(graph, add_global(graph, py::kRebuildParameter), graph.tuple(args));
  args.push_back(state);
  return add_reduce(graph, add_global(graph, py::kRebuildParameterWithState), graph.tuple(std::move(args)));
}

}  // namespace ckpt
