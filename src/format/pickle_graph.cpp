// The pickle Graph: compact storage of decoded (or built) nodes, its
// constructors and the queries the readers of a checkpoint ask of it. Decoding
// and encoding are in pickle_decode.cpp and pickle_encode.cpp.
#include <algorithm>
#include <bit>
#include <deque>
#include <limits>
#include <stdexcept>

#include "ckpt/format/pickle.hpp"

namespace ckpt::pickle {

namespace {

// Values appended to blocks that never move: what text and tuple items point to.
template <typename T>
class Blocks {
 public:
  const T* copy(std::span<const T> values) {
    if (values.empty()) return nullptr;
    if (values.size() > kBlock / 4) {  // its own block, kept before the one being filled
      T* own = blocks_.emplace_back(std::make_unique_for_overwrite<T[]>(values.size())).get();
      std::copy(values.begin(), values.end(), own);
      if (blocks_.size() > 1) std::swap(blocks_[blocks_.size() - 1], blocks_[blocks_.size() - 2]);
      return own;
    }
    if (blocks_.empty() || used_ + values.size() > kBlock) {
      blocks_.push_back(std::make_unique_for_overwrite<T[]>(kBlock));
      used_ = 0;
    }
    T* out = blocks_.back().get() + used_;
    std::copy(values.begin(), values.end(), out);
    used_ += values.size();
    return out;
  }

 private:
  static constexpr std::size_t kBlock = std::size_t{64} << 10;
  std::vector<std::unique_ptr<T[]>> blocks_;
  std::size_t used_ = 0;
};

// An append-only sequence whose elements never move. Blocks 0..kDoublings-1
// hold 64 << b elements each, so a small graph stays small; every later block
// holds as many as the last of them, so a large one wastes at most one block.
template <typename T>
class StableVector {
 public:
  std::size_t size() const { return size_; }
  std::size_t push_back(const T& value) {
    Place place = place_of(size_);
    if (place.block == blocks_.size()) blocks_.push_back(std::make_unique<T[]>(block_size(place.block)));
    blocks_[place.block][place.offset] = value;
    return size_++;
  }
  T& operator[](std::size_t i) { return const_cast<T&>(std::as_const(*this)[i]); }
  const T& operator[](std::size_t i) const {
    Place place = place_of(i);
    return blocks_[place.block][place.offset];
  }

 private:
  static constexpr unsigned kFirstBits = 6;
  static constexpr unsigned kDoublings = 8;
  static constexpr std::uint64_t kDoubled = ((std::uint64_t{1} << kDoublings) - 1) << kFirstBits;
  static constexpr unsigned kLastBits = kFirstBits + kDoublings - 1;
  struct Place {
    std::size_t block;
    std::size_t offset;
  };
  static Place place_of(std::uint64_t i) {
    if (i >= kDoubled) {
      std::uint64_t past = i - kDoubled;
      return {kDoublings + static_cast<std::size_t>(past >> kLastBits),
              static_cast<std::size_t>(past & ((std::uint64_t{1} << kLastBits) - 1))};
    }
    std::uint64_t shifted = i + (std::uint64_t{1} << kFirstBits);
    auto block = static_cast<std::size_t>(std::bit_width(shifted)) - 1 - kFirstBits;
    return {block, static_cast<std::size_t>(shifted - (std::uint64_t{1} << (block + kFirstBits)))};
  }
  static std::size_t block_size(std::size_t block) {
    return std::size_t{1} << (kFirstBits + (block < kDoublings ? block : kDoublings - 1));
  }

  std::vector<std::unique_ptr<T[]>> blocks_;
  std::size_t size_ = 0;
};

// What a growable node owns: a List's or Set's items, a Dict's entries, an
// Object's APPENDs and SETITEMs (most objects have none: then no Fill).
struct Fill {
  std::vector<NodeId> items;
  std::vector<Entry> entries;
};

struct ObjectRecord {
  NodeId callable = kNoNode;
  NodeId args = kNoNode;
  NodeId kwargs = kNoNode;
  NodeId state = kNoNode;
  Fill* fill = nullptr;
};

struct GlobalName {
  std::string module;
  std::string name;
};

bool is_text(Kind kind) {
  return kind == Kind::Str || kind == Kind::Bytes || kind == Kind::ByteArray || kind == Kind::BigInt;
}
bool is_filled(Kind kind) {
  return kind == Kind::List || kind == Kind::Set || kind == Kind::Dict;
}

[[noreturn]] void out_of_range() {
  throw std::out_of_range("pickle node id out of range");
}

}  // namespace

struct Graph::Slot {
  Kind kind = Kind::None;
  ObjectOp op = ObjectOp::Reduce;
  bool boolean = false;
  std::uint32_t count = 0;  // bytes of text, items of a tuple or frozenset
  union {
    std::int64_t integer = 0;
    double real;
    const char* chars;
    const NodeId* ids;
    Fill* fill;  // List, Set, Dict
    ObjectRecord* object;
    const GlobalName* global;
    NodeId target;  // PersId
  };
};
struct Graph::Storage {
  static_assert(sizeof(void*) > 8 || sizeof(Slot) == 16, "a node is 16 bytes");

