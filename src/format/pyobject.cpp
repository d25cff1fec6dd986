#include "ckpt/format/pyobject.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string_view>
#include <unordered_map>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/python_globals.hpp"

namespace ckpt {

using pickle::Graph;
using pickle::Kind;
using pickle::kNoNode;
using pickle::NodeId;
using json = nlohmann::ordered_json;

std::string class_name(const Graph& graph, NodeId id) {
  std::optional<pickle::NodeView> cls = graph.object_class(id);
  return cls ? fmt::format("{}.{}", cls->text, cls->name) : "";
}

namespace {

bool is_omegaconf_container(const std::string& name) {
  return is_qualified_name(name, py::kDictConfig) || is_qualified_name(name, py::kListConfig);
}

bool is_omegaconf_value_node(const std::string& name) {
  return is_in_module(name, py::kOmegaConfNodesModule);
}

// An OmegaConf value node (AnyNode, IntegerNode, ...) keeps its value in `_val`.
NodeId omegaconf_unwrap(const Graph& graph, NodeId id) {
  if (is_omegaconf_value_node(class_name(graph, id))) {
    NodeId value = graph.attribute(id, "_val");
    if (value != kNoNode) return value;
  }
  return id;
}

}  // namespace

NodeId config_get(const Graph& graph, NodeId container, std::string_view key) {
  if (container >= graph.size()) return kNoNode;
  const pickle::NodeView node = graph[container];
  if (node.kind == Kind::Dict) return graph.lookup(container, key);
  if (node.kind != Kind::Object) return kNoNode;
  std::string name = class_name(graph, container);
  if (is_omegaconf_container(name)) {
    NodeId content = graph.attribute(container, "_content");
    NodeId child = graph.lookup(content, key);
    return child == kNoNode ? kNoNode : omegaconf_unwrap(graph, child);
  }
  if (!node.entries.empty()) return graph.lookup(container, key);  // OrderedDict and other dict subclasses
  return graph.attribute(container, key);                          // Namespace and plain objects
}

NodeId config_get_path(const Graph& graph, NodeId container, const std::vector<std::string_view>& keys) {
  for (std::string_view key : keys) {
    container = config_get(graph, container, key);
    if (container == kNoNode) return kNoNode;
  }
  return container;
}

std::optional<std::int64_t> as_int(const Graph& graph, NodeId id) {
  if (id < graph.size() && graph[id].kind == Kind::Int) return graph[id].integer;
  return std::nullopt;
}

std::optional<std::string> as_str(const Graph& graph, NodeId id) {
  if (id < graph.size() && graph[id].kind == Kind::Str) return std::string(graph[id].text);
  return std::nullopt;
}

std::optional<std::span<const NodeId>> as_sequence(const Graph& graph, NodeId id) {
  if (id >= graph.size()) return std::nullopt;
  pickle::NodeView node = graph[id];
  if (node.kind != Kind::List && node.kind != Kind::Tuple) return std::nullopt;
  return node.items;
}

std::optional<std::vector<std::int64_t>> as_int_list(const Graph& graph, NodeId id) {
  if (is_qualified_name(class_name(graph, id), py::kTorchSize)) {
    const auto& args = graph[graph[id].args].items;
    if (args.size() != 1) return std::nullopt;
    id = args[0];
  }
  auto items = as_sequence(graph, id);
  if (!items) return std::nullopt;
  std::vector<std::int64_t> values;
  for (NodeId item : *items) {
    auto value = as_int(graph, item);
    if (!value) return std::nullopt;
    values.push_back(*value);
  }
  return values;
}

namespace {

// The decimal text of an integer pickled as LONG1/LONG4 (two's complement,
// little-endian), or "" past kMaxBigIntBytes (the conversion is quadratic).
constexpr std::size_t kMaxBigIntBytes = 1024;
std::string decimal_of(std::string_view little_endian) {
  if (little_endian.empty()) return "0";
  if (little_endian.size() > kMaxBigIntBytes) return "";
  std::vector<std::uint8_t> magnitude(little_endian.rbegin(), little_endian.rend());  // big-endian
  const bool negative = (magnitude.front() & 0x80) != 0;
  if (negative) {  // two's complement: invert and add one
    for (std::uint8_t& byte : magnitude) byte = static_cast<std::uint8_t>(~byte);
    for (auto it = magnitude.rbegin(); it != magnitude.rend(); ++it) {
      if (++*it != 0) break;
    }
  }
  std::string digits;
  std::size_t first = 0;  // the first non-zero byte of what is left to divide
  while (true) {
    while (first < magnitude.size() && magnitude[first] == 0) ++first;
    if (first == magnitude.size()) break;
    unsigned remainder = 0;
    for (std::size_t i = first; i < magnitude.size(); ++i) {
      unsigned value = remainder * 256 + magnitude[i];
      magnitude[i] = static_cast<std::uint8_t>(value / 10);
      remainder = value % 10;
    }
    digits.push_back(static_cast<char>('0' + remainder));
  }
  if (digits.empty()) digits.push_back('0');
  if (negative) digits.push_back('-');
  std::reverse(digits.begin(), digits.end());
  return digits;
}

class JsonRenderer {
 public:
  JsonRenderer(const Graph& graph, const JsonLeaf& leaf, std::size_t max_nodes)
      : graph_(graph), leaf_(leaf), max_nodes_(max_nodes) {}

