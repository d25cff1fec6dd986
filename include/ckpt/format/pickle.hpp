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
// The graph keeps sharing and cycles: nodes live in an arena and refer to each
// other by index, and the memo maps to node ids. A node never moves once added,
// so a reference to one stays valid while more are added (builders hold one
// across appends: a growing vector freed them under the caller, issue 24). Containers (and objects) are
// created empty and filled afterwards, exactly as the pickle stream does, which is
// what lets an OmegaConf child point back at a parent that is still being built.
#pragma once

#include <bit>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
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

struct Node {
  Kind kind = Kind::None;
  bool boolean = false;
  std::int64_t integer = 0;
  double real = 0.0;
  std::string text;                                // Str, Bytes, ByteArray, BigInt bytes, Global module
  std::string name;                                // Global name
  std::vector<NodeId> items;                       // Tuple/List/Set elements; Object APPENDs
  std::vector<std::pair<NodeId, NodeId>> entries;  // Dict entries; Object SETITEMs
  // Object: callable (REDUCE) or class (NEWOBJ) and argument tuple, NEWOBJ_EX
  // keyword dict, and the BUILD state. PersId: `callable` is the id.
  ObjectOp op = ObjectOp::Reduce;
  NodeId callable = kNoNode;
  NodeId args = kNoNode;
  NodeId kwargs = kNoNode;
  NodeId state = kNoNode;
};

// The nodes of a graph in blocks that are never reallocated.
class NodeArena {
 public:
  NodeArena() = default;
  NodeArena(const NodeArena& other);
  NodeArena& operator=(const NodeArena& other);
  NodeArena(NodeArena&&) noexcept = default;
  NodeArena& operator=(NodeArena&&) noexcept = default;
  ~NodeArena() = default;

  std::size_t size() const { return size_; }
  NodeId push_back(Node node);
  // Checked: an id past the end throws std::out_of_range.
  Node& at(NodeId id) { return const_cast<Node&>(std::as_const(*this).at(id)); }
  const Node& at(NodeId id) const {
    if (id >= size_) out_of_range();
    Slot slot = slot_of(id);
    return blocks_[slot.block][slot.offset];
  }

 private:
  // Node `id` is element `offset` of block `block`. Blocks 0..kDoublings-1
  // hold 64 << b nodes each, so a small graph stays small; every later block
  // holds as many as the last of them, so a large one wastes at most one block.
  static constexpr unsigned kFirstBlockBits = 6;
  static constexpr unsigned kDoublings = 8;
  static constexpr std::uint64_t kDoubledNodes = ((std::uint64_t{1} << kDoublings) - 1) << kFirstBlockBits;
  static constexpr unsigned kLastBlockBits = kFirstBlockBits + kDoublings - 1;
  struct Slot {
    std::size_t block;
    std::size_t offset;
  };
  static Slot slot_of(std::uint64_t id) {
    if (id >= kDoubledNodes) {
      std::uint64_t past = id - kDoubledNodes;
      return {kDoublings + static_cast<std::size_t>(past >> kLastBlockBits),
              static_cast<std::size_t>(past & ((std::uint64_t{1} << kLastBlockBits) - 1))};
    }
    std::uint64_t shifted = id + (std::uint64_t{1} << kFirstBlockBits);
    auto block = static_cast<std::size_t>(std::bit_width(shifted)) - 1 - kFirstBlockBits;
    return {block, static_cast<std::size_t>(shifted - (std::uint64_t{1} << (block + kFirstBlockBits)))};
  }
  static std::size_t block_nodes(std::size_t block) {
    return std::size_t{1} << (kFirstBlockBits + (block < kDoublings ? block : kDoublings - 1));
  }
  [[noreturn]] static void out_of_range();

  std::vector<std::unique_ptr<Node[]>> blocks_;
  std::size_t size_ = 0;
};

class Graph {
 public:
  Graph() = default;
  // A graph that starts as `base`, which it shares and never changes: nodes
  // added get the ids after base's, and a node of base is copied on its first
  // non-const access. What lets an output checkpoint be an edited copy of an
  // input without copying the input's graph (the 200,000 tensors of the state
  // dict it replaces among them).
  static Graph over(std::shared_ptr<const Graph> base);

  NodeId add(Node node);
  // Checked: an id past the end throws std::out_of_range.
  Node& operator[](NodeId id) { return id >= base_size_ ? nodes_.at(id - base_size_) : edit(id); }
  const Node& operator[](NodeId id) const { return id >= base_size_ ? nodes_.at(id - base_size_) : base_node(id); }
  std::size_t size() const { return base_size_ + nodes_.size(); }

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
  NodeId tuple(std::vector<NodeId> items);

  // Queries on decoded data.
  bool is_str(NodeId id, std::string_view value) const;
  bool is_global(NodeId id, std::string_view module, std::string_view name) const;
  // The global an Object was built from (REDUCE callable or NEWOBJ class), if any.
  const Node* object_class(NodeId id) const;
  // Key/value pairs of a Dict, or of an Object's SETITEMs (OrderedDict).
  const std::vector<std::pair<NodeId, NodeId>>* mapping_entries(NodeId id) const;
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
  Node& edit(NodeId id);
  const Node& base_node(NodeId id) const;

  std::shared_ptr<const Graph> base_;  // nodes [0, base_size_), unless edited here
  NodeId base_size_ = 0;
  std::vector<NodeId> edited_index_;  // per base node: its copy in edited_, or kNoNode; empty until the first edit
  NodeArena edited_;
  NodeArena nodes_;  // ids from base_size_

  // The interned values (none(), integer(), ...), made on first use.
  static constexpr std::int64_t kFirstInterned = -16;
  static constexpr std::int64_t kInternedInts = 1024 + 16;
  NodeId interned(NodeId& slot, Node node);
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

// Deepest nesting accepted when encoding, walking or rendering a graph. Python's
// pickler recurses through several frames per level and stops at its recursion
// limit (1000 frames), so no real pickle comes near; the bound keeps our own
// recursion far from the stack's end, even under AddressSanitizer.
inline constexpr int kMaxDepth = 1000;

}  // namespace ckpt::pickle
