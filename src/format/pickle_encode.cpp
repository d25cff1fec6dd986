// Pickle encoding of a Graph, the way CPython's pickler writes protocol 2.
//
// Objects are emitted as the pickler's save_reduce does: callable (or class),
// argument tuple, REDUCE/NEWOBJ, memo, then APPENDS, SETITEMS and state + BUILD.
// Every non-scalar node is memoised on first emission; later references are
// BINGETs, which preserves sharing (one storage, many tensors) and cycles
// (OmegaConf `_parent`). A tuple met again while its own elements are being
// written is closed with POP_MARK + BINGET, as CPython does for recursive tuples.
#include <fmt/format.h>

#include <bit>

#include "ckpt/format/pickle.hpp"

namespace ckpt::pickle {

namespace {

class Encoder {
 public:
  explicit Encoder(const Graph& graph) : graph_(graph), memo_(graph.size(), -1) {}

  std::vector<std::byte> run() {
    op(0x80);
    op(static_cast<std::uint8_t>(protocol_needed()));
    emit(graph_.root, 0);
    op('.');
    return std::move(out_);
  }

 private:
  int protocol_needed() const {
    int protocol = 2;
    for (NodeId id = 0; id < graph_.size(); ++id) {
      Kind kind = graph_[id].kind;
      if (kind == Kind::Bytes) protocol = std::max(protocol, 3);
      if (kind == Kind::Set || kind == Kind::FrozenSet) protocol = std::max(protocol, 4);
      if (kind == Kind::ByteArray) protocol = std::max(protocol, 5);
    }
    return protocol;
  }

  void op(std::uint8_t code) { out_.push_back(static_cast<std::byte>(code)); }
  void le(std::uint64_t value, int nbytes) {
    for (int i = 0; i < nbytes; ++i) op(static_cast<std::uint8_t>(value >> (8 * i)));
  }
  void raw(std::string_view bytes) {
    for (char c : bytes) op(static_cast<std::uint8_t>(c));
  }
  void sized(std::uint8_t op1, std::uint8_t op4, std::uint8_t op8, std::string_view bytes) {
    if (op1 != 0 && bytes.size() < 256) {
      op(op1);
      le(bytes.size(), 1);
    } else if (op4 != 0 && bytes.size() <= 0xFFFFFFFF) {
      op(op4);
      le(bytes.size(), 4);
    } else {
      op(op8);
      le(bytes.size(), 8);
    }
    raw(bytes);
  }

  void put(NodeId id) {
    std::int64_t index = next_memo_++;
    memo_[id] = index;
    if (index < 256) {
      op('q');
      le(static_cast<std::uint64_t>(index), 1);
    } else {
      op('r');
      le(static_cast<std::uint64_t>(index), 4);
    }
  }
  bool get(NodeId id) {
    std::int64_t index = memo_[id];
    if (index < 0) return false;
    if (index < 256) {
      op('h');
      le(static_cast<std::uint64_t>(index), 1);
    } else {
      op('j');
      le(static_cast<std::uint64_t>(index), 4);
    }
    return true;
  }

  void emit_int(std::int64_t value) {
    if (value >= 0 && value < 256) {
      op('K');
      le(static_cast<std::uint64_t>(value), 1);
    } else if (value >= 0 && value < 65536) {
      op('M');
      le(static_cast<std::uint64_t>(value), 2);
    } else if (value >= INT32_MIN && value <= INT32_MAX) {
      op('J');
      le(static_cast<std::uint64_t>(value), 4);
    } else {
      // Minimal two's-complement little-endian bytes, as CPython's encode_long.
      int nbytes = 8;
      while (nbytes > 1) {
        std::int64_t shifted = value >> (8 * (nbytes - 1) - 1);
        if (shifted != 0 && shifted != -1) break;
        --nbytes;
      }
      op(0x8a);
      le(static_cast<std::uint64_t>(nbytes), 1);
      le(static_cast<std::uint64_t>(value), nbytes);
    }
  }

  void emit_batched(const std::vector<NodeId>& items, std::uint8_t one, std::uint8_t many, int depth) {
    // CPython batches APPENDS/SETITEMS by 1000 items.
    for (std::size_t start = 0; start < items.size(); start += 1000) {
      std::size_t end = std::min(items.size(), start + 1000);
      if (end - start == 1) {
        emit(items[start], depth);
        op(one);
        continue;
      }
      op('(');
      for (std::size_t i = start; i < end; ++i) emit(items[i], depth);
      op(many);
    }
  }
  void emit_entries(const std::vector<std::pair<NodeId, NodeId>>& entries, int depth) {
    for (std::size_t start = 0; start < entries.size(); start += 1000) {
      std::size_t end = std::min(entries.size(), start + 1000);
      bool single = end - start == 1;
      if (!single) op('(');
      for (std::size_t i = start; i < end; ++i) {
        emit(entries[i].first, depth);
        emit(entries[i].second, depth);
      }
      op(single ? 's' : 'u');
    }
  }

