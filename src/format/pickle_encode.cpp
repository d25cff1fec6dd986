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
#include <optional>
#include <span>

#include "ckpt/format/pickle.hpp"
#include "ckpt/format/pickle_ops.hpp"
#include "ckpt/io/byte_writer.hpp"

namespace ckpt::pickle {

namespace {

using enum Op;

class Encoder {
 public:
  Encoder(const Graph& graph, const std::function<void(Bytes)>& write)
      : graph_(graph), write_(write), memo_(graph.size(), kUnset) {}

  void run() {
    op(PROTO);
    out_.u8(static_cast<std::uint64_t>(protocol_needed()));
    emit(graph_.root, 0);
    op(STOP);
    flush();
  }

 private:
  int protocol_needed() const {
    int protocol = 2;
    for (NodeId id = 0; id < graph_.size(); ++id) {
      const NodeView node = graph_[id];
      Kind kind = node.kind;
      // A nested class ("Outer.Inner") is found by its dotted name from protocol 4 on.
      if (kind == Kind::Global && node.name.find('.') != std::string_view::npos) protocol = std::max(protocol, 4);
      if (kind == Kind::Bytes) protocol = std::max(protocol, 3);
      if (kind == Kind::Set || kind == Kind::FrozenSet) protocol = std::max(protocol, 4);
      if (kind == Kind::ByteArray) protocol = std::max(protocol, 5);
    }
    return protocol;
  }

  void op(Op code) { out_.u8(static_cast<std::uint8_t>(code)); }
  // A length-prefixed string: the 1-byte form if there is one and it fits, else
  // the 4-byte form if there is one and it fits, else the 8-byte form.
  void sized(std::optional<Op> op1, std::optional<Op> op4, Op op8, std::string_view bytes) {
    if (op1 && bytes.size() < 256) {
      op(*op1);
      out_.u8(bytes.size());
    } else if (op4 && bytes.size() <= 0xFFFFFFFF) {
      op(*op4);
      out_.u32(bytes.size());
    } else {
      op(op8);
      out_.u64(bytes.size());
    }
    out_.text(bytes);
  }

  void put(NodeId id) {
    std::uint32_t index = next_memo_++;
    memo_[id] = index;
    if (index < 256) {
      op(BINPUT);
      out_.u8(static_cast<std::uint64_t>(index));
    } else {
      op(LONG_BINPUT);
      out_.u32(static_cast<std::uint64_t>(index));
    }
  }
  bool get(NodeId id) {
    std::uint32_t index = memo_[id];
    if (index == kUnset) return false;
    if (index < 256) {
      op(BINGET);
      out_.u8(static_cast<std::uint64_t>(index));
    } else {
      op(LONG_BINGET);
      out_.u32(static_cast<std::uint64_t>(index));
    }
    return true;
  }

  void emit_int(std::int64_t value) {
    if (value >= 0 && value < 256) {
      op(BININT1);
      out_.u8(static_cast<std::uint64_t>(value));
    } else if (value >= 0 && value < 65536) {
      op(BININT2);
      out_.u16(static_cast<std::uint64_t>(value));
    } else if (value >= INT32_MIN && value <= INT32_MAX) {
      op(BININT);
      out_.u32(static_cast<std::uint64_t>(value));
    } else {
      // Minimal two's-complement little-endian bytes, as CPython's encode_long.
      int nbytes = 8;
      while (nbytes > 1) {
        std::int64_t shifted = value >> (8 * (nbytes - 1) - 1);
        if (shifted != 0 && shifted != -1) break;
        --nbytes;
      }
      op(LONG1);
      out_.u8(static_cast<std::uint64_t>(nbytes));
      out_.le(static_cast<std::uint64_t>(value), nbytes);
    }
  }

  void emit_batched(std::span<const NodeId> items, Op one, Op many, int depth) {
    // CPython batches APPENDS/SETITEMS by 1000 items.
    for (std::size_t start = 0; start < items.size(); start += 1000) {
      std::size_t end = std::min(items.size(), start + 1000);
      if (end - start == 1) {
        emit(items[start], depth);
        op(one);
        continue;
      }
      op(MARK);
      for (std::size_t i = start; i < end; ++i) emit(items[i], depth);
      op(many);
    }
  }
  void emit_entries(std::span<const Entry> entries, int depth) {
    for (std::size_t start = 0; start < entries.size(); start += 1000) {
      std::size_t end = std::min(entries.size(), start + 1000);
      bool single = end - start == 1;
      if (!single) op(MARK);
      for (std::size_t i = start; i < end; ++i) {
        emit(entries[i].first, depth);
        emit(entries[i].second, depth);
      }
      op(single ? SETITEM : SETITEMS);
    }
  }

