// A pickle codec that never executes anything: pickles (protocols 2-5) are
// decoded into a graph of plain values, and graphs are encoded back to pickles.
//
// Nothing in this module can import a module or call a function. A GLOBAL is a
// pair of strings; REDUCE and NEWOBJ make an Object node that records the callable
// (or class) and its arguments; BUILD, SETITEM(S) and APPEND(S) applied to an
// object are recorded in it. Encoding an Object re-emits exactly those steps, so
// the real unpickler (torch.load) rebuilds the same object: argparse.Namespace,
// OmegaConf configs and classes that only the training code defines come through
// as data.
//
// The graph keeps sharing and cycles: nodes refer to each other by id, and the
// memo maps to node ids. Containers (and objects) are created empty and filled
// afterwards, exactly as the pickle stream does, which is what lets an OmegaConf
// child point back at a parent that is still being built.
//
// A graph is compact, since a state dict of 200,000 tensors is some two million
// nodes: a node is a 16-byte slot, its text and a tuple's items are copied once
// into blocks that never move, and only mutable containers and objects own a
// growable record. Readers get a NodeView by value (graph[id]); writers add a
// Node (a plain value) and change containers through the graph's methods, so no
// reference into the graph is ever held across a change (issue 24's segfault).
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckpt/io/byte_reader.hpp"

namespace ckpt::pickle {

using NodeId = std::uint32_t;
inline constexpr NodeId kNoNode = 0xFFFFFFFF;

enum class Kind : std::uint8_t {
  None,
  Bool,
  Int,     // fits int64
  BigInt,  // LONG1/LONG4 beyond int64: `text` holds two's-complement little-endian bytes
  Float,
  Str,        // UTF-8 bytes as found
  Bytes,      // BINBYTES and friends
  ByteArray,  // BYTEARRAY8 (protocol 5)
  Tuple,
  List,
  Dict,
  Set,
  FrozenSet,
  Global,  // `text` = module, `name` = qualified name
  Object,  // REDUCE / NEWOBJ / NEWOBJ_EX result, plus what was applied to it
  PersId,  // BINPERSID: `callable` holds the persistent id value
};

enum class ObjectOp : std::uint8_t { Reduce, NewObj, NewObjEx };

using Entry = std::pair<NodeId, NodeId>;  // a dict's key and value

// A node as a value: what Graph::add takes, and NodeView::copy() gives.
struct Node {
  Kind kind = Kind::None;
  bool boolean = false;
  std::int64_t integer = 0;
  double real = 0.0;
  std::string text;            // Str, Bytes, ByteArray, BigInt bytes, Global module
  std::string name;            // Global name
  std::vector<NodeId> items;   // Tuple/List/Set/FrozenSet elements; Object APPENDs
  std::vector<Entry> entries;  // Dict entries; Object SETITEMs
  // Object: callable (REDUCE) or class (NEWOBJ) and argument tuple, NEWOBJ_EX
  // keyword dict, and the BUILD state. PersId: `callable` is the id.
  ObjectOp op = ObjectOp::Reduce;
  NodeId callable = kNoNode;
  NodeId args = kNoNode;
  NodeId kwargs = kNoNode;
  NodeId state = kNoNode;
};

// A node as the graph holds it, the same fields as views: text, items and
// entries stay valid while the graph lives, until that very node is changed.
struct NodeView {
  Kind kind = Kind::None;
  bool boolean = false;
  std::int64_t integer = 0;
  double real = 0.0;
  std::string_view text;
  std::string_view name;
  std::span<const NodeId> items;
  std::span<const Entry> entries;
  ObjectOp op = ObjectOp::Reduce;
  NodeId callable = kNoNode;
  NodeId args = kNoNode;
  NodeId kwargs = kNoNode;
  NodeId state = kNoNode;

  Node copy() const;
};

class Graph {
 public:
  Graph();
  Graph(Graph&&) noexcept;
  Graph& operator=(Graph&&) noexcept;
  Graph(const Graph&) = delete;  // nodes point into the graph's own blocks
  Graph& operator=(const Graph&) = delete;
  ~Graph();

  // A graph that starts as `base`, which it shares and never changes: nodes
  // added get the ids after base's, and a node of base is copied on its first
  // change. What lets an output checkpoint be an edited copy of an input
  // without copying the input's graph (the 200,000 tensors of the state dict it
  // replaces among them).
  static Graph over(std::shared_ptr<const Graph> base);

  NodeId add(const Node& node);
  // Checked: an id past the end throws std::out_of_range.
  NodeView operator[](NodeId id) const;
  std::size_t size() const;

