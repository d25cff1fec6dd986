// The objects torch.save pickles, added to a pickle::Graph: tensors (as
// _rebuild_tensor_v2 over a persistent storage id), torch.Size, OrderedDict,
// lists; and the archive name torch.save gives a file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/format/pickle.hpp"

namespace ckpt {

// What torch.load rebuilds at a tensor's path: the tensor itself, or an
// nn.Parameter wrapping it (torch._utils._rebuild_parameter), one with Python
// attributes of its own (_rebuild_parameter_with_state, torch >= 2.0 writes it
// when there are any).
enum class TensorWrap : std::uint8_t { Tensor, Parameter, ParameterWithState };

// The archive name torch.save would give `path`: the file's stem.
std::string archive_name_for(const std::string& path);

// Building new objects in a graph, the way torch.save pickles them.
// A contiguous tensor of `shape` over all of storage `storage_key`:
// _rebuild_tensor_v2(('storage', torch.<Type>Storage, key, 'cpu', numel), 0, shape, stride, requires_grad,
// OrderedDict()).
pickle::NodeId add_tensor(pickle::Graph& graph, DType dtype, const std::vector<std::int64_t>& shape,
                          const std::string& storage_key, bool requires_grad = false);
// nn.Parameter around the tensor node `data` (whose own requires_grad is
// False, as torch pickles `param.data`): _rebuild_parameter(data,
// requires_grad, OrderedDict()), or with `state` (its Python attributes)
// _rebuild_parameter_with_state(data, requires_grad, OrderedDict(), state).
pickle::NodeId add_parameter(pickle::Graph& graph, pickle::NodeId data, bool requires_grad,
                             pickle::NodeId state = pickle::kNoNode);
// collections.OrderedDict() (fill its `entries`).
pickle::NodeId add_ordered_dict(pickle::Graph& graph);
// torch.Size((d0, d1, ...)).
pickle::NodeId add_torch_size(pickle::Graph& graph, const std::vector<std::int64_t>& shape);
// A list of nodes, and a list of ints.
pickle::NodeId add_list(pickle::Graph& graph, std::vector<pickle::NodeId> items);
pickle::NodeId add_int_list(pickle::Graph& graph, const std::vector<std::int64_t>& values);

}  // namespace ckpt