  StableVector<Slot> nodes;          // ids from base_size_
  StableVector<Slot> edited;         // base nodes changed here
  std::vector<NodeId> edited_index;  // per base node: its index in `edited`, or kNoNode; empty until the first edit
  Blocks<char> chars;
  Blocks<NodeId> ids;
  std::deque<Fill> fills;
  std::deque<ObjectRecord> objects;

  Fill* new_fill(const std::vector<NodeId>& items, const std::vector<Entry>& entries) {
    return &fills.emplace_back(Fill{items, entries});
  }
  // The slot's own copy of what a base graph's slot points to, to change.
  void own_parts(Slot& slot) {
    if (is_filled(slot.kind)) slot.fill = &fills.emplace_back(*slot.fill);
    if (slot.kind == Kind::Object) {
      slot.object = &objects.emplace_back(*slot.object);
      if (slot.object->fill != nullptr) slot.object->fill = &fills.emplace_back(*slot.object->fill);
    }
  }
  // The fill of a List, Set, Dict or Object, made on an object's first use.
  Fill& fill_of(Slot& slot) {
    if (slot.kind != Kind::Object) return *slot.fill;
    if (slot.object->fill == nullptr) slot.object->fill = &fills.emplace_back();
    return *slot.object->fill;
  }
  std::deque<GlobalName> globals;

  // A Str, Bytes, ByteArray or BigInt.
  Slot text_slot(Kind kind, std::string_view value) {
    if (!is_text(kind)) throw std::logic_error("pickle: text for a kind without text");
    if (value.size() > std::numeric_limits<std::uint32_t>::max()) {
      throw Error("pickle: a string or bytes value of 4 GiB or more");
    }
    Slot slot;
    slot.kind = kind;
    slot.count = static_cast<std::uint32_t>(value.size());
    slot.chars = chars.copy(std::span<const char>(value));
    return slot;
  }
  // A Tuple or FrozenSet (its items copied once), or a List, Set or Dict (a Fill).
  Slot items_slot(Kind kind, std::span<const NodeId> items) {
    Slot slot;
    slot.kind = kind;
    if (kind == Kind::Tuple || kind == Kind::FrozenSet) {
      slot.count = static_cast<std::uint32_t>(items.size());
      slot.ids = ids.copy(items);
    } else if (is_filled(kind)) {
      slot.fill = &fills.emplace_back();
      slot.fill->items.assign(items.begin(), items.end());
    } else {
      throw std::logic_error("pickle: items for a kind without items");
    }
    return slot;
  }