  json render(NodeId id, const std::string& path, int depth) {
    if (id >= graph_.size()) return nullptr;
    if (depth > pickle::kMaxDepth) throw Error("objects nested too deeply to render");
    if (leaf_) {
      if (auto replaced = leaf_(id)) return *replaced;
    }
    const pickle::NodeView node = graph_[id];
    switch (node.kind) {
      case Kind::None: return nullptr;
      case Kind::Bool: return node.boolean;
      case Kind::Int: return node.integer;
      case Kind::BigInt: {  // beyond 64 bits: its decimal text (a JSON number would lose digits)
        std::string decimal = decimal_of(node.text);
        if (decimal.empty()) return json{{"$bigint_bytes", node.text.size()}};
        return json{{"$bigint", decimal}};
      }
      case Kind::Float:
        if (std::isfinite(node.real)) return node.real;
        return fmt::format("{}", node.real);
      case Kind::Str: return std::string(node.text);
      case Kind::Bytes:
      case Kind::ByteArray: return json{{"$bytes", node.text.size()}};
      case Kind::Global: return json{{"$global", fmt::format("{}.{}", node.text, node.name)}};
      default: break;
    }
    if (auto it = seen_.find(id); it != seen_.end()) return json{{"$ref", it->second}};
    seen_.emplace(id, path);
    if (++count_ > max_nodes_) return "...";
    ++depth;
    // `label`: a path label, escaped already (checkpoint.hpp).
    auto child = [&](NodeId c, const std::string& label) { return render(c, join_path(path, label), depth); };
    switch (node.kind) {
      case Kind::Tuple:
      case Kind::List:
      case Kind::Set:
      case Kind::FrozenSet: {
        json out = json::array();
        for (std::size_t i = 0; i < node.items.size(); ++i) out.push_back(child(node.items[i], std::to_string(i)));
        return out;
      }
      case Kind::Dict: return mapping(node.entries, child);
      case Kind::PersId: return json{{"$persistent_id", child(node.callable, "id")}};
      case Kind::Object: return object(id, node, child);
      default: return nullptr;
    }
  }

 private:
  // In file order, keys as mapping_keys gives them (checkpoint.hpp); a text met
  // again gets "~~2", so no entry is lost.
  template <typename Child>
  json mapping(std::span<const pickle::Entry> entries, Child& child) {
    json out = json::object();
    ChildLabels keys;    // the JSON object's ("~~2" for a literal "3~~int" beside the int 3 and the str "3")
    ChildLabels labels;  // the children's paths'
    std::vector<MappingKey> names = mapping_keys(graph_, entries);
    const bool distinct = all_distinct(names, &MappingKey::text) && all_distinct(names, &MappingKey::label);
    // Appended to the object's vector: its operator[] would look each key up
    // again (n^2 for a state dict of 10^5 keys). The keys are unique already.
    auto& items = static_cast<json::object_t::Container&>(out.get_ref<json::object_t&>());
    items.reserve(names.size());
    for (std::size_t i = 0; i < names.size(); ++i) {
      std::string key = distinct ? std::move(names[i].text) : keys.unique(names[i].text);
      json value = child(entries[i].second, distinct ? names[i].label : labels.unique(names[i].label));
      items.emplace_back(std::move(key), std::move(value));
    }
    return out;
  }

