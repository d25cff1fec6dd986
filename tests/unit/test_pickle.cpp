// Unit tests for the pickle codec (src/format/pickle_decode.cpp, pickle_encode.cpp,
// pickle_graph.cpp).
//
// Pickles are written by hand, opcode by opcode, with a small builder that also
// records which opcodes each one uses, so one test can assert that every opcode
// the decoder accepts is exercised. Each decoded graph is checked node by node,
// then encoded and decoded again and compared structurally with a bijection on
// node ids, so that sharing and cycles have to survive the round trip.
#include <doctest/doctest.h>

#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/pickle.hpp"
#include "ckpt/format/pickle_ops.hpp"
#include "ckpt/format/pyobject.hpp"
#include "ckpt/io/error.hpp"
#include "error_kind.hpp"

namespace {

using ckpt::Bytes;
using ckpt::pickle::Graph;
using ckpt::pickle::Kind;
using ckpt::pickle::kNoNode;
using ckpt::pickle::Node;
using ckpt::pickle::NodeId;
using ckpt::pickle::ObjectOp;
using Buffer = std::vector<std::byte>;

// clang-format off
// Opcodes: the decoder's and encoder's own list (ckpt/format/pickle_ops.hpp).
using ckpt::pickle::Op;
using enum Op;

// Every opcode the decoder's header comment says it accepts.
const std::set<std::uint8_t> kAccepted = [] {
  std::set<std::uint8_t> out;
  for (Op op : {PROTO, FRAME, STOP, NONE, NEWTRUE, NEWFALSE, BININT, BININT1, BININT2, LONG1, LONG4, BINFLOAT,
                BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8, MARK,
                EMPTY_TUPLE, TUPLE, TUPLE1, TUPLE2, TUPLE3, EMPTY_LIST, LIST, APPEND, APPENDS, EMPTY_DICT, DICT,
                SETITEM, SETITEMS, EMPTY_SET, ADDITEMS, FROZENSET, POP, POP_MARK, DUP, BINPUT, LONG_BINPUT, MEMOIZE,
                BINGET, LONG_BINGET, GLOBAL, STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX, BUILD, BINPERSID}) {
    out.insert(static_cast<std::uint8_t>(op));
  }
  return out;
}();
// clang-format on

std::string le(std::uint64_t value, int nbytes) {
  std::string out;
  for (int i = 0; i < nbytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
  return out;
}
std::string be_double(double value) {
  auto bits = std::bit_cast<std::uint64_t>(value);
  std::string out;
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xFF));
  return out;
}

// A pickle written piece by piece: an Op is an opcode (recorded), an integer a
// single argument byte, a string raw argument bytes.
struct Pickle {
  Buffer bytes;
  std::set<std::uint8_t> ops;

  struct Piece {
    Piece(Op op) : is_op(true), text(1, static_cast<char>(op)) {}
    Piece(int byte) : text(1, static_cast<char>(byte)) {}
    Piece(const char* raw) : text(raw) {}
    Piece(std::string raw) : text(std::move(raw)) {}
    bool is_op = false;
    std::string text;
  };
  Pickle(std::initializer_list<Piece> pieces) {
    for (const Piece& piece : pieces) {
      if (piece.is_op) ops.insert(static_cast<std::uint8_t>(piece.text[0]));
      for (char c : piece.text) bytes.push_back(static_cast<std::byte>(c));
    }
  }
  Bytes view() const { return Bytes(bytes.data(), bytes.size()); }
};

// Length-prefixed text arguments.
// An opcode followed by le(value, nbytes); built by appending (GCC 12 warns,
// wrongly, about `"literal" + std::string` under -O3: its bug 105329).
std::string arg(const char* prefix, std::uint64_t value, int nbytes) {
  std::string out(prefix);
  out.append(le(value, nbytes));
  return out;
}
std::string u8str(std::string_view s) {
  std::string out = le(s.size(), 1);
  out.append(s);
  return out;
}
std::string u32str(std::string_view s) {
  std::string out = le(s.size(), 4);
  out.append(s);
  return out;
}
std::string u64str(std::string_view s) {
  std::string out = le(s.size(), 8);
  out.append(s);
  return out;
}

Graph decode(const Buffer& bytes, std::uint64_t base_offset = 0) {
  return ckpt::pickle::decode(Bytes(bytes.data(), bytes.size()), "test.pt", "archive/data.pkl", base_offset);
}
Graph decode(const Pickle& p) {
  return decode(p.bytes);
}

ckpt::pickle::NodeView at(const Graph& g, NodeId id) {
  REQUIRE(id < g.size());
  return g[id];
}
ckpt::pickle::NodeView item(const Graph& g, NodeId id, std::size_t i) {
  const ckpt::pickle::NodeView node = at(g, id);
  REQUIRE(i < node.items.size());
  return at(g, node.items[i]);
}

// ------------------------------------------------------------ isomorphism

// True when the graphs reachable from the two roots have the same shape: nodes
// are matched one to one (a bijection on ids), so a node shared in one graph must
// be shared in the other and a cycle must close on the same node. Immutable
// scalars (None, bool, int, float) and the empty tuple are compared by value:
// neither CPython's pickler nor ours memoises them, so their identity is not
// part of what a pickle carries.
class Isomorphism {
 public:
  Isomorphism(const Graph& a, const Graph& b) : a_(a), b_(b) {}

  bool check() {
    if (!pair(a_.root, b_.root, "root")) return false;
    while (!work_.empty()) {
      auto [x, y, path] = work_.back();
      work_.pop_back();
      if (!contents(x, y, path)) return false;
    }
    return true;
  }
  const std::string& why() const { return why_; }

 private:
  static bool value_like(const ckpt::pickle::NodeView& n) {
    switch (n.kind) {
      case Kind::None:
      case Kind::Bool:
      case Kind::Int:
      case Kind::BigInt:
      case Kind::Float: return true;
      case Kind::Tuple: return n.items.empty();
      default: return false;
    }
  }
  bool fail(const std::string& path, const std::string& message) {
    why_ = path + ": " + message;
    return false;
  }
  bool pair(NodeId x, NodeId y, const std::string& path) {
    if (x == kNoNode || y == kNoNode) return x == y || fail(path, "one side has no node");
    if (x >= a_.size() || y >= b_.size()) return fail(path, "node id out of range");
    const ckpt::pickle::NodeView nx = a_[x];
    const ckpt::pickle::NodeView ny = b_[y];
    if (nx.kind != ny.kind) return fail(path, "kinds differ");
    if (value_like(nx)) {
      bool same = nx.boolean == ny.boolean && nx.integer == ny.integer && nx.text == ny.text &&
                  std::bit_cast<std::uint64_t>(nx.real) == std::bit_cast<std::uint64_t>(ny.real);
      return same || fail(path, "values differ");
    }
    auto fx = ab_.find(x);
    auto fy = ba_.find(y);
    if (fx != ab_.end() || fy != ba_.end()) {
      bool same = fx != ab_.end() && fy != ba_.end() && fx->second == y && fy->second == x;
      return same || fail(path, "sharing differs");
    }
    ab_.emplace(x, y);
    ba_.emplace(y, x);
    work_.push_back({x, y, path});
    return true;
  }
  bool contents(NodeId x, NodeId y, const std::string& path) {
    const ckpt::pickle::NodeView nx = a_[x];
    const ckpt::pickle::NodeView ny = b_[y];
    if (nx.text != ny.text || nx.name != ny.name) return fail(path, "text differs");
    if (nx.items.size() != ny.items.size()) return fail(path, "item counts differ");
    if (nx.entries.size() != ny.entries.size()) return fail(path, "entry counts differ");
    if (nx.kind == Kind::Object && nx.op != ny.op) return fail(path, "object ops differ");
    for (std::size_t i = 0; i < nx.items.size(); ++i) {
      if (!pair(nx.items[i], ny.items[i], path + "/" + std::to_string(i))) return false;
    }
    for (std::size_t i = 0; i < nx.entries.size(); ++i) {
      if (!pair(nx.entries[i].first, ny.entries[i].first, path + "/key" + std::to_string(i))) return false;
      if (!pair(nx.entries[i].second, ny.entries[i].second, path + "/value" + std::to_string(i))) return false;
    }
    if (nx.kind == Kind::Object || nx.kind == Kind::PersId) {
      if (!pair(nx.callable, ny.callable, path + "/callable")) return false;
    }
    if (nx.kind == Kind::Object) {
      if (!pair(nx.args, ny.args, path + "/args")) return false;
      if (!pair(nx.kwargs, ny.kwargs, path + "/kwargs")) return false;
      if (!pair(nx.state, ny.state, path + "/state")) return false;
    }
    return true;
  }

