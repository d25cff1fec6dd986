// The pickle Graph: the arena of decoded (or built) nodes, its constructors and
// the queries the readers of a checkpoint ask of it. Decoding and encoding are
// in pickle_decode.cpp and pickle_encode.cpp.
#include "ckpt/format/pickle.hpp"

#include <algorithm>
#include <bit>
#include <stdexcept>

namespace ckpt::pickle {

NodeArena::NodeArena(const NodeArena& other) {
  *this = other;
}

NodeArena& NodeArena::operator=(const NodeArena& other) {
  if (this == &other) return *this;
  blocks_.clear();
  size_ = 0;
  for (std::size_t id = 0; id < other.size_; ++id) push_back(other.at(static_cast<NodeId>(id)));
  return *this;
}

NodeId NodeArena::push_back(Node node) {
  if (size_ >= kNoNode) throw Error("pickle: too many objects");
  Slot slot = slot_of(size_);
  if (slot.block == blocks_.size()) blocks_.push_back(std::make_unique<Node[]>(block_nodes(slot.block)));
  blocks_[slot.block][slot.offset] = std::move(node);
  return static_cast<NodeId>(size_++);
}

void NodeArena::out_of_range() {
  throw std::out_of_range("pickle node id out of range");
}

Graph Graph::over(std::shared_ptr<const Graph> base) {
  Graph graph;
  graph.base_size_ = static_cast<NodeId>(base->size());
  graph.root = base->root;
  graph.protocol = base->protocol;
  graph.base_ = std::move(base);
  return graph;
}

NodeId Graph::add(Node node) {
  if (size() >= kNoNode) throw Error("pickle: too many objects");
  return base_size_ + nodes_.push_back(std::move(node));
}

const Node& Graph::base_node(NodeId id) const {
  if (!edited_index_.empty() && edited_index_[id] != kNoNode) return edited_.at(edited_index_[id]);
  return (*base_)[id];
}

Node& Graph::edit(NodeId id) {
  if (edited_index_.empty()) edited_index_.assign(base_size_, kNoNode);
  if (edited_index_[id] == kNoNode) edited_index_[id] = edited_.push_back((*base_)[id]);
  return edited_.at(edited_index_[id]);
}

NodeId Graph::interned(NodeId& slot, Node node) {
  if (slot == kNoNode) slot = add(std::move(node));
  return slot;
}

NodeId Graph::none() {
  return interned(none_, Node{});
}

NodeId Graph::boolean(bool value) {
  Node node;
  node.kind = Kind::Bool;
  node.boolean = value;
  return interned(value ? true_ : false_, std::move(node));
}

NodeId Graph::integer(std::int64_t value) {
  Node node;
  node.kind = Kind::Int;
  node.integer = value;
  if (value < kFirstInterned || value >= kFirstInterned + kInternedInts) return add(std::move(node));
  if (small_ints_.empty()) small_ints_.assign(static_cast<std::size_t>(kInternedInts), kNoNode);
  return interned(small_ints_[static_cast<std::size_t>(value - kFirstInterned)], std::move(node));
}

NodeId Graph::global(std::string_view module, std::string_view name) {
  std::string key = "g:" + std::string(module) + "\n" + std::string(name);
  auto it = constants_.find(key);
  if (it != constants_.end()) return it->second;
  Node node;
  node.kind = Kind::Global;
  node.text = std::string(module);
  node.name = std::string(name);
  NodeId id = add(std::move(node));
  constants_.emplace(std::move(key), id);
  return id;
}

NodeId Graph::empty_tuple() {
  Node node;
  node.kind = Kind::Tuple;
  return interned(empty_tuple_, std::move(node));
}

NodeId Graph::str(std::string_view value) {
  Node node;
  node.kind = Kind::Str;
  node.text = std::string(value);
  return add(std::move(node));
}

NodeId Graph::constant_str(std::string_view value) {
  std::string key = "s:" + std::string(value);
  auto it = constants_.find(key);
  if (it != constants_.end()) return it->second;
  NodeId id = str(value);
  constants_.emplace(std::move(key), id);
  return id;
}

NodeId Graph::tuple(std::vector<NodeId> items) {
  Node node;
  node.kind = Kind::Tuple;
  node.items = std::move(items);
  return add(std::move(node));
}

bool Graph::is_str(NodeId id, std::string_view value) const {
  return id < size() && (*this)[id].kind == Kind::Str && (*this)[id].text == value;
}

bool Graph::is_global(NodeId id, std::string_view module, std::string_view name) const {
  return id < size() && (*this)[id].kind == Kind::Global && (*this)[id].text == module && (*this)[id].name == name;
}

const Node* Graph::object_class(NodeId id) const {
  if (id >= size() || (*this)[id].kind != Kind::Object) return nullptr;
  NodeId callable = (*this)[id].callable;
  return callable < size() && (*this)[callable].kind == Kind::Global ? &(*this)[callable] : nullptr;
}

const std::vector<std::pair<NodeId, NodeId>>* Graph::mapping_entries(NodeId id) const {
  if (id >= size()) return nullptr;
  const Node& node = (*this)[id];
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
  if (object >= size() || (*this)[object].kind != Kind::Object) return kNoNode;
  NodeId state = (*this)[object].state;
  if (state == kNoNode) return kNoNode;
  // BUILD state is the instance dict, or (dict, slots dict).
  if ((*this)[state].kind == Kind::Tuple && (*this)[state].items.size() == 2) state = (*this)[state].items[0];
  if (state >= size() || (*this)[state].kind != Kind::Dict) return kNoNode;
  return state;
}

NodeId Graph::attribute(NodeId object, std::string_view name) const {
  NodeId state = state_dict(object);
  return state == kNoNode ? kNoNode : lookup(state, name);
}

}  // namespace ckpt::pickle
