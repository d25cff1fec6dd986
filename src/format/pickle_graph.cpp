// The pickle Graph: the arena of decoded (or built) nodes, its constructors and
// the queries the readers of a checkpoint ask of it. Decoding and encoding are
// in pickle_decode.cpp and pickle_encode.cpp.
#include "ckpt/format/pickle.hpp"

#include <algorithm>
#include <bit>
#include <stdexcept>

namespace ckpt::pickle {

namespace {

// Node `id` is element `offset` of block `block`. Blocks 0..kDoublings-1 hold
// 64 << b nodes each, so a small graph stays small; every later block holds as
// many as the last of them, so a large one wastes at most one block.
struct ArenaSlot {
  std::size_t block;
  std::size_t offset;
};
constexpr unsigned kFirstBlockBits = 6;
constexpr unsigned kDoublings = 8;
constexpr std::uint64_t kDoubledNodes = ((std::uint64_t{1} << kDoublings) - 1) << kFirstBlockBits;
constexpr unsigned kLastBlockBits = kFirstBlockBits + kDoublings - 1;

ArenaSlot arena_slot(std::uint64_t id) {
  if (id >= kDoubledNodes) {
    std::uint64_t past = id - kDoubledNodes;
    return {kDoublings + static_cast<std::size_t>(past >> kLastBlockBits),
            static_cast<std::size_t>(past & ((std::uint64_t{1} << kLastBlockBits) - 1))};
  }
  std::uint64_t shifted = id + (std::uint64_t{1} << kFirstBlockBits);
  auto block = static_cast<std::size_t>(std::bit_width(shifted)) - 1 - kFirstBlockBits;
  return {block, static_cast<std::size_t>(shifted - (std::uint64_t{1} << (block + kFirstBlockBits)))};
}

std::size_t block_nodes(std::size_t block) {
  return std::size_t{1} << (kFirstBlockBits + std::min<std::size_t>(block, kDoublings - 1));
}

}  // namespace

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
  ArenaSlot slot = arena_slot(size_);
  if (slot.block == blocks_.size()) blocks_.push_back(std::make_unique<Node[]>(block_nodes(slot.block)));
  blocks_[slot.block][slot.offset] = std::move(node);
  return static_cast<NodeId>(size_++);
}

const Node& NodeArena::at(NodeId id) const {
  if (id >= size_) throw std::out_of_range("pickle node id out of range");
  ArenaSlot slot = arena_slot(id);
  return blocks_[slot.block][slot.offset];
}

NodeId Graph::add(Node node) {
  return nodes_.push_back(std::move(node));
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
  return id < nodes_.size() && nodes_.at(id).kind == Kind::Str && nodes_.at(id).text == value;
}

bool Graph::is_global(NodeId id, std::string_view module, std::string_view name) const {
  return id < nodes_.size() && nodes_.at(id).kind == Kind::Global && nodes_.at(id).text == module &&
         nodes_.at(id).name == name;
}

const Node* Graph::object_class(NodeId id) const {
  if (id >= nodes_.size() || nodes_.at(id).kind != Kind::Object) return nullptr;
  NodeId callable = nodes_.at(id).callable;
  return callable < nodes_.size() && nodes_.at(callable).kind == Kind::Global ? &nodes_.at(callable) : nullptr;
}

const std::vector<std::pair<NodeId, NodeId>>* Graph::mapping_entries(NodeId id) const {
  if (id >= nodes_.size()) return nullptr;
  const Node& node = nodes_.at(id);
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
  if (object >= nodes_.size() || nodes_.at(object).kind != Kind::Object) return kNoNode;
  NodeId state = nodes_.at(object).state;
  if (state == kNoNode) return kNoNode;
  // BUILD state is the instance dict, or (dict, slots dict).
  if (nodes_.at(state).kind == Kind::Tuple && nodes_.at(state).items.size() == 2) state = nodes_.at(state).items[0];
  if (state >= nodes_.size() || nodes_.at(state).kind != Kind::Dict) return kNoNode;
  return state;
}

NodeId Graph::attribute(NodeId object, std::string_view name) const {
  NodeId state = state_dict(object);
  return state == kNoNode ? kNoNode : lookup(state, name);
}

}  // namespace ckpt::pickle