  struct Work {
    NodeId x, y;
    std::string path;
  };
  const Graph& a_;
  const Graph& b_;
  std::unordered_map<NodeId, NodeId> ab_, ba_;
  std::vector<Work> work_;
  std::string why_;
};

void check_isomorphic(const Graph& a, const Graph& b) {
  Isomorphism iso(a, b);
  bool same = iso.check();
  CHECK_MESSAGE(same, iso.why());
}

// decode -> encode -> decode is isomorphic, and encoding is a fixed point.
void check_round_trip(const Graph& g) {
  Buffer once = ckpt::pickle::encode(g);
  Graph again = decode(once);
  check_isomorphic(g, again);
  CHECK(ckpt::pickle::encode(again) == once);
}

// ------------------------------------------------------------ the pickles

// clang-format off
Pickle scalars() {
  return {PROTO, 2, MARK,
          NONE, NEWTRUE, NEWFALSE,
          BININT, le(static_cast<std::uint32_t>(-5), 4),
          BININT1, 200,
          BININT2, le(60000, 2),
          LONG1, 2, std::string("\x00\x80", 2),  // -32768: the top bit is the sign
          LONG4, le(3, 4), "\xff\xff\x7f",  // 0x7fffff
          BINFLOAT, be_double(1.5),
          BINFLOAT, be_double(-0.0),
          LIST, STOP};
}

Pickle text_and_bytes() {
  return {PROTO, 5, FRAME, le(64, 8), MARK,
          BINUNICODE, u32str("h\xc3\xa9llo"),
          SHORT_BINUNICODE, u8str(""),
          BINUNICODE8, u64str("eight"),
          BINBYTES, u32str(std::string("\x00\x01\x02", 3)),
          SHORT_BINBYTES, u8str("sb"),
          BINBYTES8, u64str("b8"),
          BYTEARRAY8, u64str(std::string("a\x00z", 3)),
          TUPLE, STOP};
}

Pickle tuples_and_lists() {
  // [(), (1,), (1, 2), (1, 2, 3), [4, 5], 6]
  return {PROTO, 2, EMPTY_LIST, MARK,
          EMPTY_TUPLE,
          BININT1, 1, TUPLE1,
          BININT1, 1, BININT1, 2, TUPLE2,
          BININT1, 1, BININT1, 2, BININT1, 3, TUPLE3,
          MARK, BININT1, 4, BININT1, 5, LIST,
          APPENDS,
          BININT1, 6, APPEND, STOP};
}

Pickle dicts() {
  // ({'a': 1, 'b': 2, 'c': 3}, {'x': None})
  return {PROTO, 2,
          EMPTY_DICT,
          SHORT_BINUNICODE, u8str("a"), BININT1, 1, SETITEM,
          MARK, SHORT_BINUNICODE, u8str("b"), BININT1, 2, SHORT_BINUNICODE, u8str("c"), BININT1, 3, SETITEMS,
          MARK, SHORT_BINUNICODE, u8str("x"), NONE, DICT,
          TUPLE2, STOP};
}

Pickle sets() {
  // ({1, 2}, frozenset({3}))
  return {PROTO, 4,
          EMPTY_SET, MARK, BININT1, 1, BININT1, 2, ADDITEMS,
          MARK, BININT1, 3, FROZENSET,
          TUPLE2, STOP};
}

Pickle stack_and_memo() {
  // memo 0 = A = [], memo 1000 = s = 's', memo 7 = T = (s, s); root [A, T, (A, s, T)]
  return {PROTO, 4, MARK,
          EMPTY_LIST, MEMOIZE,                      // A, memo 0
          BININT1, 9, POP,                          // discarded
          MARK, BININT1, 1, BININT1, 2, POP_MARK,   // discarded
          MARK, POP,                                // POP of a MARK discards the mark
          SHORT_BINUNICODE, u8str("s"), LONG_BINPUT, le(1000, 4), DUP, TUPLE2, BINPUT, 7,
          BINGET, 0, LONG_BINGET, le(1000, 4), BINGET, 7, TUPLE3,
          LIST, STOP};
}

Pickle objects() {
  return {PROTO, 2, MARK,
          // OrderedDict([('k', 1)]) by REDUCE + SETITEMS
          GLOBAL, "collections\nOrderedDict\n", EMPTY_TUPLE, REDUCE, MARK, SHORT_BINUNICODE, u8str("k"), BININT1, 1,
          SETITEMS,
          // Namespace(lr=0.5) by STACK_GLOBAL + NEWOBJ + BUILD
          SHORT_BINUNICODE, u8str("argparse"), SHORT_BINUNICODE, u8str("Namespace"), STACK_GLOBAL, EMPTY_TUPLE, NEWOBJ,
          EMPTY_DICT, SHORT_BINUNICODE, u8str("lr"), BINFLOAT, be_double(0.5), SETITEM, BUILD,
          // m.C(1, kw=2) by NEWOBJ_EX
          GLOBAL, "m\nC\n", MARK, BININT1, 1, TUPLE, EMPTY_DICT, SHORT_BINUNICODE, u8str("kw"), BININT1, 2, SETITEM,
          NEWOBJ_EX,
          // a list subclass filled by APPENDS and APPEND
          GLOBAL, "m\nL\n", EMPTY_TUPLE, REDUCE, MARK, BININT1, 1, BININT1, 2, APPENDS, BININT1, 3, APPEND,
          // a persistent id, as torch.save writes storages
          MARK, SHORT_BINUNICODE, u8str("storage"), GLOBAL, "torch\nFloatStorage\n", SHORT_BINUNICODE, u8str("0"),
          SHORT_BINUNICODE, u8str("cpu"), BININT1, 4, TUPLE, BINPERSID,
          TUPLE, STOP};
}

Pickle self_list() {
  // l = []; l.append(l)
  return {PROTO, 2, EMPTY_LIST, BINPUT, 0, BINGET, 0, APPEND, STOP};
}

Pickle self_object() {
  // o = m.C(); o.__dict__ = {'self': o, 'parent': {'child': o}}  (OmegaConf's _parent)
  return {PROTO, 2, GLOBAL, "m\nC\n", EMPTY_TUPLE, NEWOBJ, BINPUT, 0,
          EMPTY_DICT, SHORT_BINUNICODE, u8str("self"), BINGET, 0, SETITEM,
          SHORT_BINUNICODE, u8str("parent"), EMPTY_DICT, SHORT_BINUNICODE, u8str("child"), BINGET, 0, SETITEM, SETITEM,
          BUILD, STOP};
}

