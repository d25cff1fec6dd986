// Pickle decoding into a Graph; nothing is ever executed.
//
// Accepted opcodes (protocols 2-5 as CPython writes them; pickle_ops.hpp):
//   framing     PROTO FRAME STOP
//   scalars     NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 LONG4 BINFLOAT
//   text/bytes  BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES
//               BINBYTES8 BYTEARRAY8
//   containers  MARK EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND
//               APPENDS EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET
//   stack/memo  POP POP_MARK DUP BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET
//   objects     GLOBAL STACK_GLOBAL REDUCE NEWOBJ NEWOBJ_EX BUILD BINPERSID
// Everything else (the text opcodes of protocols 0-1, INST/OBJ, EXT*, out-of-band
// buffers) is rejected with the opcode and its byte offset.
#include <fmt/format.h>

#include <bit>
#include <cstring>
#include <span>
#include <unordered_map>

#include "ckpt/format/pickle.hpp"
#include "ckpt/format/pickle_ops.hpp"

namespace ckpt::pickle {

namespace {

using enum Op;

class Decoder {
 public:
  Decoder(Bytes pickle, const std::string& file, const std::string& member, std::uint64_t base_offset)
      : in_(pickle, file, member, base_offset) {}

  Graph run() {
    while (true) {
      op_position_ = in_.position();
      // An opcode adds at most one node: checked here, Graph::add never fails.
      if (graph_.size() >= kNoNode) fail("too many objects");
      auto op = static_cast<Op>(in_.u8());
      if (op == STOP) break;
      step(op);
    }
    if (stack_.size() != 1 || !marks_.empty()) fail("STOP with a malformed stack");
    graph_.root = stack_.back();
    return std::move(graph_);
  }

 private:
  [[noreturn]] void fail(const std::string& message) const { in_.fail(op_position_, "pickle: " + message); }