  void emit(NodeId id, int depth) {
    if (depth > kMaxDepth) throw Error(fmt::format("pickle: objects nested deeper than {} levels", kMaxDepth));
    if (id >= graph_.size()) throw Error("pickle: graph refers to a missing node");
    if (get(id)) return;
    const Node& node = graph_[id];
    ++depth;
    switch (node.kind) {
      case Kind::None: op('N'); return;
      case Kind::Bool: op(node.boolean ? 0x88 : 0x89); return;
      case Kind::Int: emit_int(node.integer); return;
      case Kind::BigInt:
        if (node.text.size() < 256) {
          op(0x8a);
          le(node.text.size(), 1);
        } else {
          op(0x8b);
          le(node.text.size(), 4);
        }
        raw(node.text);
        return;
      case Kind::Float:
        op('G');
        for (int i = 7; i >= 0; --i) op(static_cast<std::uint8_t>(std::bit_cast<std::uint64_t>(node.real) >> (8 * i)));
        return;
      case Kind::Str:
        sized(0, 'X', 0x8d, node.text);
        put(id);
        return;
      case Kind::Bytes:
        sized('C', 'B', 0x8e, node.text);
        put(id);
        return;
      case Kind::ByteArray:
        sized(0, 0, 0x96, node.text);
        put(id);
        return;
      case Kind::Global:
        if (node.text.find('\n') != std::string::npos || node.name.find('\n') != std::string::npos) {
          throw Error("pickle: global name contains a newline");
        }
        op('c');
        raw(node.text);
        op('\n');
        raw(node.name);
        op('\n');
        put(id);
        return;
      case Kind::Tuple: emit_tuple(id, node, depth); return;
      case Kind::List:
        op(']');
        put(id);
        emit_batched(node.items, 'a', 'e', depth);
        return;
      case Kind::Dict:
        op('}');
        put(id);
        emit_entries(node.entries, depth);
        return;
      case Kind::Set:
        op(0x8f);
        put(id);
        if (!node.items.empty()) {
          op('(');
          for (NodeId item : node.items) emit(item, depth);
          op(0x90);
        }
        return;
      case Kind::FrozenSet:
        op('(');
        for (NodeId item : node.items) emit(item, depth);
        if (fetch_if_written(id, 0, true)) return;
        op(0x91);
        put(id);
        return;
      case Kind::PersId:
        emit(node.callable, depth);
        if (fetch_if_written(id, 1, false)) return;
        op('Q');
        put(id);
        return;
      case Kind::Object:
        emit(node.callable, depth);
        emit(node.args, depth);
        if (node.op == ObjectOp::NewObjEx) emit(node.kwargs, depth);
        // Reached again through its own arguments (a list that holds it): the
        // inner emission built it; drop callable and arguments unused and fetch it.
        if (fetch_if_written(id, node.op == ObjectOp::NewObjEx ? 3 : 2, false)) return;
        op(node.op == ObjectOp::Reduce ? 'R' : node.op == ObjectOp::NewObj ? 0x81 : 0x92);
        put(id);
        emit_batched(node.items, 'a', 'e', depth);
        emit_entries(node.entries, depth);
        if (node.state != kNoNode) {
          emit(node.state, depth);
          op('b');
        }
        return;
    }
  }

  // After the parts of an immutable node were written: if writing them wrote the
  // node itself (a cycle through a mutable part), discard the parts from the
  // stack (`pops` POPs, or POP_MARK) and fetch the finished node from the memo.
  bool fetch_if_written(NodeId id, std::size_t pops, bool to_mark) {
    if (memo_[id] < 0) return false;
    if (to_mark) {
      op('1');
    } else {
      for (std::size_t i = 0; i < pops; ++i) op('0');
    }
    get(id);
    return true;
  }

  void emit_tuple(NodeId id, const Node& node, int depth) {
    if (node.items.empty()) {
      op(')');
      return;
    }
    bool short_form = node.items.size() <= 3;
    if (!short_form) op('(');
    for (NodeId item : node.items) emit(item, depth);
    if (fetch_if_written(id, node.items.size(), !short_form)) return;
    static constexpr std::uint8_t kShort[] = {0, 0x85, 0x86, 0x87};
    op(short_form ? kShort[node.items.size()] : 't');
    put(id);
  }

  const Graph& graph_;
  std::vector<std::int64_t> memo_;
  std::int64_t next_memo_ = 0;
  std::vector<std::byte> out_;
};

}  // namespace

std::vector<std::byte> encode(const Graph& graph) {
  return Encoder(graph).run();
}

}  // namespace ckpt::pickle