  void emit(NodeId id, int depth) {
    if (out_.size() >= kPieceBytes) flush();
    if (depth > kMaxDepth) throw Error(fmt::format("pickle: objects nested deeper than {} levels", kMaxDepth));
    if (id >= graph_.size()) throw Error("pickle: graph refers to a missing node");
    if (get(id)) return;
    const NodeView node = graph_[id];
    ++depth;
    switch (node.kind) {
      case Kind::None: op(NONE); return;
      case Kind::Bool: op(node.boolean ? NEWTRUE : NEWFALSE); return;
      case Kind::Int: emit_int(node.integer); return;
      case Kind::BigInt:
        if (node.text.size() < 256) {
          op(LONG1);
          out_.u8(node.text.size());
        } else {
          op(LONG4);
          out_.u32(node.text.size());
        }
        out_.text(node.text);
        return;
      case Kind::Float:
        op(BINFLOAT);
        out_.u64_big_endian(std::bit_cast<std::uint64_t>(node.real));
        return;
      case Kind::Str:
        sized(std::nullopt, BINUNICODE, BINUNICODE8, node.text);
        put(id);
        return;
      case Kind::Bytes:
        sized(SHORT_BINBYTES, BINBYTES, BINBYTES8, node.text);
        put(id);
        return;
      case Kind::ByteArray:
        sized(std::nullopt, std::nullopt, BYTEARRAY8, node.text);
        put(id);
        return;
      case Kind::Global:
        if (node.text.find('\n') != std::string_view::npos || node.name.find('\n') != std::string_view::npos) {
          throw Error("pickle: global name contains a newline");
        }
        op(GLOBAL);
        out_.text(node.text);
        out_.u8('\n');
        out_.text(node.name);
        out_.u8('\n');
        put(id);
        return;
      case Kind::Tuple: emit_tuple(id, node, depth); return;
      case Kind::List:
        op(EMPTY_LIST);
        put(id);
        emit_batched(node.items, APPEND, APPENDS, depth);
        return;
      case Kind::Dict:
        op(EMPTY_DICT);
        put(id);
        emit_entries(node.entries, depth);
        return;
      case Kind::Set:
        op(EMPTY_SET);
        put(id);
        if (!node.items.empty()) {
          op(MARK);
          for (NodeId item : node.items) emit(item, depth);
          op(ADDITEMS);
        }
        return;
      case Kind::FrozenSet:
        op(MARK);
        for (NodeId item : node.items) emit(item, depth);
        if (fetch_if_written(id, 0, true)) return;
        op(FROZENSET);
        put(id);
        return;
      case Kind::PersId:
        emit(node.callable, depth);
        if (fetch_if_written(id, 1, false)) return;
        op(BINPERSID);
        put(id);
        return;
      case Kind::Object:
        emit(node.callable, depth);
        emit(node.args, depth);
        if (node.op == ObjectOp::NewObjEx) emit(node.kwargs, depth);
        // Reached again through its own arguments (a list that holds it): the
        // inner emission built it; drop callable and arguments unused and fetch it.
        if (fetch_if_written(id, node.op == ObjectOp::NewObjEx ? 3 : 2, false)) return;
        op(node.op == ObjectOp::Reduce ? REDUCE : node.op == ObjectOp::NewObj ? NEWOBJ : NEWOBJ_EX);
        put(id);
        emit_batched(node.items, APPEND, APPENDS, depth);
        emit_entries(node.entries, depth);
        if (node.state != kNoNode) {
          emit(node.state, depth);
          op(BUILD);
        }
        return;
    }
  }

  // After the parts of an immutable node were written: if writing them wrote the
  // node itself (a cycle through a mutable part), discard the parts from the
  // stack (`pops` POPs, or POP_MARK) and fetch the finished node from the memo.
  bool fetch_if_written(NodeId id, std::size_t pops, bool to_mark) {
    if (memo_[id] == kUnset) return false;
    if (to_mark) {
      op(POP_MARK);
    } else {
      for (std::size_t i = 0; i < pops; ++i) op(POP);
    }
    get(id);
    return true;
  }

  void emit_tuple(NodeId id, const NodeView& node, int depth) {
    if (node.items.empty()) {
      op(EMPTY_TUPLE);
      return;
    }
    bool short_form = node.items.size() <= 3;
    if (!short_form) op(MARK);
    for (NodeId item : node.items) emit(item, depth);
    if (fetch_if_written(id, node.items.size(), !short_form)) return;
    static constexpr Op kShort[] = {EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3};  // [0] unused: handled above
    op(short_form ? kShort[node.items.size()] : TUPLE);
    put(id);
  }

  // The bytes written so far to `write_`: written bytes never change.
  void flush() {
    if (out_.size() == 0) return;
    write_(out_.bytes());
    out_.clear();
  }

  static constexpr std::size_t kPieceBytes = 1 << 20;
  const Graph& graph_;
  const std::function<void(Bytes)>& write_;
  static constexpr std::uint32_t kUnset = 0xFFFFFFFF;
  std::vector<std::uint32_t> memo_;  // per node: its memo index, or kUnset
  std::uint32_t next_memo_ = 0;
  ByteWriter out_;
};

}  // namespace

void encode(const Graph& graph, const std::function<void(Bytes)>& write) {
  Encoder(graph, write).run();
}

std::vector<std::byte> encode(const Graph& graph) {
  std::vector<std::byte> bytes;
  encode(graph, [&](Bytes piece) { bytes.insert(bytes.end(), piece.begin(), piece.end()); });
  bytes.shrink_to_fit();  // a plan holds the pickles of all its outputs
  return bytes;
}

}  // namespace ckpt::pickle