  Slot make(const Node& node) {
    if (is_text(node.kind)) return text_slot(node.kind, node.text);
    if (node.kind == Kind::Tuple || node.kind == Kind::FrozenSet) return items_slot(node.kind, node.items);
    Slot slot;
    slot.kind = node.kind;
    slot.op = node.op;
    slot.boolean = node.boolean;
    switch (node.kind) {
      case Kind::Int: slot.integer = node.integer; break;
      case Kind::Float: slot.real = node.real; break;
      case Kind::Global: slot.global = &globals.emplace_back(GlobalName{node.text, node.name}); break;
      case Kind::List:
      case Kind::Set:
      case Kind::Dict: slot.fill = new_fill(node.items, node.entries); break;
      case Kind::Object:
        slot.object = &objects.emplace_back(ObjectRecord{node.callable, node.args, node.kwargs, node.state, nullptr});
        if (!node.items.empty() || !node.entries.empty()) slot.object->fill = new_fill(node.items, node.entries);
        break;
      case Kind::PersId: slot.target = node.callable; break;
      default: break;  // None, Bool; text and tuples above
    }
    return slot;
  }
};

Node NodeView::copy() const {
  Node node;
  node.kind = kind;
  node.boolean = boolean;
  node.integer = integer;
  node.real = real;
  node.text = std::string(text);
  node.name = std::string(name);
  node.items.assign(items.begin(), items.end());
  node.entries.assign(entries.begin(), entries.end());
  node.op = op;
  node.callable = callable;
  node.args = args;
  node.kwargs = kwargs;
  node.state = state;
  return node;
}

Graph::Graph() : storage_(std::make_unique<Storage>()) {}
Graph::Graph(Graph&&) noexcept = default;
Graph& Graph::operator=(Graph&&) noexcept = default;
Graph::~Graph() = default;

Graph Graph::over(std::shared_ptr<const Graph> base) {
  Graph graph;
  graph.base_size_ = static_cast<NodeId>(base->size());
  graph.root = base->root;
  graph.protocol = base->protocol;
  graph.base_ = std::move(base);
  return graph;
}

std::size_t Graph::size() const {
  return base_size_ + storage_->nodes.size();
}

const Graph::Slot& Graph::slot(NodeId id) const {
  if (id >= base_size_) {
    if (id - base_size_ >= storage_->nodes.size()) out_of_range();
    return storage_->nodes[id - base_size_];
  }
  const std::vector<NodeId>& edited = storage_->edited_index;
  if (!edited.empty() && edited[id] != kNoNode) return storage_->edited[edited[id]];
  return base_->slot(id);
}

Graph::Slot& Graph::own_slot(NodeId id) {
  if (id >= base_size_) {
    if (id - base_size_ >= storage_->nodes.size()) out_of_range();
    return storage_->nodes[id - base_size_];
  }
  std::vector<NodeId>& edited = storage_->edited_index;
  if (edited.empty()) edited.assign(base_size_, kNoNode);
  if (edited[id] == kNoNode) {
    Slot copy = base_->slot(id);
    // Text and tuple items are never changed in place: sharing base's is safe.
    storage_->own_parts(copy);
    edited[id] = static_cast<NodeId>(storage_->edited.push_back(copy));
  }
  return storage_->edited[edited[id]];
}

NodeView Graph::operator[](NodeId id) const {
  const Slot& slot = this->slot(id);
  NodeView view;
  view.kind = slot.kind;
  view.boolean = slot.boolean;
  view.op = slot.op;
  if (slot.kind == Kind::Int) view.integer = slot.integer;
  if (slot.kind == Kind::Float) view.real = slot.real;
  if (is_text(slot.kind)) view.text = std::string_view(slot.chars, slot.count);
  if (slot.kind == Kind::Global) {
    view.text = slot.global->module;
    view.name = slot.global->name;
  }
  if (slot.kind == Kind::Tuple || slot.kind == Kind::FrozenSet) view.items = std::span(slot.ids, slot.count);
  if (slot.kind == Kind::PersId) view.callable = slot.target;
  if (is_filled(slot.kind)) {
    view.items = slot.fill->items;
    view.entries = slot.fill->entries;
  }
  if (slot.kind == Kind::Object) {
    const ObjectRecord& o = *slot.object;
    view.callable = o.callable;
    view.args = o.args;
    view.kwargs = o.kwargs;
    view.state = o.state;
    if (o.fill != nullptr) {
      view.items = o.fill->items;
      view.entries = o.fill->entries;
    }
  }
  return view;
}

NodeId Graph::push(const Slot& slot) {
  if (size() >= kNoNode) throw Error("pickle: too many objects");
  return base_size_ + static_cast<NodeId>(storage_->nodes.push_back(slot));
}

NodeId Graph::add(const Node& node) {
  return push(storage_->make(node));
}

void Graph::replace(NodeId id, const Node& node) {
  Slot fresh = storage_->make(node);
  own_slot(id) = fresh;
}

void Graph::append_item(NodeId container, NodeId item) {
  Slot& slot = own_slot(container);
  if (slot.kind != Kind::List && slot.kind != Kind::Set && slot.kind != Kind::Object) {
    throw std::logic_error("pickle: an item appended to a node that takes none");
  }
  storage_->fill_of(slot).items.push_back(item);
}

void Graph::append_entry(NodeId container, NodeId key, NodeId value) {
  Slot& slot = own_slot(container);
  if (slot.kind != Kind::Dict && slot.kind != Kind::Object) {
    throw std::logic_error("pickle: an entry appended to a node that takes none");
  }
  storage_->fill_of(slot).entries.emplace_back(key, value);
}

void Graph::set_entry_value(NodeId container, std::size_t index, NodeId value) {
  Slot& slot = own_slot(container);
  if (slot.kind != Kind::Dict && slot.kind != Kind::Object) throw std::logic_error("pickle: not a mapping");
  storage_->fill_of(slot).entries.at(index).second = value;
}

void Graph::set_state(NodeId object, NodeId state) {
  Slot& slot = own_slot(object);
  if (slot.kind != Kind::Object) throw std::logic_error("pickle: a state set on a node that is not an object");
  slot.object->state = state;
}

NodeId Graph::interned(NodeId& slot, const Node& node) {
  if (slot == kNoNode) slot = add(node);
  return slot;
}

NodeId Graph::none() {
  return interned(none_, Node{});
}

NodeId Graph::boolean(bool value) {
  Node node;
  node.kind = Kind::Bool;
  node.boolean = value;
  return interned(value ? true_ : false_, node);
}

NodeId Graph::integer(std::int64_t value) {
  Node node;
  node.kind = Kind::Int;
  node.integer = value;
  if (value < kFirstInterned || value >= kFirstInterned + kInternedInts) return add(node);
  if (small_ints_.empty()) small_ints_.assign(static_cast<std::size_t>(kInternedInts), kNoNode);
  return interned(small_ints_[static_cast<std::size_t>(value - kFirstInterned)], node);
}

NodeId Graph::global(std::string_view module, std::string_view name) {
  std::string key = "g:" + std::string(module) + "\n" + std::string(name);
  auto it = constants_.find(key);
  if (it != constants_.end()) return it->second;
  Node node;
  node.kind = Kind::Global;
  node.text = std::string(module);
  node.name = std::string(name);
  NodeId id = add(node);
  constants_.emplace(std::move(key), id);
  return id;
}

NodeId Graph::empty_tuple() {
  Node node;
  node.kind = Kind::Tuple;
  return interned(empty_tuple_, node);
}

NodeId Graph::add_text(Kind kind, std::string_view value) {
  return push(storage_->text_slot(kind, value));
}

NodeId Graph::add_items(Kind kind, std::span<const NodeId> items) {
  return push(storage_->items_slot(kind, items));
}

NodeId Graph::str(std::string_view value) {
  return add_text(Kind::Str, value);
}

NodeId Graph::constant_str(std::string_view value) {
  std::string key = "s:" + std::string(value);
  auto it = constants_.find(key);
  if (it != constants_.end()) return it->second;
  NodeId id = str(value);
  constants_.emplace(std::move(key), id);
  return id;
}

NodeId Graph::tuple(std::span<const NodeId> items) {
  return add_items(Kind::Tuple, items);
}

bool Graph::is_str(NodeId id, std::string_view value) const {
  if (id >= size()) return false;
  const Slot& s = slot(id);
  return s.kind == Kind::Str && std::string_view(s.chars, s.count) == value;
}

bool Graph::is_global(NodeId id, std::string_view module, std::string_view name) const {
  if (id >= size()) return false;
  const Slot& s = slot(id);
  return s.kind == Kind::Global && s.global->module == module && s.global->name == name;
}

std::optional<NodeView> Graph::object_class(NodeId id) const {
  if (id >= size() || slot(id).kind != Kind::Object) return std::nullopt;
  NodeId callable = slot(id).object->callable;
  if (callable >= size() || slot(callable).kind != Kind::Global) return std::nullopt;
  return (*this)[callable];
}

bool Graph::is_mapping(NodeId id) const {
  return id < size() && (slot(id).kind == Kind::Dict || slot(id).kind == Kind::Object);
}

std::span<const Entry> Graph::mapping_entries(NodeId id) const {
  if (!is_mapping(id)) return {};
  const Slot& s = slot(id);
  if (s.kind == Kind::Dict) return s.fill->entries;
  if (s.object->fill == nullptr) return {};
  return s.object->fill->entries;
}

NodeId Graph::lookup(NodeId mapping, std::string_view key) const {
  for (const auto& [k, v] : mapping_entries(mapping)) {
    if (is_str(k, key)) return v;
  }
  return kNoNode;
}

NodeId Graph::state_dict(NodeId object) const {
  if (object >= size() || slot(object).kind != Kind::Object) return kNoNode;
  NodeId state = slot(object).object->state;
  if (state == kNoNode || state >= size()) return kNoNode;
  // BUILD state is the instance dict, or (dict, slots dict).
  NodeView view = (*this)[state];
  if (view.kind == Kind::Tuple && view.items.size() == 2) state = view.items[0];
  if (state >= size() || slot(state).kind != Kind::Dict) return kNoNode;
  return state;
}

NodeId Graph::attribute(NodeId object, std::string_view name) const {
  NodeId state = state_dict(object);
  return state == kNoNode ? kNoNode : lookup(state, name);
}

}  // namespace ckpt::pickle