  NodeId pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() == marks_.back())) fail("stack underflow");
    NodeId id = stack_.back();
    stack_.pop_back();
    return id;
  }
  NodeId top() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() == marks_.back())) fail("stack underflow");
    return stack_.back();
  }
  // The top of the stack below the items pop_mark() just returned.
  NodeId top_below_marked() {
    if (marked_start_ == 0 || (!marks_.empty() && marked_start_ == marks_.back())) fail("stack underflow");
    return stack_[marked_start_ - 1];
  }
  // The items above the last MARK, which is removed; they stay on the stack,
  // past its new end, until the next push (drop_marked()).
  std::span<const NodeId> pop_mark() {
    if (marks_.empty()) fail("no MARK on the stack");
    std::size_t start = marks_.back();
    marks_.pop_back();
    marked_start_ = start;
    return std::span<const NodeId>(stack_).subspan(start);
  }
  void drop_marked() { stack_.resize(marked_start_); }
  void push(const Node& node) { stack_.push_back(graph_.add(node)); }
  void push_text(Kind kind, std::uint64_t length) {
    if (length > in_.remaining()) fail(fmt::format("string of {} bytes runs past the end", length));
    stack_.push_back(graph_.add_text(kind, in_.text(static_cast<std::size_t>(length))));
  }
  // None, True, False and small ints are values, one node each (Graph::integer).
  void push_int(std::int64_t value) { stack_.push_back(graph_.integer(value)); }
  void push_long(std::uint64_t length) {
    if (length > in_.remaining()) fail(fmt::format("integer of {} bytes runs past the end", length));
    Bytes bytes = in_.take(static_cast<std::size_t>(length));
    // Two's complement, little-endian. Keep it as int64 when it fits.
    bool negative = length > 0 && (static_cast<std::uint8_t>(bytes[length - 1]) & 0x80);
    std::size_t significant = length;
    std::uint8_t filler = negative ? 0xFF : 0x00;
    while (significant > 0 && static_cast<std::uint8_t>(bytes[significant - 1]) == filler) --significant;
    bool fits =
        significant < 8 || (significant == 8 && ((static_cast<std::uint8_t>(bytes[7]) & 0x80) != 0) == negative);
    if (fits) {
      std::uint64_t value = negative ? ~std::uint64_t{0} : 0;
      for (std::size_t i = 0; i < std::min<std::size_t>(length, 8); ++i) {
        value &= ~(std::uint64_t{0xFF} << (8 * i));
        value |= std::uint64_t{static_cast<std::uint8_t>(bytes[i])} << (8 * i);
      }
      push_int(static_cast<std::int64_t>(value));
      return;
    }
    stack_.push_back(graph_.add_text(Kind::BigInt, as_chars(bytes)));
  }
  // A container of `items`; the empty tuple is one node (Python's is a singleton).
  NodeId container(Kind kind, std::span<const NodeId> items) {
    return kind == Kind::Tuple && items.empty() ? graph_.empty_tuple() : graph_.add_items(kind, items);
  }
  void push_container(Kind kind, std::span<const NodeId> items) { stack_.push_back(container(kind, items)); }
  // A container of the items above the last MARK, which replace them on the stack.
  void push_marked(Kind kind) {
    NodeId id = container(kind, pop_mark());
    drop_marked();
    stack_.push_back(id);
  }
  std::string_view line() {
    std::string_view rest = as_chars(in_.rest());
    std::size_t newline = rest.find('\n');
    if (newline == std::string_view::npos) fail("GLOBAL without a newline-terminated name");
    std::string_view text = in_.text(newline);
    in_.skip(1);
    return text;
  }
  // The memo: a vector while its indices are dense (a pickler writes 0, 1, 2,
  // ...), a map for whatever else a crafted pickle asks for, so that memory
  // follows the entries put, never the indices named. MEMOIZE puts at the
  // number of entries, as Python's len(memo).
  void memo_put(std::uint64_t index) {
    NodeId value = top();
    if (index < memo_.size() || index <= 2 * memo_entries_ + 1024) {
      if (index >= memo_.size()) memo_.resize(index + 1, kNoNode);
      if (memo_[index] == kNoNode && !sparse_memo_.contains(index)) ++memo_entries_;
      memo_[index] = value;
      sparse_memo_.erase(index);
    } else if (sparse_memo_.insert_or_assign(index, value).second) {
      ++memo_entries_;
    }
  }
  void memo_get(std::uint64_t index) {
    NodeId id = index < memo_.size() ? memo_[index] : kNoNode;
    if (id == kNoNode) {
      if (auto it = sparse_memo_.find(index); it != sparse_memo_.end()) id = it->second;
    }
    if (id == kNoNode) fail(fmt::format("memo entry {} is not defined", index));
    stack_.push_back(id);
  }
  void require_object(NodeId id, const char* opname) const {
    Kind kind = graph_[id].kind;
    if (kind != Kind::Object) fail(fmt::format("{} applied to a {} value", opname, kind_name(kind)));
  }
  void set_items(NodeId target, std::span<const NodeId> kv) {
    if (kv.size() % 2 != 0) fail("SETITEMS with an odd number of items");
    if (graph_[target].kind != Kind::Dict) require_object(target, "SETITEM");
    for (std::size_t i = 0; i < kv.size(); i += 2) graph_.append_entry(target, kv[i], kv[i + 1]);
  }
  void append_items(NodeId target, std::span<const NodeId> items) {
    if (graph_[target].kind != Kind::List) require_object(target, "APPEND");
    for (NodeId item : items) graph_.append_item(target, item);
  }
  void make_object(ObjectOp op, NodeId callable, NodeId args, NodeId kwargs) {
    if (graph_[args].kind != Kind::Tuple) fail("REDUCE/NEWOBJ arguments are not a tuple");
    Node node;
    node.kind = Kind::Object;
    node.op = op;
    node.callable = callable;
    node.args = args;
    node.kwargs = kwargs;
    push(node);
  }
  static const char* kind_name(Kind kind) {
    switch (kind) {
      case Kind::None: return "None";
      case Kind::Bool: return "bool";
      case Kind::Int:
      case Kind::BigInt: return "int";
      case Kind::Float: return "float";
      case Kind::Str: return "str";
      case Kind::Bytes: return "bytes";
      case Kind::ByteArray: return "bytearray";
      case Kind::Tuple: return "tuple";
      case Kind::List: return "list";
      case Kind::Dict: return "dict";
      case Kind::Set: return "set";
      case Kind::FrozenSet: return "frozenset";
      case Kind::Global: return "global";
      case Kind::Object: return "object";
      case Kind::PersId: return "persistent id";
    }
    return "?";
  }

  void step(Op op) {
    switch (op) {
      case PROTO: {
        int protocol = in_.u8();
        if (protocol < 2 || protocol > 5) fail(fmt::format("unsupported pickle protocol {} (2-5 accepted)", protocol));
        graph_.protocol = std::max(graph_.protocol, protocol);
        return;
      }
      case FRAME: in_.skip(8); return;
      case MARK: marks_.push_back(stack_.size()); return;
      case POP:
        if (!marks_.empty() && marks_.back() == stack_.size()) {
          marks_.pop_back();  // CPython's POP discards a MARK on top, too
        } else {
          pop();
        }
        return;
      case POP_MARK:
        pop_mark();
        drop_marked();
        return;
      case DUP: stack_.push_back(top()); return;
      case NONE: stack_.push_back(graph_.none()); return;
      case NEWTRUE:
      case NEWFALSE: stack_.push_back(graph_.boolean(op == NEWTRUE)); return;
      case BININT: push_int(in_.i32()); return;
      case BININT1: push_int(in_.u8()); return;
      case BININT2: push_int(in_.u16()); return;
      case LONG1: push_long(in_.u8()); return;
      case LONG4: {
        std::int32_t length = in_.i32();
        if (length < 0) fail("negative LONG4 length");
        push_long(static_cast<std::uint64_t>(length));
        return;
      }
      case BINFLOAT: {
        std::uint64_t bits = 0;
        for (std::byte b : in_.take(8)) bits = (bits << 8) | static_cast<std::uint8_t>(b);  // big-endian
        Node node;
        node.kind = Kind::Float;
        node.real = std::bit_cast<double>(bits);
        push(node);
        return;
      }
      case BINUNICODE: push_text(Kind::Str, in_.u32()); return;
      case SHORT_BINUNICODE: push_text(Kind::Str, in_.u8()); return;
      case BINUNICODE8: push_text(Kind::Str, in_.u64()); return;
      case BINBYTES: push_text(Kind::Bytes, in_.u32()); return;
      case SHORT_BINBYTES: push_text(Kind::Bytes, in_.u8()); return;
      case BINBYTES8: push_text(Kind::Bytes, in_.u64()); return;
      case BYTEARRAY8: push_text(Kind::ByteArray, in_.u64()); return;
      case EMPTY_TUPLE: push_container(Kind::Tuple, {}); return;
      case TUPLE: push_marked(Kind::Tuple); return;
      case TUPLE1: {
        NodeId a = pop();
        const NodeId items[] = {a};
        push_container(Kind::Tuple, items);
        return;
      }
      case TUPLE2: {
        NodeId b = pop();
        NodeId a = pop();
        const NodeId items[] = {a, b};
        push_container(Kind::Tuple, items);
        return;
      }
      case TUPLE3: {
        NodeId c = pop();
        NodeId b = pop();
        NodeId a = pop();
        const NodeId items[] = {a, b, c};
        push_container(Kind::Tuple, items);
        return;
      }
      case EMPTY_LIST: push_container(Kind::List, {}); return;
      case LIST: push_marked(Kind::List); return;
      case EMPTY_DICT: push_container(Kind::Dict, {}); return;
      case DICT: {
        std::span<const NodeId> kv = pop_mark();
        NodeId dict = graph_.add_items(Kind::Dict, {});
        set_items(dict, kv);
        drop_marked();
        stack_.push_back(dict);
        return;
      }
      case EMPTY_SET: push_container(Kind::Set, {}); return;
      case FROZENSET: push_marked(Kind::FrozenSet); return;
      case ADDITEMS: {
        std::span<const NodeId> items = pop_mark();
        NodeId target = top_below_marked();
        if (graph_[target].kind != Kind::Set) fail("ADDITEMS applied to a non-set");
        for (NodeId item : items) graph_.append_item(target, item);
        drop_marked();
        return;
      }
      case APPEND: {
        NodeId item = pop();
        const NodeId items[] = {item};
        append_items(top(), items);
        return;
      }
      case APPENDS: {
        std::span<const NodeId> items = pop_mark();
        append_items(top_below_marked(), items);
        drop_marked();
        return;
      }
      case SETITEM: {
        NodeId value = pop();
        NodeId key = pop();
        const NodeId kv[] = {key, value};
        set_items(top(), kv);
        return;
      }
      case SETITEMS: {
        std::span<const NodeId> kv = pop_mark();
        set_items(top_below_marked(), kv);
        drop_marked();
        return;
      }
      case BINPUT: memo_put(in_.u8()); return;
      case LONG_BINPUT: memo_put(in_.u32()); return;
      case MEMOIZE: memo_put(memo_entries_); return;
      case BINGET: memo_get(in_.u8()); return;
      case LONG_BINGET: memo_get(in_.u32()); return;
      case GLOBAL: {
        std::string module(line());
        std::string name(line());
        stack_.push_back(graph_.global(module, name));
        return;
      }
      case STACK_GLOBAL: {
        NodeId name = pop();
        NodeId module = pop();
        if (graph_[name].kind != Kind::Str || graph_[module].kind != Kind::Str) fail("STACK_GLOBAL of non-strings");
        std::string module_text(graph_[module].text);
        std::string name_text(graph_[name].text);
        stack_.push_back(graph_.global(module_text, name_text));
        return;
      }
      case REDUCE: {
        NodeId args = pop();
        NodeId callable = pop();
        make_object(ObjectOp::Reduce, callable, args, kNoNode);
        return;
      }
      case NEWOBJ: {
        NodeId args = pop();
        NodeId cls = pop();
        make_object(ObjectOp::NewObj, cls, args, kNoNode);
        return;
      }
      case NEWOBJ_EX: {
        NodeId kwargs = pop();
        NodeId args = pop();
        NodeId cls = pop();
        if (graph_[kwargs].kind != Kind::Dict) fail("NEWOBJ_EX keyword arguments are not a dict");
        make_object(ObjectOp::NewObjEx, cls, args, kwargs);
        return;
      }
      case BUILD: {
        NodeId state = pop();
        NodeId target = top();
        require_object(target, "BUILD");
        if (graph_[target].state != kNoNode) fail("BUILD applied twice to one object");
        graph_.set_state(target, state);
        return;
      }
      case BINPERSID: {
        Node node;
        node.kind = Kind::PersId;
        node.callable = pop();
        push(node);
        return;
      }
      default: {
        auto byte = static_cast<std::uint8_t>(op);
        // Protocols 0 and 1 are the printable opcodes; 2 to 5 add the others.
        constexpr std::string_view kOldProtocol =
            ", an opcode of pickle protocol 0 or 1: ckpt-tool reads protocols 2 to 5 (torch.save's default is 2; "
            "save again with pickle_protocol=2 or later)";
        bool printable = byte >= 0x20 && byte < 0x7f;
        fail(fmt::format("unsupported opcode 0x{:02x}{}{}", byte,
                         printable ? fmt::format(" ('{}')", static_cast<char>(byte)) : "",
                         printable ? kOldProtocol : ""));
      }
    }
  }

  ByteReader in_;
  Graph graph_;
  std::vector<NodeId> stack_;
  std::vector<std::size_t> marks_;
  std::size_t marked_start_ = 0;  // where pop_mark()'s items start
  std::vector<NodeId> memo_;
  std::unordered_map<std::uint64_t, NodeId> sparse_memo_;  // indices never also in memo_
  std::uint64_t memo_entries_ = 0;                         // distinct indices put
  std::size_t op_position_ = 0;
};

}  // namespace

Graph decode(Bytes pickle, const std::string& file, const std::string& member, std::uint64_t base_offset) {
  return Decoder(pickle, file, member, base_offset).run();
}

}  // namespace ckpt::pickle