Pickle tuple_cycle() {
  // l = []; t = (l, 'x'); l.append(t): the tuple is reached again inside itself
  return {PROTO, 2, EMPTY_LIST, BINPUT, 0, BINGET, 0, SHORT_BINUNICODE, u8str("x"), TUPLE2, BINPUT, 1, APPEND,
          BINGET, 1, POP, STOP};
}

// clang-format on
std::vector<std::pair<const char*, Pickle>> all_pickles() {
  return {{"scalars", scalars()},
          {"text_and_bytes", text_and_bytes()},
          {"tuples_and_lists", tuples_and_lists()},
          {"dicts", dicts()},
          {"sets", sets()},
          {"stack_and_memo", stack_and_memo()},
          {"objects", objects()},
          {"self_list", self_list()},
          {"self_object", self_object()},
          {"tuple_cycle", tuple_cycle()}};
}

}  // namespace

TEST_SUITE("pickle") {
  TEST_CASE("the hand-written pickles use every opcode the decoder accepts") {
    std::set<std::uint8_t> used;
    for (const auto& [name, p] : all_pickles()) used.insert(p.ops.begin(), p.ops.end());
    for (std::uint8_t op : kAccepted) {
      CAPTURE(static_cast<int>(op));
      CHECK(used.count(op) == 1);
    }
  }

  TEST_CASE("graph: views stay valid while nodes are added, and a graph over a base copies a node on change") {
    // rewrite_metadata held a reference into a node vector across appends that
    // reallocated it (issue 24's segfault): text and tuple items never move, and
    // a container changes only through the graph.
    auto base = std::make_shared<Graph>();
    NodeId text = base->str("decoder.layers.0.fc1.weight");
    NodeId tuple = base->tuple({base->integer(4), base->integer(5000)});
    NodeId list = base->add_items(Kind::List, {});
    const ckpt::pickle::NodeView held_text = (*base)[text];
    const ckpt::pickle::NodeView held_tuple = (*base)[tuple];
    for (std::int64_t i = 0; i < 100000; ++i) base->append_item(list, base->integer(i));
    CHECK(held_text.text == "decoder.layers.0.fc1.weight");
    REQUIRE(held_tuple.items.size() == 2);
    CHECK((*base)[held_tuple.items[1]].integer == 5000);
    REQUIRE((*base)[list].items.size() == 100000);
    CHECK((*base)[(*base)[list].items[99999]].integer == 99999);
    std::size_t base_size = base->size();

    Graph over = Graph::over(base);
    CHECK(over.size() == base_size);
    NodeId added = over.integer(-100000);
    CHECK(added == base_size);
    over.append_item(list, added);
    CHECK(over[list].items.size() == 100001);
    CHECK((*base)[list].items.size() == 100000);  // the base is never changed
    CHECK(base->size() == base_size);
    CHECK(over[text].text == "decoder.layers.0.fc1.weight");
    CHECK_THROWS_AS((void)over[static_cast<NodeId>(base_size + 1)], std::out_of_range);
    CHECK_THROWS_AS(over.append_item(text, added), std::logic_error);  // a str takes no items
  }

  TEST_CASE("copy_value: a value copied into another graph keeps its sharing and its cycles") {
    Graph from;
    NodeId shared = from.str("shared");
    NodeId list = from.add_items(Kind::List, {});
    from.append_item(list, list);  // a list that holds itself
    from.append_item(list, shared);
    from.append_item(list, shared);
    from.append_item(list, from.global("collections", "OrderedDict"));
    from.append_item(list, from.integer(1) /* interned */);
    from.str("not reached");
    from.root = list;
    Graph to;
    to.str("already there");  // the copy's ids differ from the original's
    std::unordered_map<NodeId, NodeId> copied;
    to.root = ckpt::copy_value(to, from, from.root, &copied);
    CHECK(copied.size() == 4);  // every node reached, once (the list, the str, the global, the int)
    const auto items = to[to.root].items;
    REQUIRE(items.size() == 5);
    CHECK(items[0] == to.root);
    CHECK(items[1] == items[2]);
    CHECK(to.is_global(items[3], "collections", "OrderedDict"));
    CHECK(items[4] == to.integer(1));
    CHECK(ckpt::pickle::encode(to) == ckpt::pickle::encode(from));  // the same pickle
  }

  TEST_CASE("decode: scalars") {
    Graph g = decode(scalars());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::List);
    REQUIRE(root.items.size() == 10);
    CHECK(item(g, g.root, 0).kind == Kind::None);
    CHECK(item(g, g.root, 1).kind == Kind::Bool);
    CHECK(item(g, g.root, 1).boolean == true);
    CHECK(item(g, g.root, 2).kind == Kind::Bool);
    CHECK(item(g, g.root, 2).boolean == false);
    const std::int64_t ints[] = {-5, 200, 60000, -32768, 0x7fffff};
    for (std::size_t i = 0; i < 5; ++i) {
      CAPTURE(i);
      CHECK(item(g, g.root, 3 + i).kind == Kind::Int);
      CHECK(item(g, g.root, 3 + i).integer == ints[i]);
    }
    CHECK(item(g, g.root, 8).kind == Kind::Float);
    CHECK(item(g, g.root, 8).real == 1.5);
    CHECK(item(g, g.root, 9).kind == Kind::Float);
    CHECK(std::signbit(item(g, g.root, 9).real));
    CHECK(item(g, g.root, 9).real == 0.0);
    CHECK(g.protocol == 2);
  }

  TEST_CASE("decode: text, bytes and bytearray, in a frame") {
    Graph g = decode(text_and_bytes());
    CHECK(g.protocol == 5);
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::Tuple);
    REQUIRE(root.items.size() == 7);
    const std::pair<Kind, std::string> want[] = {{Kind::Str, "h\xc3\xa9llo"},
                                                 {Kind::Str, ""},
                                                 {Kind::Str, "eight"},
                                                 {Kind::Bytes, std::string("\x00\x01\x02", 3)},
                                                 {Kind::Bytes, "sb"},
                                                 {Kind::Bytes, "b8"},
                                                 {Kind::ByteArray, std::string("a\x00z", 3)}};
    for (std::size_t i = 0; i < 7; ++i) {
      CAPTURE(i);
      CHECK(item(g, g.root, i).kind == want[i].first);
      CHECK(item(g, g.root, i).text == want[i].second);
    }
    CHECK(g.is_str(root.items[2], "eight"));
    CHECK_FALSE(g.is_str(root.items[3], std::string("\x00\x01\x02", 3)));  // bytes are not str
  }

  TEST_CASE("decode: tuples and lists") {
    Graph g = decode(tuples_and_lists());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::List);
    REQUIRE(root.items.size() == 6);
    for (std::size_t i = 0; i < 4; ++i) {
      CAPTURE(i);
      const ckpt::pickle::NodeView t = item(g, g.root, i);
      CHECK(t.kind == Kind::Tuple);
      REQUIRE(t.items.size() == i);
      for (std::size_t j = 0; j < i; ++j) CHECK(at(g, t.items[j]).integer == static_cast<std::int64_t>(j + 1));
    }
    const ckpt::pickle::NodeView inner = item(g, g.root, 4);
    CHECK(inner.kind == Kind::List);
    REQUIRE(inner.items.size() == 2);
    CHECK(at(g, inner.items[1]).integer == 5);
    CHECK(item(g, g.root, 5).integer == 6);
    REQUIRE(ckpt::as_int_list(g, root.items[3]).has_value());
    CHECK(*ckpt::as_int_list(g, root.items[3]) == std::vector<std::int64_t>{1, 2, 3});
  }

  TEST_CASE("decode: dicts keep their entries in order") {
    Graph g = decode(dicts());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::Tuple);
    REQUIRE(root.items.size() == 2);
    const ckpt::pickle::NodeView d = at(g, root.items[0]);
    REQUIRE(d.kind == Kind::Dict);
    REQUIRE(d.entries.size() == 3);
    const char* keys[] = {"a", "b", "c"};
    for (std::size_t i = 0; i < 3; ++i) {
      CHECK(g.is_str(d.entries[i].first, keys[i]));
      CHECK(at(g, d.entries[i].second).integer == static_cast<std::int64_t>(i + 1));
    }
    CHECK(at(g, g.lookup(root.items[0], "b")).integer == 2);
    CHECK(g.lookup(root.items[0], "z") == kNoNode);
    const ckpt::pickle::NodeView x = at(g, root.items[1]);
    REQUIRE(x.kind == Kind::Dict);
    REQUIRE(x.entries.size() == 1);
    CHECK(g.is_str(x.entries[0].first, "x"));
    CHECK(at(g, x.entries[0].second).kind == Kind::None);
  }

  TEST_CASE("decode: set and frozenset") {
    Graph g = decode(sets());
    CHECK(g.protocol == 4);
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.items.size() == 2);
    const ckpt::pickle::NodeView s = at(g, root.items[0]);
    CHECK(s.kind == Kind::Set);
    REQUIRE(s.items.size() == 2);
    CHECK(at(g, s.items[0]).integer == 1);
    CHECK(at(g, s.items[1]).integer == 2);
    const ckpt::pickle::NodeView f = at(g, root.items[1]);
    CHECK(f.kind == Kind::FrozenSet);
    REQUIRE(f.items.size() == 1);
    CHECK(at(g, f.items[0]).integer == 3);
  }

  TEST_CASE("decode: POP, POP_MARK, DUP and the memo share nodes") {
    Graph g = decode(stack_and_memo());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::List);
    REQUIRE(root.items.size() == 3);  // the discarded values left nothing behind
    NodeId a = root.items[0];
    NodeId t = root.items[1];
    CHECK(at(g, a).kind == Kind::List);
    const ckpt::pickle::NodeView tn = at(g, t);
    REQUIRE(tn.kind == Kind::Tuple);
    REQUIRE(tn.items.size() == 2);
    CHECK(tn.items[0] == tn.items[1]);  // DUP: the same node twice
    CHECK(g.is_str(tn.items[0], "s"));
    const ckpt::pickle::NodeView last = at(g, root.items[2]);
    REQUIRE(last.items.size() == 3);
    CHECK(last.items[0] == a);            // BINGET 0 (MEMOIZE)
    CHECK(last.items[1] == tn.items[0]);  // LONG_BINGET 1000
    CHECK(last.items[2] == t);            // BINGET 7
  }

  TEST_CASE("decode: text longer than a storage block, between short ones, is read whole (the third stranger's F1)") {
    // Values past 16 KiB took a block of their own, and the decoder pointed them
    // at the block being filled instead: torch.save's b'\x0a\x0b' * 8193 came
    // back as the pickle's earlier strings run together.
    for (std::size_t size : {16384u, 16385u, 70000u, 200000u}) {
      CAPTURE(size);
      std::string big(size, 'x');
      for (std::size_t i = 0; i < size; ++i) big[i] = static_cast<char>('a' + i % 23);
      std::string bytes(size, '\0');
      for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<char>(i * 7);
      Pickle p{PROTO,
               4,
               MARK,
               SHORT_BINUNICODE,
               u8str("before"),
               BINUNICODE,
               u32str(big),
               SHORT_BINUNICODE,
               u8str("between"),
               BINBYTES,
               u32str(bytes),
               SHORT_BINUNICODE,
               u8str("after"),
               LIST,
               STOP};
      Graph g = decode(p);
      const ckpt::pickle::NodeView root = at(g, g.root);
      REQUIRE(root.items.size() == 5);
      CHECK(at(g, root.items[0]).text == "before");
      CHECK(at(g, root.items[1]).text == big);
      CHECK(at(g, root.items[2]).text == "between");
      CHECK(at(g, root.items[3]).text == bytes);
      CHECK(at(g, root.items[4]).text == "after");
      check_round_trip(g);
    }
  }

  TEST_CASE("decode: the memo follows Python's, its memory the entries put (the third stranger's F2, F3)") {
    // MEMOIZE puts at len(memo), the number of entries, whatever indices BINPUT named.
    Pickle mixed{PROTO,
                 4,
                 SHORT_BINUNICODE,
                 u8str("A"),
                 BINPUT,
                 5,
                 POP,  // A at 5
                 SHORT_BINUNICODE,
                 u8str("B"),
                 MEMOIZE,
                 POP,  // B at len(memo) == 1
                 SHORT_BINUNICODE,
                 u8str("C"),
                 BINPUT,
                 1,
                 POP,  // C replaces B at 1: len(memo) stays 2
                 SHORT_BINUNICODE,
                 u8str("D"),
                 MEMOIZE,
                 POP,  // D at 2
                 MARK,
                 BINGET,
                 5,
                 BINGET,
                 1,
                 BINGET,
                 2,
                 LIST,
                 STOP};
    Graph g = decode(mixed);
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.items.size() == 3);
    CHECK(at(g, root.items[0]).text == "A");
    CHECK(at(g, root.items[1]).text == "C");
    CHECK(at(g, root.items[2]).text == "D");
    // Indices 1000 apart: kept in a map, not a vector of every index up to the
    // last (a 5 MB pickle asked for 4 GB); every entry still found.
    std::string body;
    for (std::uint64_t k = 0; k < 20000; ++k) body += arg("r", k * 1000, 4);  // LONG_BINPUT k * 1000
    Pickle sparse{PROTO,           4,           SHORT_BINUNICODE, u8str("v"),  body,        POP,  MARK, LONG_BINGET,
                  le(19999000, 4), LONG_BINGET, le(0, 4),         LONG_BINGET, le(5000, 4), LIST, STOP};
    Graph s = decode(sparse);
    REQUIRE(at(s, s.root).items.size() == 3);
    for (NodeId item : at(s, s.root).items) CHECK(at(s, item).text == "v");
    Pickle missing{PROTO,          4,           SHORT_BINUNICODE, u8str("v"), LONG_BINPUT,
                   le(5000000, 4), LONG_BINGET, le(4999000, 4),   STOP};
    CHECK_THROWS_WITH_AS(decode(missing), doctest::Contains("memo entry 4999000 is not defined"), ckpt::Error);
  }

  TEST_CASE("encode: a nested class's dotted name is written under protocol 4 (the third stranger's F4)") {
    // Protocol 2's GLOBAL looks a name up as one attribute: "Outer.Inner" is
    // found only from protocol 4 on, by Python and by torch.load alike.
    Graph g;
    ckpt::pickle::Node object;
    object.kind = Kind::Object;
    object.op = ObjectOp::NewObj;
    object.callable = g.global("__main__", "Outer.Inner");
    object.args = g.empty_tuple();
    g.root = g.add(object);
    Buffer bytes = ckpt::pickle::encode(g);
    REQUIRE(bytes.size() > 2);
    CHECK(static_cast<int>(bytes[1]) == 4);
    Graph plain;
    plain.root = plain.global("__main__", "Outer");
    CHECK(static_cast<int>(ckpt::pickle::encode(plain)[1]) == 2);
  }

  TEST_CASE("decode: globals and objects are data") {
    Graph g = decode(objects());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::Tuple);
    REQUIRE(root.items.size() == 5);

    NodeId od = root.items[0];
    CHECK(at(g, od).kind == Kind::Object);
    CHECK(at(g, od).op == ObjectOp::Reduce);
    CHECK(g.is_global(at(g, od).callable, "collections", "OrderedDict"));
    CHECK(ckpt::class_name(g, od) == "collections.OrderedDict");
    CHECK(at(g, at(g, od).args).kind == Kind::Tuple);
    CHECK(at(g, at(g, od).args).items.empty());
    REQUIRE(g.is_mapping(od));
    CHECK(g.mapping_entries(od).size() == 1);
    CHECK(at(g, g.lookup(od, "k")).integer == 1);
    CHECK(at(g, od).state == kNoNode);

    NodeId ns = root.items[1];
    CHECK(at(g, ns).op == ObjectOp::NewObj);
    CHECK(g.is_global(at(g, ns).callable, "argparse", "Namespace"));
    CHECK(at(g, at(g, ns).state).kind == Kind::Dict);
    CHECK(at(g, g.attribute(ns, "lr")).real == 0.5);
    CHECK(at(g, ckpt::config_get(g, ns, "lr")).real == 0.5);
    CHECK(g.attribute(ns, "missing") == kNoNode);

    NodeId c = root.items[2];
    CHECK(at(g, c).op == ObjectOp::NewObjEx);
    CHECK(g.is_global(at(g, c).callable, "m", "C"));
    REQUIRE(at(g, at(g, c).args).items.size() == 1);
    CHECK(item(g, at(g, c).args, 0).integer == 1);
    CHECK(at(g, g.lookup(at(g, c).kwargs, "kw")).integer == 2);

    NodeId l = root.items[3];
    CHECK(at(g, l).op == ObjectOp::Reduce);
    REQUIRE(at(g, l).items.size() == 3);
    for (std::size_t i = 0; i < 3; ++i) CHECK(item(g, l, i).integer == static_cast<std::int64_t>(i + 1));

    NodeId pid = root.items[4];
    CHECK(at(g, pid).kind == Kind::PersId);
    auto storage = ckpt::parse_storage_id(g, pid);
    REQUIRE(storage.has_value());
    CHECK(storage->key == "0");
    CHECK(storage->dtype == ckpt::DType::Float32);
    CHECK(storage->numel == 4);
    CHECK(storage->location == "cpu");
  }

  TEST_CASE("decode: a list containing itself") {
    Graph g = decode(self_list());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::List);
    REQUIRE(root.items.size() == 1);
    CHECK(root.items[0] == g.root);
  }

  TEST_CASE("decode: an object whose BUILD state refers back to the object") {
    Graph g = decode(self_object());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::Object);
    CHECK(g.attribute(g.root, "self") == g.root);
    NodeId parent = g.attribute(g.root, "parent");
    CHECK(g.lookup(parent, "child") == g.root);
  }

  TEST_CASE("decode: a tuple reached again through a list inside it") {
    Graph g = decode(tuple_cycle());
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::List);
    REQUIRE(root.items.size() == 1);
    const ckpt::pickle::NodeView t = at(g, root.items[0]);
    REQUIRE(t.kind == Kind::Tuple);
    CHECK(t.items[0] == g.root);
  }

  TEST_CASE("round trip: decode -> encode -> decode keeps values, sharing and cycles") {
    for (const auto& [name, p] : all_pickles()) {
      CAPTURE(std::string(name));
      Graph g = decode(p);
      check_round_trip(g);
    }
  }

  TEST_CASE("round trip: the comparison helper notices lost sharing") {
    // The helper must be able to fail: (s, s) sharing one str vs two equal strs.
    Graph shared;
    NodeId s = shared.str("s");
    shared.root = shared.tuple({s, s});
    Graph split;
    NodeId s1 = split.str("s");
    NodeId s2 = split.str("s");
    split.root = split.tuple({s1, s2});
    CHECK_FALSE(Isomorphism(shared, split).check());
    CHECK_FALSE(Isomorphism(split, shared).check());
    CHECK(Isomorphism(shared, shared).check());
    // And a changed value.
    Graph other;
    NodeId t = other.str("t");
    other.root = other.tuple({t, t});
    CHECK_FALSE(Isomorphism(shared, other).check());
  }

  TEST_CASE("round trip: graphs built with the Graph API, sharing one storage between two tensors") {
    Graph g;
    NodeId rebuild = g.global("torch._utils", "_rebuild_tensor_v2");
    NodeId storage_tuple =
        g.tuple({g.str("storage"), g.global("torch", "FloatStorage"), g.str("0"), g.str("cpu"), g.integer(6)});
    Node pid;
    pid.kind = Kind::PersId;
    pid.callable = storage_tuple;
    NodeId persid = g.add(pid);
    auto tensor = [&](std::int64_t offset) {
      Node obj;
      obj.kind = Kind::Object;
      obj.callable = rebuild;
      obj.args =
          g.tuple({persid, g.integer(offset), g.tuple({g.integer(3)}), g.tuple({g.integer(1)}), g.boolean(false)});
      return g.add(obj);
    };
    Node dict;
    dict.kind = Kind::Dict;
    NodeId a = tensor(0);
    NodeId b = tensor(3);
    dict.entries = {{g.str("a"), a}, {g.str("b"), b}};
    g.root = g.add(dict);
    check_round_trip(g);
    Buffer bytes = ckpt::pickle::encode(g);
    Graph back = decode(bytes);
    auto entries = back.mapping_entries(back.root);
    // The two tensors share one persistent id node after the round trip.
    CHECK(back[back[entries[0].second].args].items[0] == back[back[entries[1].second].args].items[0]);
  }

  TEST_CASE("round trip: a tuple that is the root and is reached again through a list inside it") {
    // t = (l, 'x', ...); l = [t]; pickle.dumps(t): the inner t is written first, the
    // outer one is dropped (POP per item, or POP_MARK) and fetched from the memo.
    for (std::size_t extra : {0, 1, 3}) {
      CAPTURE(extra);
      Graph g;
      Node list;
      list.kind = Kind::List;
      NodeId l = g.add(list);
      std::vector<NodeId> items = {l, g.str("x")};
      for (std::size_t i = 0; i < extra; ++i) items.push_back(g.integer(static_cast<std::int64_t>(i)));
      NodeId t = g.tuple(items);
      g.append_item(l, t);
      g.root = t;
      check_round_trip(g);
      Graph back = decode(ckpt::pickle::encode(g));
      const ckpt::pickle::NodeView root = at(back, back.root);
      REQUIRE(root.kind == Kind::Tuple);
      REQUIRE(root.items.size() == 2 + extra);
      CHECK(at(back, root.items[0]).items[0] == back.root);
    }
  }

  TEST_CASE("round trip: a frozenset reached again through an object inside it") {
    // Regression test for a bug found by this test (fixed).
    Pickle cpython{PROTO,
                   4,
                   FRAME,
                   le(31, 8),
                   MARK,
                   SHORT_BINUNICODE,
                   u8str("m"),
                   MEMOIZE,
                   SHORT_BINUNICODE,
                   u8str("D"),
                   MEMOIZE,
                   STACK_GLOBAL,
                   MEMOIZE,
                   EMPTY_TUPLE,
                   NEWOBJ,
                   MEMOIZE,
                   EMPTY_DICT,
                   MEMOIZE,
                   SHORT_BINUNICODE,
                   u8str("f"),
                   MEMOIZE,
                   MARK,
                   BINGET,
                   3,
                   FROZENSET,
                   MEMOIZE,
                   SETITEM,
                   BUILD,
                   POP_MARK,
                   BINGET,
                   6,
                   STOP};
    // clang-format on
    Graph g = decode(cpython);
    REQUIRE(at(g, g.root).kind == Kind::FrozenSet);
    NodeId member = at(g, g.root).items[0];
    REQUIRE(g.attribute(member, "f") == g.root);  // the decoder keeps the sharing
    check_round_trip(g);
    Graph back = decode(ckpt::pickle::encode(g));
    NodeId back_member = at(back, back.root).items[0];
    CHECK(back.attribute(back_member, "f") == back.root);
  }

  TEST_CASE("round trip: an object reached again through a list in its own REDUCE arguments") {
    // Regression test for a bug found by this test (fixed).
    Pickle cpython{PROTO,  2, GLOBAL, "m\nC\n", BINPUT, 0,      EMPTY_LIST, BINPUT, 1, BINGET, 0,   BINGET, 1, TUPLE1,
                   BINPUT, 2, REDUCE, BINPUT,   3,      APPEND, TUPLE1,     BINPUT, 4, REDUCE, POP, BINGET, 3, STOP};
    // clang-format on
    Graph g = decode(cpython);
    const ckpt::pickle::NodeView root = at(g, g.root);
    REQUIRE(root.kind == Kind::Object);
    NodeId list = item(g, root.args, 0).kind == Kind::List ? at(g, root.args).items[0] : kNoNode;
    REQUIRE(list != kNoNode);
    CHECK(at(g, list).items[0] == g.root);
    Buffer bytes;
    CHECK_NOTHROW(bytes = ckpt::pickle::encode(g));
    check_round_trip(g);
  }

  TEST_CASE("round trip: more than 256 memo entries and more than 1000 items per container") {
    // Strings are memoised: 300 of them, each referenced twice, need LONG_BINPUT and
    // LONG_BINGET past index 255; 2500 list items and 1001 dict entries are batched.
    Graph g;
    Node list;
    list.kind = Kind::List;
    std::vector<NodeId> strs;
    for (int i = 0; i < 300; ++i) {
      std::string name = "s";
      name.append(std::to_string(i));
      strs.push_back(g.str(name));
    }
    for (NodeId s : strs) list.items.push_back(s);
    for (NodeId s : strs) list.items.push_back(s);
    for (int i = 0; i < 1900; ++i) list.items.push_back(g.integer(i * 1000));
    Node dict;
    dict.kind = Kind::Dict;
    for (int i = 0; i < 1001; ++i) dict.entries.emplace_back(g.integer(i), strs[static_cast<std::size_t>(i % 300)]);
    NodeId d = g.add(std::move(dict));
    list.items.push_back(d);
    g.root = g.add(std::move(list));
    Buffer bytes = ckpt::pickle::encode(g);
    check_round_trip(g);
    Graph back = decode(bytes);
    const ckpt::pickle::NodeView root = at(back, back.root);
    REQUIRE(root.items.size() == 2501);
    CHECK(root.items[299] == root.items[599]);
    CHECK(back.is_str(root.items[299], "s299"));
    CHECK(at(back, root.items[2499]).integer == 1899 * 1000);
    CHECK(at(back, root.items[2500]).entries.size() == 1001);
  }

  // ------------------------------------------------------------ integers

  TEST_CASE("integers at the opcode boundaries decode and re-encode to the same bytes") {
    struct Case {
      std::int64_t value;
      std::string encoded;  // as CPython's pickle.dumps(value, protocol=2) writes it, without PROTO and STOP
    };
    const Case cases[] = {
        {0, arg("K", 0, 1)},
        {255, arg("K", 255, 1)},
        {256, arg("M", 256, 2)},
        {65535, arg("M", 65535, 2)},
        {65536, arg("J", 65536, 4)},
        {-1, arg("J", 0xFFFFFFFF, 4)},
        {std::numeric_limits<std::int32_t>::min(), arg("J", 0x80000000, 4)},
        {std::numeric_limits<std::int32_t>::max(), arg("J", 0x7FFFFFFF, 4)},
        {std::int64_t{std::numeric_limits<std::int32_t>::max()} + 1, arg("\x8a\x05", 0x80000000, 5)},
        {std::int64_t{std::numeric_limits<std::int32_t>::min()} - 1, arg("\x8a\x05", 0xFF7FFFFFFFull, 5)},
        {std::int64_t{1} << 40, arg("\x8a\x06", std::uint64_t{1} << 40, 6)},
        {std::numeric_limits<std::int64_t>::min(), arg("\x8a\x08", 0x8000000000000000ull, 8)},
        {std::numeric_limits<std::int64_t>::max(), arg("\x8a\x08", 0x7FFFFFFFFFFFFFFFull, 8)},
    };
    for (const Case& c : cases) {
      CAPTURE(c.value);
      std::string full = "\x80\x02";
      full.append(c.encoded);
      full.push_back('.');
      Buffer bytes(reinterpret_cast<const std::byte*>(full.data()),
                   reinterpret_cast<const std::byte*>(full.data()) + full.size());
      Graph g = decode(bytes);
      REQUIRE(at(g, g.root).kind == Kind::Int);
      CHECK(at(g, g.root).integer == c.value);
      CHECK(ckpt::pickle::encode(g) == bytes);
      // And from a Graph built by hand.
      Graph built;
      built.root = built.integer(c.value);
      CHECK(ckpt::pickle::encode(built) == bytes);
    }
  }

  TEST_CASE("LONG1/LONG4 in any width decode to the right int64, and beyond int64 to BigInt") {
    struct Case {
      std::string bytes;  // LONG payload, little-endian two's complement
      std::int64_t value;
    };
    const Case fits[] = {
        {"", 0},
        {"\xff", -1},
        {"\x7f", 127},
        {std::string("\x80\x00", 2), 128},
        {std::string("\x00\xff", 2), -256},
        {std::string("\x01\x00\x00\x00\x00\x00\x00\x00\x00", 9), 1},  // non-minimal, 9 bytes
        {std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 10), -1},
        {std::string("\x00\x00\x00\x00\x00\x00\x00\x80\xff", 9), std::numeric_limits<std::int64_t>::min()},
        {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f\x00", 9), std::numeric_limits<std::int64_t>::max()},
    };
    for (const Case& c : fits) {
      CAPTURE(c.bytes.size());
      CAPTURE(c.value);
      for (bool long4 : {false, true}) {
        Pickle p = long4 ? Pickle{PROTO, 2, LONG4, le(c.bytes.size(), 4), c.bytes, STOP}
                         : Pickle{PROTO, 2, LONG1, static_cast<int>(c.bytes.size()), c.bytes, STOP};
        Graph g = decode(p);
        REQUIRE(at(g, g.root).kind == Kind::Int);
        CHECK(at(g, g.root).integer == c.value);
      }
    }
    // 2**64 and -(2**63) - 1 need 9 bytes: BigInt keeps the bytes and re-encodes them.
    const std::string big[] = {std::string("\x00\x00\x00\x00\x00\x00\x00\x00\x01", 9),
                               std::string("\xff\xff\xff\xff\xff\xff\xff\x7f\xff", 9),
                               std::string("\x00\x00\x00\x00\x00\x00\x00\x80\x00", 9)};  // 2**63
    for (const std::string& payload : big) {
      Pickle p{PROTO, 2, LONG1, 9, payload, STOP};
      Graph g = decode(p);
      REQUIRE(at(g, g.root).kind == Kind::BigInt);
      CHECK(at(g, g.root).text == payload);
      CHECK(ckpt::pickle::encode(g) == p.bytes);
      Pickle p4{PROTO, 2, LONG4, le(9, 4), payload, STOP};
      Graph g4 = decode(p4);
      REQUIRE(at(g4, g4.root).kind == Kind::BigInt);
      CHECK(at(g4, g4.root).text == payload);
      CHECK(ckpt::pickle::encode(g4) == p.bytes);  // re-encoded in the shorter LONG1 form
    }
  }

  TEST_CASE("floats round trip bit for bit") {
    for (double value : {0.0, -0.0, 1.0 / 3.0, -1e300, std::numeric_limits<double>::infinity(),
                         std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::quiet_NaN()}) {
      Pickle p{PROTO, 2, BINFLOAT, be_double(value), STOP};
      Graph g = decode(p);
      REQUIRE(at(g, g.root).kind == Kind::Float);
      CHECK(std::bit_cast<std::uint64_t>(at(g, g.root).real) == std::bit_cast<std::uint64_t>(value));
      CHECK(ckpt::pickle::encode(g) == p.bytes);
    }
  }

  // ------------------------------------------------------------ security

  TEST_CASE("a pickle that would run a shell command decodes to inert data") {
    std::string marker = "/tmp/ckpt_unit_pwned_" + std::to_string(::getpid());
    std::filesystem::remove(marker);
    for (const char* module : {"os", "posix"}) {
      CAPTURE(std::string(module));
      std::string command = "echo pwned > " + marker;
      Pickle p{PROTO, 2, GLOBAL, std::string(module) + "\nsystem\n", BINUNICODE, u32str(command), TUPLE1, REDUCE, STOP};
      Graph g = decode(p);
      const ckpt::pickle::NodeView root = at(g, g.root);
      REQUIRE(root.kind == Kind::Object);
      CHECK(root.op == ObjectOp::Reduce);
      CHECK(g.is_global(root.callable, module, "system"));
      std::optional<ckpt::pickle::NodeView> cls = g.object_class(g.root);
      REQUIRE(cls.has_value());
      CHECK(cls->text == module);
      CHECK(cls->name == "system");
      REQUIRE(at(g, root.args).items.size() == 1);
      CHECK(g.is_str(at(g, root.args).items[0], command));
      // Encoding, JSON rendering and walking touch it as data too.
      check_round_trip(g);
      nlohmann::ordered_json rendered = ckpt::to_json(g, g.root, nullptr);
      CHECK(rendered["$class"] == std::string(module) + ".system");
      ckpt::walk_paths(g, g.root, "", [](NodeId, const std::string&) {});
    }
    CHECK_FALSE(std::filesystem::exists(marker));
  }

  // ------------------------------------------------------------ malformed input

  TEST_CASE("malformed pickles: each throws an Error located at the offending opcode") {
    struct Case {
      const char* what;
      Pickle pickle;
      const char* message;
      std::uint64_t offset;  // relative to the pickle's first byte
    };
    // clang-format off
  const Case cases[] = {
      {"unknown opcode 0xff", {PROTO, 2, 0xff, STOP}, "unsupported opcode 0xff", 2},
      {"protocol 0 INT", {PROTO, 2, 'I', "1\n", STOP}, "unsupported opcode 0x49 ('I')", 2},
      {"protocol 0 STRING", {'S', "'abc'\n", STOP}, "unsupported opcode 0x53 ('S')", 0},
      {"protocol 0 PERSID", {PROTO, 2, 'P', "1\n", STOP}, "unsupported opcode 0x50 ('P')", 2},
      {"INST", {PROTO, 2, MARK, 'i', "os\nsystem\n", STOP}, "unsupported opcode 0x69 ('i')", 3},
      {"EXT1", {PROTO, 2, 0x82, 1, STOP}, "unsupported opcode 0x82", 2},
      {"PROTO 1", {PROTO, 1, NONE, STOP}, "unsupported pickle protocol 1", 0},
      {"PROTO 6", {PROTO, 6, NONE, STOP}, "unsupported pickle protocol 6", 0},
      {"BINUNICODE length cut short", {PROTO, 2, BINUNICODE, std::string("\x05\x00", 2)}, "truncated", 3},
      {"BINUNICODE longer than the data", {PROTO, 2, BINUNICODE, le(100, 4), "abc", STOP}, "string of 100 bytes runs past the end", 2},
      {"BINUNICODE8 of 2**63 bytes", {PROTO, 4, BINUNICODE8, le(1ull << 63, 8), "abc", STOP}, "runs past the end", 2},
      {"stack underflow", {PROTO, 2, TUPLE1, STOP}, "stack underflow", 2},
      {"underflow below a MARK", {PROTO, 2, NONE, MARK, TUPLE2, STOP}, "stack underflow", 4},
      {"TUPLE without MARK", {PROTO, 2, NONE, TUPLE, STOP}, "no MARK", 3},
      {"BINGET of an undefined memo entry", {PROTO, 2, NONE, BINPUT, 0, BINGET, 5, STOP}, "memo entry 5 is not defined", 5},
      {"LONG_BINGET of an undefined memo entry", {PROTO, 2, LONG_BINGET, le(70000, 4), STOP}, "memo entry 70000", 2},
      {"SETITEMS with an odd count", {PROTO, 2, EMPTY_DICT, MARK, BININT1, 1, SETITEMS, STOP}, "odd number", 6},
      {"BUILD on a list", {PROTO, 2, EMPTY_LIST, EMPTY_DICT, BUILD, STOP}, "BUILD applied to a list", 4},
      {"APPEND on a dict", {PROTO, 2, EMPTY_DICT, BININT1, 1, APPEND, STOP}, "APPEND applied to a dict", 5},
      {"SETITEM on a list", {PROTO, 2, EMPTY_LIST, BININT1, 1, BININT1, 2, SETITEM, STOP}, "SETITEM applied to a list", 7},
      {"ADDITEMS on a list", {PROTO, 4, EMPTY_LIST, MARK, BININT1, 1, ADDITEMS, STOP}, "ADDITEMS", 6},
      {"BUILD twice", {PROTO, 2, GLOBAL, "m\nC\n", EMPTY_TUPLE, REDUCE, NONE, BUILD, NONE, BUILD, STOP}, "BUILD applied twice", 12},
      {"REDUCE arguments not a tuple", {PROTO, 2, GLOBAL, "m\nC\n", EMPTY_LIST, REDUCE, STOP}, "not a tuple", 8},
      {"NEWOBJ_EX keywords not a dict", {PROTO, 4, GLOBAL, "m\nC\n", EMPTY_TUPLE, EMPTY_LIST, NEWOBJ_EX, STOP}, "not a dict", 9},
      {"STACK_GLOBAL of non-strings", {PROTO, 4, BININT1, 1, BININT1, 2, STACK_GLOBAL, STOP}, "STACK_GLOBAL of non-strings", 6},
      {"GLOBAL without a newline", {PROTO, 2, GLOBAL, "os system"}, "newline", 2},
      {"negative LONG4 length", {PROTO, 2, LONG4, le(0xFFFFFFFF, 4), STOP}, "negative LONG4 length", 2},
      {"STOP with extra items on the stack", {PROTO, 2, NONE, NONE, STOP}, "STOP with a malformed stack", 4},
      {"STOP with an open MARK", {PROTO, 2, MARK, NONE, STOP}, "STOP with a malformed stack", 4},
      {"STOP on an empty stack", {PROTO, 2, STOP}, "STOP with a malformed stack", 2},
      {"missing STOP", {PROTO, 2, NONE}, "truncated", 3},
      {"empty input", {}, "truncated", 0},
  };
    // clang-format on
    constexpr std::uint64_t kBase = 0x1040;  // where the pickle record's data starts in its file
    for (const Case& c : cases) {
      std::string what = c.what;
      CAPTURE(what);
      bool threw = false;
      try {
        decode(c.pickle.bytes, kBase);
      } catch (const ckpt::Error& e) {
        threw = true;
        std::string message = e.what();
        CAPTURE(message);
        CHECK(message.find(c.message) != std::string::npos);
        CHECK(message.find("at byte 0x") != std::string::npos);
        CHECK(message.rfind("test.pt: archive/data.pkl: ", 0) == 0);
        CHECK(e.where().byte_offset == kBase + c.offset);
        char hex[32];
        std::snprintf(hex, sizeof hex, "at byte 0x%llx", static_cast<unsigned long long>(kBase + c.offset));
        CHECK(message.find(hex) != std::string::npos);
      }
      CHECK(threw);
    }
  }

  // ------------------------------------------------------------ depth

  namespace {

  // lists[0] = [lists[1]], lists[1] = [lists[2]], ... `depth` lists deep.
  Graph nested_lists(int depth) {
    Graph g;
    NodeId inner = kNoNode;
    for (int i = 0; i < depth; ++i) {
      Node list;
      list.kind = Kind::List;
      if (inner != kNoNode) list.items.push_back(inner);
      inner = g.add(std::move(list));
    }
    g.root = inner;
    return g;
  }

  }  // namespace

  TEST_CASE("nesting deeper than kMaxDepth is an Error, not a stack overflow") {
    static_assert(ckpt::pickle::kMaxDepth < 10000);
    Graph deep = nested_lists(10000);
    CHECK_THROWS_KIND(ckpt::pickle::encode(deep), ckpt::ErrorKind::BadInput);
    CHECK_THROWS_AS(ckpt::walk_paths(deep, deep.root, "", [](NodeId, const std::string&) {}), ckpt::Error);
    CHECK_THROWS_AS(ckpt::to_json(deep, deep.root, nullptr), ckpt::Error);

    // Nested dicts and tuples go through other paths of the encoder.
    Graph dicts;
    NodeId inner = dicts.none();
    for (int i = 0; i < 10000; ++i) {
      Node d;
      d.kind = Kind::Dict;
      d.entries.emplace_back(dicts.str("k"), inner);
      inner = dicts.add(std::move(d));
    }
    dicts.root = inner;
    CHECK_THROWS_AS(ckpt::pickle::encode(dicts), ckpt::Error);
    Graph tuples;
    inner = tuples.none();
    for (int i = 0; i < 10000; ++i) inner = tuples.tuple({inner, tuples.integer(i)});
    tuples.root = inner;
    CHECK_THROWS_AS(ckpt::pickle::encode(tuples), ckpt::Error);
  }

  TEST_CASE("nesting as deep as Python pickles (1000) encodes, and 10000 levels decode without recursion") {
    Graph ok = nested_lists(1000);
    check_round_trip(ok);

    // The decoder is a loop over opcodes: depth costs it nothing.
    Buffer deep{std::byte{0x80}, std::byte{2}};
    for (int i = 0; i < 10000; ++i) deep.push_back(std::byte{']'});
    for (int i = 0; i < 9999; ++i) deep.push_back(std::byte{'a'});
    deep.push_back(std::byte{'.'});
    Graph g = decode(deep);
    int depth = 1;
    for (NodeId id = g.root; !g[id].items.empty(); id = g[id].items[0]) ++depth;
    CHECK(depth == 10000);
  }

  TEST_CASE("encode refuses graphs it cannot write faithfully") {
    Graph missing;
    missing.root = 5;
    CHECK_THROWS_AS(ckpt::pickle::encode(missing), ckpt::Error);
    Graph newline;
    newline.root = newline.global("os\nsystem", "x");
    CHECK_THROWS_KIND(ckpt::pickle::encode(newline), ckpt::ErrorKind::BadInput);
  }

}  // TEST_SUITE