  template <typename Child>
  json object(NodeId id, const pickle::NodeView& node, Child& child) {
    std::string name = class_name(graph_, id);
    if (is_qualified_name(name, py::kTorchSize)) {
      if (auto dims = as_int_list(graph_, id)) return json{{"$class", name}, {"value", *dims}};
    }
    if (is_qualified_name(name, py::kOrderedDict) && node.items.empty()) {
      json out = mapping(node.entries, child);
      return out;
    }
    if (is_omegaconf_container(name)) {
      NodeId content = graph_.attribute(id, "_content");
      json out = {{"$class", name}};
      if (content != kNoNode && graph_[content].kind == Kind::Dict) {
        std::vector<std::pair<NodeId, NodeId>> entries;
        for (const auto& [k, v] : graph_[content].entries) entries.emplace_back(k, omegaconf_unwrap(graph_, v));
        out["value"] = mapping(entries, child);
      } else if (content != kNoNode && graph_[content].kind == Kind::List) {
        json values = json::array();
        const auto& items = graph_[content].items;
        for (std::size_t i = 0; i < items.size(); ++i)
          values.push_back(child(omegaconf_unwrap(graph_, items[i]), std::to_string(i)));
        out["value"] = std::move(values);
      } else {
        out["value"] = content == kNoNode ? json(nullptr) : child(content, "_content");
      }
      return out;
    }
    json out = {{"$class", name.empty() ? "<object>" : name}};
    if (node.state != kNoNode && graph_[node.state].kind == Kind::Dict && graph_[node.args].items.empty()) {
      out["attributes"] = mapping(graph_[node.state].entries, child);  // Namespace and plain instances
    } else {
      if (!graph_[node.args].items.empty()) out["args"] = child(node.args, "args");
      if (node.state != kNoNode) out["state"] = child(node.state, "state");
    }
    if (!node.entries.empty()) out["items"] = mapping(node.entries, child);
    if (!node.items.empty()) {
      json items = json::array();
      for (std::size_t i = 0; i < node.items.size(); ++i) items.push_back(child(node.items[i], std::to_string(i)));
      out["list"] = std::move(items);
    }
    return out;
  }

  const Graph& graph_;
  const JsonLeaf& leaf_;
  std::size_t max_nodes_;
  std::size_t count_ = 0;
  std::unordered_map<NodeId, std::string> seen_;
};

}  // namespace

json to_json(const Graph& graph, NodeId id, const JsonLeaf& leaf, std::size_t max_nodes) {
  return JsonRenderer(graph, leaf, max_nodes).render(id, "", 0);
}

}  // namespace ckpt