  // Changes. A Tuple or FrozenSet is immutable in Python, but replace() may
  // rewrite one (a shape in metadata being cut).
  void append_item(NodeId container, NodeId item);                // List, Set, Object
  void append_entry(NodeId container, NodeId key, NodeId value);  // Dict, Object
  void set_entry_value(NodeId container, std::size_t index, NodeId value);
  void set_state(NodeId object, NodeId state);
  void replace(NodeId id, const Node& node);

  // Values: None, a bool, a small int, a global and the empty tuple are one
  // node each, however often they are asked for (the pickler never memoises
  // the scalars, and an encoder writes a value wherever it is referenced), which
  // saves about half the nodes of a state dict; a larger int is a new node.
  NodeId none();
  NodeId boolean(bool value);
  NodeId integer(std::int64_t value);
  NodeId global(std::string_view module, std::string_view name);
  NodeId empty_tuple();
  // A new str node (a dict key, an object's text); constant_str() is one node
  // per text, for the constants torch pickles once and references after
  // ("storage", "cpu").
  NodeId str(std::string_view value);
  NodeId constant_str(std::string_view value);
  NodeId tuple(std::span<const NodeId> items);
  NodeId tuple(std::initializer_list<NodeId> items) {
    return tuple(std::span<const NodeId>(items.begin(), items.size()));
  }
  // A new node of text (Str, Bytes, ByteArray, BigInt), or of items (Tuple,
  // FrozenSet, List, Set; a Dict empty): what the decoder adds most.
  NodeId add_text(Kind kind, std::string_view value);
  NodeId add_items(Kind kind, std::span<const NodeId> items);

  // Queries on decoded data.
  bool is_str(NodeId id, std::string_view value) const;
  bool is_global(NodeId id, std::string_view module, std::string_view name) const;
  // The global an Object was built from (REDUCE callable or NEWOBJ class), if any.
  std::optional<NodeView> object_class(NodeId id) const;
  // Key/value pairs of a Dict, or of an Object's SETITEMs (OrderedDict); empty
  // for any other node.
  std::span<const Entry> mapping_entries(NodeId id) const;
  bool is_mapping(NodeId id) const;
  // Value under a string key in a dict-like node, or kNoNode.
  NodeId lookup(NodeId mapping, std::string_view key) const;
  // The instance dict an object's BUILD state holds (the state itself, or the
  // first item of a (dict, slots) pair), or kNoNode.
  NodeId state_dict(NodeId object) const;
  // Value of an attribute of an object whose BUILD state is a dict (Namespace),
  // or kNoNode.
  NodeId attribute(NodeId object, std::string_view name) const;

  NodeId root = kNoNode;
  int protocol = 2;  // highest PROTO seen when decoding

 private:
  struct Storage;
  struct Slot;
  const Slot& slot(NodeId id) const;
  NodeId push(const Slot& slot);  // a new node: checks the id space
  Slot& own_slot(NodeId id);      // this graph's copy of the slot, made on the first change
  NodeId interned(NodeId& slot, const Node& node);

  std::shared_ptr<const Graph> base_;  // nodes [0, base_size_), unless edited here
  NodeId base_size_ = 0;
  std::unique_ptr<Storage> storage_;

  // The interned values (none(), integer(), ...), made on first use.
  static constexpr std::int64_t kFirstInterned = -16;
  static constexpr std::int64_t kInternedInts = 1024 + 16;
  std::vector<NodeId> small_ints_;
  NodeId none_ = kNoNode;
  NodeId true_ = kNoNode;
  NodeId false_ = kNoNode;
  NodeId empty_tuple_ = kNoNode;
  std::map<std::string, NodeId, std::less<>> constants_;  // "g:module\nname", "s:text"
};

// Decodes a pickle. `file`, `member` and `base_offset` locate errors: a bad
// opcode is reported with the absolute byte offset of the opcode in the file.
Graph decode(Bytes pickle, const std::string& file, const std::string& member, std::uint64_t base_offset);

// Encodes `graph` from `graph.root`, as CPython's pickler does: every node other
// than a scalar (None, bool, int, float) or the empty tuple is memoised (BINPUT)
// when first written, whether or not it is reached again, and every later
// reference is a BINGET, so sharing and cycles survive. Scalars are written again
// at each reference. The opcodes are those of pickle_ops.hpp.
std::vector<std::byte> encode(const Graph& graph);
// The same, handed to `write` in pieces of about 1 MiB as they are made.
void encode(const Graph& graph, const std::function<void(Bytes)>& write);

// Deepest nesting accepted when encoding, walking or rendering a graph. Python's
// pickler recurses through several frames per level and stops at its recursion
// limit (1000 frames), so no real pickle comes near; the bound keeps our own
// recursion far from the stack's end, even under AddressSanitizer.
inline constexpr int kMaxDepth = 1000;

}  // namespace ckpt::pickle