TEST_CASE("object paths: labels escaped as JSON Pointer, unique per container, reversible") {
  using ckpt::escape_label;
  using ckpt::unescape_label;
  CHECK(escape_label("a/b") == "a~1b");
  CHECK(escape_label("~/~") == "~0~1~0");
  CHECK(escape_label("plain.key_0") == "plain.key_0");
  for (std::string key : {"a/b", "~1", "x~~y", "/", "~", "", "a~0b/c"}) CHECK(unescape_label(escape_label(key)) == key);
  CHECK(ckpt::append_path("model", "a/b") == "model/a~1b");
  CHECK(ckpt::path_label("") == "~~empty");
  CHECK(unescape_label("~~empty").empty());
  CHECK(ckpt::path_labels("model/a~1b/~~empty/0") == std::vector<std::string>{"model", "a/b", "", "0"});
  CHECK(ckpt::path_labels("") == std::vector<std::string>{""});
  CHECK(ckpt::path_labels("a/") == std::vector<std::string>{"a", ""});
  CHECK(ckpt::path_label(std::string(300, 'k')) ==
        std::string(300, 'k'));  // not cut: another file's key may share 256 bytes
  std::string long_prefix(1000, 'a');
  CHECK(ckpt::join_path(long_prefix, std::string(100, 'b')) == long_prefix + "/~~...");
  CHECK(ckpt::join_path(long_prefix + "/~~...", "c") == long_prefix + "/~~...");

  ckpt::ChildLabels labels;
  CHECK(labels.unique("3") == "3");
  CHECK(labels.unique("3") == "3~~2");
  CHECK(labels.unique("3") == "3~~3");
  CHECK(labels.unique("3~~2") == "3~~2~~2");  // a label can only look like a renamed one by being renamed
  CHECK(labels.unique("?") == "?");
  CHECK(labels.unique("?") == "?~~2");

  // A walk over {"a/b": 1, "a": {"b": 2}, 3: 3, "3": 4} gives four distinct paths.
  ckpt::pickle::Graph graph;
  auto dict = [&](std::vector<std::pair<ckpt::pickle::NodeId, ckpt::pickle::NodeId>> entries) {
    ckpt::pickle::Node node;
    node.kind = ckpt::pickle::Kind::Dict;
    node.entries = std::move(entries);
    return graph.add(std::move(node));
  };
  auto inner = dict({{graph.str("b"), graph.integer(2)}});
  graph.root = dict({{graph.str("a/b"), graph.integer(1)},
                     {graph.str("a"), inner},
                     {graph.integer(3), graph.integer(3)},
                     {graph.str("3"), graph.integer(4)}});
  std::vector<std::string> paths;
  ckpt::walk_paths(graph, graph.root, "",
                   [&](ckpt::pickle::NodeId, const std::string& path) { paths.push_back(path); });
  CHECK(paths == std::vector<std::string>{"", "a~1b", "a", "a/b", "3~~int", "3"});
}
