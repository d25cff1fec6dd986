#include "ckpt/plan/nested_output.hpp"

#include <fmt/format.h>

#include <unordered_map>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/format/dcp.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"

namespace ckpt {

namespace {

// Longest key path, and furthest list index past the items, taken: a deeper
// value could not be pickled (pickle::kMaxDepth), and a longer list would be
// Nones a file that size cannot need.
constexpr std::size_t kMaxPathLength = 256;
constexpr std::int64_t kMaxListPadding = std::int64_t{1} << 20;

using PathElement = KeyPath::value_type;

std::string path_text(const KeyPath& path) {
  constexpr std::size_t kShown = 8;  // elements shown: a message stays one readable line
  std::string text;
  for (std::size_t i = 0; i < path.size(); ++i) {
    if (i == kShown && path.size() > kShown + 1) {
      text += fmt::format("...({} elements)", path.size());
      break;
    }
    const PathElement& element = path[i];
    if (const auto* key = std::get_if<std::string>(&element)) {
      text += fmt::format("['{}']", *key);
    } else {
      text += fmt::format("[{}]", std::get<std::int64_t>(element));
    }
  }
  return text;
}

// The nested state dict as it is built: values are slots, a dict's entries
// and a list's items refer to other slots; a leaf is a node of the builder's
// graph.
class Nest {
 public:
  Nest(const std::string& items_from, std::int64_t max_index)
      : items_from_(items_from), max_index_(max_index), slots_(1) {}

  void put(const NestedItem& item, pickle::NodeId value) {
    if (item.path.empty() || item.path.size() > kMaxPathLength) {
      fail(item, fmt::format("a key path of {} elements", item.path.size()));
    }
    std::size_t at = 0;  // the top level
    for (std::size_t i = 0; i + 1 < item.path.size(); ++i) {
      const bool dict = std::holds_alternative<std::string>(item.path[i + 1]);
      at = child(item, at, item.path[i], dict ? Kind::Dict : Kind::List);
    }
    std::size_t leaf = slots_.size();
    slots_.emplace_back(Kind::Leaf);
    slots_.back().node = value;
    slots_.back().key = item.key;
    set(item, at, item.path.back(), leaf);
  }

  // The top level's entries, each value made a node of `graph`.
  std::vector<std::pair<std::string, pickle::NodeId>> top_level(pickle::Graph& graph) const {
    std::vector<std::pair<std::string, pickle::NodeId>> out;
    for (const auto& [key, slot] : slots_[0].entries) out.emplace_back(key, node(graph, slot));
    return out;
  }

 private:
  enum class Kind : std::uint8_t { Dict, List, Leaf };
  static constexpr std::size_t kNone = SIZE_MAX;  // a list's hole
  struct Slot {
    explicit Slot(Kind kind_ = Kind::Dict) : kind(kind_) {}
    Kind kind;
    std::vector<std::pair<std::string, std::size_t>> entries;  // Dict
    std::unordered_map<std::string, std::size_t> positions;    // Dict: key -> its index in entries
    std::vector<std::size_t> items;                            // List
    pickle::NodeId node = pickle::kNoNode;                     // Leaf
    std::string key;                                           // Leaf: the item it holds
  };

  [[noreturn]] void fail(const NestedItem& item, const std::string& problem) const {
    throw Error(Location{items_from_, item.key, std::nullopt},
                fmt::format("cannot nest it at {}: {}", path_text(item.path), problem));
  }

  // Where `element` of slot `at` refers, made a new `kind` when absent.
  std::size_t child(const NestedItem& item, std::size_t at, const PathElement& element, Kind kind) {
    std::size_t* place = locate(item, at, element);
    if (*place == kNone) {
      *place = slots_.size();
      slots_.emplace_back(kind);
    }
    return *place;
  }

  // (torch's loader would overwrite what is there, losing it: refused instead)
  void set(const NestedItem& item, std::size_t at, const PathElement& element, std::size_t leaf) {
    std::size_t* place = locate(item, at, element);
    if (*place != kNone) {
      fail(item, slots_[*place].kind == Kind::Leaf
                     ? fmt::format("{} is there already (torch's loader would keep one of the two)", slots_[*place].key)
                     : "other keys are nested there (torch's loader would drop them)");
    }
    *place = leaf;
  }

