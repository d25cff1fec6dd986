// The Python globals ckpt-tool knows: the one table of the callables and classes
// that torch.save and training code put in a pickle and that the readers (tensor
// references, configs, JSON rendering) and the writer (torch_pickle.cpp) name.
//
// A global is matched by its module and name exactly as written (torch.save
// writes its rebuild functions so), or by its qualified name `module.name` where
// other writers may split it differently (protocol 4 may write
// `omegaconf` + `dictconfig.DictConfig`): each use says which. The storage
// classes are `torch.<storage_name>` with the names in the dtype table
// (dtype.cpp), plus torch.UntypedStorage.
#pragma once

#include <string_view>

#include "ckpt/format/pickle.hpp"

namespace ckpt {

struct PyGlobal {
  std::string_view module;
  std::string_view name;
};

namespace py {

// torch.save's tensors: _rebuild_tensor_v2(storage, offset, size, stride, ...),
// wrapped by nn.Parameter and tensor subclasses.
inline constexpr PyGlobal kRebuildTensorV2{"torch._utils", "_rebuild_tensor_v2"};
inline constexpr PyGlobal kRebuildParameter{"torch._utils", "_rebuild_parameter"};
inline constexpr PyGlobal kRebuildParameterWithState{"torch._utils", "_rebuild_parameter_with_state"};
inline constexpr PyGlobal kRebuildFromTypeV2{"torch._tensor", "_rebuild_from_type_v2"};
inline constexpr PyGlobal kTorchSize{"torch", "Size"};
// Sparse tensors: _rebuild_sparse_tensor(layout, (indices, values, size, ...)) for
// every sparse layout, and torch < 2.0's _rebuild_sparse_csr_tensor; the layout a
// call of torch.serialization._get_layout('torch.sparse_coo') or (torch >= 2.0)
// the global torch.sparse_csr.
inline constexpr PyGlobal kRebuildSparseTensor{"torch._utils", "_rebuild_sparse_tensor"};
inline constexpr PyGlobal kRebuildSparseCsrTensor{"torch._utils", "_rebuild_sparse_csr_tensor"};
// Storage classes of persistent ids: torch.<dtype storage_name>, or untyped bytes.
inline constexpr std::string_view kStorageModule = "torch";
inline constexpr PyGlobal kUntypedStorage{kStorageModule, "UntypedStorage"};

inline constexpr PyGlobal kOrderedDict{"collections", "OrderedDict"};

// OmegaConf configs: containers keep their children in `_content`, value nodes
// (AnyNode, IntegerNode, ...) of module omegaconf.nodes keep theirs in `_val`.
inline constexpr PyGlobal kDictConfig{"omegaconf.dictconfig", "DictConfig"};
inline constexpr PyGlobal kListConfig{"omegaconf.listconfig", "ListConfig"};
inline constexpr std::string_view kOmegaConfNodesModule = "omegaconf.nodes";

}  // namespace py

// `node` is the global `g`, module and name exactly.
inline bool is_global(const pickle::NodeView& node, PyGlobal g) {
  return node.kind == pickle::Kind::Global && node.text == g.module && node.name == g.name;
}

// `qualified` (as class_name renders it: "module.name") names `g`.
inline bool is_qualified_name(std::string_view qualified, PyGlobal g) {
  return qualified.size() == g.module.size() + 1 + g.name.size() && qualified.starts_with(g.module) &&
         qualified[g.module.size()] == '.' && qualified.ends_with(g.name);
}

// `qualified` names something inside `module` (or one of its submodules).
inline bool is_in_module(std::string_view qualified, std::string_view module) {
  return qualified.size() > module.size() && qualified.starts_with(module) && qualified[module.size()] == '.';
}

inline pickle::NodeId add_global(pickle::Graph& graph, PyGlobal g) {
  return graph.global(g.module, g.name);
}

}  // namespace ckpt