namespace ckpt {

namespace {

// The (container, entry index) under which `key` is stored, following the
// same rules as config_get: dict entries, OmegaConf `_content` plus the value
// node's `_val`, or the BUILD state dict of an object.
using Slot = std::pair<NodeId, std::size_t>;

std::optional<Slot> entry_slot(const Graph& graph, NodeId container, std::string_view key) {
  auto find_in = [&](NodeId mapping, std::string_view name) -> std::optional<Slot> {
    std::span<const pickle::Entry> entries = graph.mapping_entries(mapping);
    for (std::size_t i = 0; i < entries.size(); ++i) {
      if (graph.is_str(entries[i].first, name)) return Slot{mapping, i};
    }
    return std::nullopt;
  };
  if (container >= graph.size()) return std::nullopt;
  const pickle::NodeView node = graph[container];
  if (node.kind == Kind::Dict || (node.kind == Kind::Object && !node.entries.empty())) return find_in(container, key);
  if (node.kind != Kind::Object) return std::nullopt;
  if (is_omegaconf_container(class_name(graph, container))) {
    auto slot = find_in(graph.attribute(container, "_content"), key);
    if (!slot) return std::nullopt;
    NodeId child = graph[slot->first].entries[slot->second].second;
    // A value node: the value itself is its `_val` attribute.
    if (is_omegaconf_value_node(class_name(graph, child)) && graph.state_dict(child) != kNoNode) {
      return find_in(graph.state_dict(child), "_val");
    }
    return slot;
  }
  return find_in(graph.state_dict(container), key);
}

}  // namespace

bool config_set_int(Graph& graph, NodeId container, const std::vector<std::string_view>& keys, std::int64_t value) {
  if (keys.empty()) return false;
  NodeId parent = config_get_path(graph, container, {keys.begin(), keys.end() - 1});
  if (parent == kNoNode) return false;
  auto slot = entry_slot(graph, parent, keys.back());
  if (!slot) return false;
  auto [mapping, index] = *slot;
  NodeId old = graph[mapping].entries[index].second;
  if (graph[old].kind != Kind::Int) return false;
  graph.set_entry_value(mapping, index, graph.integer(value));
  return true;
}

std::vector<NodeId> reachable(const Graph& graph, NodeId from) {
  std::vector<NodeId> out;
  std::vector<bool> seen(graph.size(), false);
  std::vector<NodeId> stack{from};
  while (!stack.empty()) {
    NodeId id = stack.back();
    stack.pop_back();
    if (id >= graph.size() || seen[id]) continue;
    seen[id] = true;
    out.push_back(id);
    const pickle::NodeView node = graph[id];
    for (NodeId item : node.items) stack.push_back(item);
    for (const auto& [k, v] : node.entries) {
      stack.push_back(k);
      stack.push_back(v);
    }
    for (NodeId edge : {node.callable, node.args, node.kwargs, node.state}) {
      if (edge != kNoNode) stack.push_back(edge);
    }
  }
  return out;
}

NodeId copy_value(Graph& to, const Graph& from, NodeId root, std::unordered_map<NodeId, NodeId>* copied) {
  std::unordered_map<NodeId, NodeId> local;
  std::unordered_map<NodeId, NodeId>& map = copied != nullptr ? *copied : local;
  std::vector<NodeId> nodes = reachable(from, root);
  if (nodes.empty()) return to.none();  // (an id past the end)
  // First every node, its edges still `from`'s ids; then the edges mapped.
  std::vector<NodeId> with_edges;
  for (NodeId id : nodes) {
    const pickle::NodeView node = from[id];
    switch (node.kind) {
      case Kind::None: map[id] = to.none(); break;
      case Kind::Bool: map[id] = to.boolean(node.boolean); break;
      case Kind::Int: map[id] = to.integer(node.integer); break;
      case Kind::Global: map[id] = to.global(node.text, node.name); break;
      default: map[id] = to.add(node.copy()); with_edges.push_back(id);
    }
  }
  auto mapped = [&](NodeId id) {
    if (id == kNoNode) return kNoNode;
    auto it = map.find(id);
    return it == map.end() ? to.none() : it->second;  // (an edge past `from`'s end: none, as reachable skips it)
  };
  for (NodeId id : with_edges) {
    pickle::Node node = from[id].copy();
    for (NodeId& item : node.items) item = mapped(item);
    for (auto& [key, value] : node.entries) {
      key = mapped(key);
      value = mapped(value);
    }
    node.callable = mapped(node.callable);
    node.args = mapped(node.args);
    node.kwargs = mapped(node.kwargs);
    node.state = mapped(node.state);
    to.replace(map.at(id), node);
  }
  return map.at(root);
}

}  // namespace ckpt

namespace ckpt {

namespace {

class PlainCopier {
 public:
  explicit PlainCopier(Graph& graph) : graph_(graph) {}

  NodeId copy(NodeId id, int depth) {
    if (id >= graph_.size()) return graph_.none();
    if (depth > pickle::kMaxDepth) throw Error("objects nested too deeply to convert");
    switch (graph_[id].kind) {
      case Kind::None:
      case Kind::Bool:
      case Kind::Int:
      case Kind::BigInt:
      case Kind::Float:
      case Kind::Str: return id;
      default: break;
    }
    if (auto it = done_.find(id); it != done_.end()) return it->second == kNoNode ? graph_.none() : it->second;
    done_[id] = kNoNode;  // in progress: a cycle back here is cut
    NodeId out = convert(id, depth + 1);
    done_[id] = out;
    return out;
  }

 private:
  // A new container of `items` (or `entries`), each converted; OmegaConf value
  // nodes unwrapped first with `unwrap_values`. They are copied before anything
  // is converted, which adds nodes.
  NodeId sequence(Kind kind, std::span<const NodeId> items, int depth, bool unwrap_values = false) {
    pickle::Node node;
    node.kind = kind;
    node.items.assign(items.begin(), items.end());
    for (NodeId& item : node.items) item = copy(unwrap_values ? omegaconf_unwrap(graph_, item) : item, depth);
    return graph_.add(node);
  }

  NodeId mapping(std::span<const pickle::Entry> entries, int depth, bool unwrap_values = false) {
    pickle::Node node;
    node.kind = Kind::Dict;
    node.entries.assign(entries.begin(), entries.end());
    for (auto& [key, value] : node.entries) {
      key = hashable(copy(key, depth));
      value = copy(unwrap_values ? omegaconf_unwrap(graph_, value) : value, depth);
    }
    return graph_.add(node);
  }

