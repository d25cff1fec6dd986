// Reading Python values out of a decoded pickle graph: the configs and metadata
// that training code stores as dicts, argparse.Namespace or OmegaConf objects,
// and a JSON rendering of any subtree for people and manifests.
#pragma once

#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ckpt/format/pickle.hpp"

namespace ckpt {

// "argparse.Namespace" for an object built from that class; "" otherwise.
std::string class_name(const pickle::Graph& graph, pickle::NodeId id);

// The value under `key` in a dict, an OrderedDict, an argparse.Namespace (its
// attributes) or an OmegaConf DictConfig (unwrapping the value node's `_val`).
// kNoNode when absent.
pickle::NodeId config_get(const pickle::Graph& graph, pickle::NodeId container, std::string_view key);
// The same along a path of keys: {"model", "model_parallel_size"}.
pickle::NodeId config_get_path(const pickle::Graph& graph, pickle::NodeId container,
                               const std::vector<std::string_view>& keys);

std::optional<std::int64_t> as_int(const pickle::Graph& graph, pickle::NodeId id);
std::optional<std::string> as_str(const pickle::Graph& graph, pickle::NodeId id);
// A tuple, list or torch.Size of ints.
std::optional<std::vector<std::int64_t>> as_int_list(const pickle::Graph& graph, pickle::NodeId id);
// Elements of a list or tuple; nullptr for anything else.
std::optional<std::span<const pickle::NodeId>> as_sequence(const pickle::Graph& graph, pickle::NodeId id);

// JSON rendering for people and manifests. Scalars map to JSON scalars; lists
// and tuples to arrays; string- or int-keyed mappings (dict, OrderedDict) to
// objects; Namespace and OmegaConf configs to objects of their values tagged with
// "$class"; other objects to {"$class", "args", "state", ...}. A node already
// rendered is shown as {"$ref": "path"} (sharing and cycles). `leaf` may replace
// a node's rendering (tensors); `max_nodes` bounds the output.
using JsonLeaf = std::function<std::optional<nlohmann::ordered_json>(pickle::NodeId)>;
nlohmann::ordered_json to_json(const pickle::Graph& graph, pickle::NodeId id, const JsonLeaf& leaf,
                               std::size_t max_nodes = 100000);

}  // namespace ckpt

namespace ckpt {

// Replaces the int under a path of keys (as config_get_path finds it) with
// `value`, writing a new node so that nothing shared changes. False when the
// path does not lead to an int.
bool config_set_int(pickle::Graph& graph, pickle::NodeId container, const std::vector<std::string_view>& keys,
                    std::int64_t value);

// A copy of the value at `id` built only of what torch.load(weights_only=True)
// accepts: None, bool, int, float, str, tuple, list, dict (and tensors, kept).
// A Namespace or any object with a dict of attributes becomes that dict; an
// OmegaConf config, its content; an OrderedDict, a dict; sets and bytes, lists;
// torch.Size, a tuple; a class reference, its qualified name; any other object,
// the string of its class name. Shared nodes stay shared; a cycle is cut to None.
pickle::NodeId plain_value(pickle::Graph& graph, pickle::NodeId id);

// Every node reachable from `from` (all edges: items, entries, callables,
// arguments, states, persistent ids), in no particular order.
std::vector<pickle::NodeId> reachable(const pickle::Graph& graph, pickle::NodeId from);

// The value at `root` of `from` copied into `to` (another graph: an object
// decoded from one pickle, written in another), every node reachable from it
// once, so sharing and cycles stay; scalars and globals become `to`'s own.
// Returns the copy's id in `to`; `copied`, when given, maps each id of `from`
// to its copy.
pickle::NodeId copy_value(pickle::Graph& to, const pickle::Graph& from, pickle::NodeId root,
                          std::unordered_map<pickle::NodeId, pickle::NodeId>* copied = nullptr);

}  // namespace ckpt