  // The slot index `element` of slot `at` holds (kNone when empty), made a
  // place when absent.
  std::size_t* locate(const NestedItem& item, std::size_t at, const PathElement& element) {
    Slot& slot = slots_[at];
    if (slot.kind == Kind::Leaf) fail(item, fmt::format("{} holds a value there, not a dict or list", slot.key));
    if (slot.kind == Kind::Dict) {
      const auto* key = std::get_if<std::string>(&element);
      if (key == nullptr) fail(item, "an int index into a dict");
      auto [it, added] = slot.positions.try_emplace(*key, slot.entries.size());
      if (added) slot.entries.emplace_back(*key, kNone);
      return &slot.entries[it->second].second;
    }
    const auto* index = std::get_if<std::int64_t>(&element);
    if (index == nullptr) fail(item, "a str key into a list");
    if (*index > max_index_)
      fail(item, fmt::format("list index {} is past what {} items can fill", *index, max_index_));
    if (slot.items.size() <= static_cast<std::size_t>(*index)) slot.items.resize(*index + 1, kNone);
    return &slot.items[*index];
  }

  pickle::NodeId node(pickle::Graph& graph, std::size_t at) const {
    if (at == kNone) return graph.none();
    const Slot& slot = slots_[at];
    switch (slot.kind) {
      case Kind::Leaf: return slot.node;
      case Kind::List: {
        std::vector<pickle::NodeId> items;
        for (std::size_t item : slot.items) items.push_back(node(graph, item));
        return graph.add_items(pickle::Kind::List, items);
      }
      case Kind::Dict: break;
    }
    pickle::Node dict;
    dict.kind = pickle::Kind::Dict;
    for (const auto& [key, value] : slot.entries) dict.entries.emplace_back(graph.str(key), node(graph, value));
    return graph.add(dict);
  }

  const std::string& items_from_;
  std::int64_t max_index_;
  std::vector<Slot> slots_;  // [0]: the top level, a dict
};

}  // namespace

pickle::NodeId add_object_item(CheckpointBuilder& builder, const NestedItem& item,
                               const std::vector<const MappedFile*>& files) {
  const MappedFile& file = *files.at(item.file);
  DcpItemPlace place{file.path(), item.offset, item.length};
  return read_dcp_item(file.bytes(), file.path(), item.key, place, [&](Bytes bytes) {
    Checkpoint object(file, ZipArchive(bytes, file.path()));
    return builder.add_object(object, item.file, item.offset);
  });
}

PlannedFile plan_nested_torch_file(const std::string& path, const std::vector<NamedTensor>& tensors,
                                   const std::vector<NestedItem>& items, const std::string& items_from,
                                   const std::vector<const MappedFile*>& files,
                                   const std::vector<std::uint32_t>& sources, Plan& plan) {
  CheckpointBuilder builder;
  Nest nest(items_from, static_cast<std::int64_t>(items.size()) + kMaxListPadding);
  std::unordered_map<std::string, pickle::NodeId> by_name;  // the tensors written, for a tie to name
  for (const NestedItem& item : items) {
    pickle::NodeId value = pickle::kNoNode;
    if (item.tensor) {
      const NamedTensor& tensor = tensors.at(*item.tensor);
      if (tensor.alias_of) {  // one tensor object under both keys, as torch.save writes a tie
        auto tied = by_name.find(*tensor.alias_of);
        check_invariant(tied != by_name.end(), "a tie before its tensor in a torch output: " + item.key);
        value = tied->second;
      } else {
        value = builder.add_tensor(tensor);
      }
      by_name.emplace(tensor.name, value);
    } else {
      value = add_object_item(builder, item, files);
    }
    nest.put(item, value);
  }
  for (const auto& [key, node] : nest.top_level(builder.graph())) builder.set_top_level(key, node);
  return builder.finish(path, sources, plan);
}

void check_nesting(const std::vector<NestedItem>& items, const std::string& items_from) {
  Nest nest(items_from, static_cast<std::int64_t>(items.size()) + kMaxListPadding);
  for (const NestedItem& item : items) nest.put(item, pickle::kNoNode);
}

}  // namespace ckpt