  // A dict key must stay hashable: the lists a conversion made inside it
  // (from sets, bytes) become tuples, in new nodes (others may share them).
  NodeId hashable(NodeId id) {
    if (graph_[id].kind != Kind::List && graph_[id].kind != Kind::Tuple) return id;
    std::span<const NodeId> old = graph_[id].items;
    std::vector<NodeId> items(old.begin(), old.end());
    for (NodeId& item : items) item = hashable(item);
    return graph_.tuple(std::move(items));
  }

  NodeId convert(NodeId id, int depth) {
    const pickle::NodeView node = graph_[id];  // stays valid: node `id` is not changed here
    switch (node.kind) {
      case Kind::Bytes:
      case Kind::ByteArray: {
        std::vector<NodeId> values;
        for (char c : node.text) values.push_back(graph_.integer(static_cast<unsigned char>(c)));
        return sequence(Kind::List, values, depth);
      }
      case Kind::Tuple: return sequence(Kind::Tuple, node.items, depth);
      case Kind::List:
      case Kind::Set:
      case Kind::FrozenSet: return sequence(Kind::List, node.items, depth);
      case Kind::Dict: return mapping(node.entries, depth);
      case Kind::Global: return graph_.str(fmt::format("{}.{}", node.text, node.name));
      case Kind::Object: return object(id, node, depth);
      default: return graph_.none();
    }
  }

  NodeId object(NodeId id, const pickle::NodeView& node, int depth) {
    std::string name = class_name(graph_, id);
    if (is_qualified_name(name, py::kRebuildTensorV2) || is_qualified_name(name, py::kRebuildParameter)) return id;
    if (is_qualified_name(name, py::kTorchSize)) {
      if (auto dims = as_int_list(graph_, id)) {
        std::vector<NodeId> items;
        for (std::int64_t dim : *dims) items.push_back(graph_.integer(dim));
        return sequence(Kind::Tuple, items, depth);
      }
    }
    if (is_omegaconf_container(name)) {
      NodeId content = graph_.attribute(id, "_content");
      if (content != kNoNode && graph_[content].kind == Kind::Dict)
        return mapping(graph_[content].entries, depth, true);
      if (content != kNoNode && graph_[content].kind == Kind::List)
        return sequence(Kind::List, graph_[content].items, depth, true);
      return graph_.none();  // a config set to None (or missing)
    }
    if (!node.entries.empty()) return mapping(node.entries, depth);  // OrderedDict and other dict subclasses
    if (node.state != kNoNode && graph_[node.state].kind == Kind::Dict)
      return mapping(graph_[node.state].entries, depth);
    // What protocol 2 pickles as a call: set([...]) and frozenset([...]) (a list),
    // bytes as _codecs.encode(text, 'latin1') (the list of byte values), and
    // any other call with arguments only (an Enum member: its value; complex:
    // (real, imag)) as its arguments.
    std::optional<std::span<const NodeId>> args = node.args != kNoNode ? as_sequence(graph_, node.args) : std::nullopt;
    if (args && !args->empty() && node.state == kNoNode && node.items.empty()) {
      std::string_view qualified = name;
      for (std::string_view module : {"builtins.", "__builtin__."}) {
        if (qualified.starts_with(module)) qualified.remove_prefix(module.size());
      }
      if ((qualified == "set" || qualified == "frozenset") && args->size() == 1) {
        if (auto items = as_sequence(graph_, args->front())) {
          return sequence(Kind::List, *items, depth);
        }
      }
      if (name == "_codecs.encode" && graph_[args->front()].kind == Kind::Str) {
        std::vector<NodeId> values;
        std::string text(graph_[args->front()].text);  // UTF-8 of code points below 256
        for (std::size_t i = 0; i < text.size(); ++i) {
          auto byte = static_cast<unsigned char>(text[i]);
          if (byte >= 0xC0 && i + 1 < text.size()) {
            byte = static_cast<unsigned char>(((byte & 0x1F) << 6) | (static_cast<unsigned char>(text[++i]) & 0x3F));
          }
          values.push_back(graph_.integer(byte));
        }
        return sequence(Kind::List, values, depth);
      }
      if (args->size() == 1) return copy(args->front(), depth);
      return sequence(Kind::Tuple, *args, depth);
    }
    return graph_.str(name.empty() ? "<object>" : name);
  }

  Graph& graph_;
  std::unordered_map<NodeId, NodeId> done_;
};

}  // namespace

NodeId plain_value(Graph& graph, NodeId id) {
  return PlainCopier(graph).copy(id, 0);
}

}  // namespace ckpt
