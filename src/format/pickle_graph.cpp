// The pickle Graph: the arena of decoded (or built) nodes, its constructors and
// the queries the readers of a checkpoint ask of it. Decoding and encoding are
// in pickle_decode.cpp and pickle_encode.cpp.
#include "ckpt/format/pickle.hpp"

namespace ckpt::pickle {

NodeId Graph::add(Node node) {
  if (nodes_.size() >= kNoNode) throw Error("pickle: too many objects");
  nodes_.push_back(std::move(node));
  return static_cast<NodeId>(nodes_.size() - 1);
}

NodeId Graph::none() {
  return add(Node{});
}

NodeId Graph::boolean(bool value) {
  Node node;
  node.kind = Kind::Bool;
  node.boolean = value;
  return add(std::move(node));
}

NodeId Graph::integer(std::int64_t value) {
  Node node;
  node.kind = Kind::Int;
  node.integer = value;
  return add(std::move(node));
}

NodeId Graph::str(std::string_view value) {
  Node node;
  node.kind = Kind::Str;
  node.text = std::string(value);
  return add(std::move(node));
}

NodeId Graph::global(std::string_view module, std::string_view name) {
  Node node;
  node.kind = Kind::Global;
  node.text = std::string(module);
  node.name = std::string(name);
  return add(std::move(node));
}

NodeId Graph::tuple(std::vector<NodeId> items) {
  Node node;
  node.kind = Kind::Tuple;
  node.items = std::move(items);
  return add(std::move(node));
}

bool Graph::is_str(NodeId id, std::string_view value) const {
  return id < nodes_.size() && nodes_[id].kind == Kind::Str && nodes_[id].text == value;
}

bool Graph::is_global(NodeId id, std::string_view module, std::string_view name) const {
  return id < nodes_.size() && nodes_[id].kind == Kind::Global && nodes_[id].text == module && nodes_[id].name == name;
}

const Node* Graph::object_class(NodeId id) const {
  if (id >= nodes_.size() || nodes_[id].kind != Kind::Object) return nullptr;
  NodeId callable = nodes_[id].callable;
  return callable < nodes_.size() && nodes_[callable].kind == Kind::Global ? &nodes_[callable] : nullptr;
}

const std::vector<std::pair<NodeId, NodeId>>* Graph::mapping_entries(NodeId id) const {
  if (id >= nodes_.size()) return nullptr;
  const Node& node = nodes_[id];
  if (node.kind == Kind::Dict || node.kind == Kind::Object) return &node.entries;
  return nullptr;
}

NodeId Graph::lookup(NodeId mapping, std::string_view key) const {
  const auto* entries = mapping_entries(mapping);
  if (entries == nullptr) return kNoNode;
  for (const auto& [k, v] : *entries) {
    if (is_str(k, key)) return v;
  }
  return kNoNode;
}

NodeId Graph::state_dict(NodeId object) const {
  if (object >= nodes_.size() || nodes_[object].kind != Kind::Object) return kNoNode;
  NodeId state = nodes_[object].state;
  if (state == kNoNode) return kNoNode;
  // BUILD state is the instance dict, or (dict, slots dict).
  if (nodes_[state].kind == Kind::Tuple && nodes_[state].items.size() == 2) state = nodes_[state].items[0];
  if (state >= nodes_.size() || nodes_[state].kind != Kind::Dict) return kNoNode;
  return state;
}

NodeId Graph::attribute(NodeId object, std::string_view name) const {
  NodeId state = state_dict(object);
  return state == kNoNode ? kNoNode : lookup(state, name);
}

}  // namespace ckpt::pickle
