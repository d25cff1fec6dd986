#include "ckpt/manifest/optimizer_state.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <optional>
#include <set>

#include "ckpt/manifest/consolidate.hpp"

namespace ckpt {

std::string optimizer_state_path(std::string_view index, std::string_view state_name) {
  return fmt::format("{}/{}/{}/{}", kOptimizerStateKey, kOptimizerStates, index, state_name);
}

std::string optimizer_state_path(std::size_t index, std::string_view state_name) {
  return optimizer_state_path(std::to_string(index), state_name);
}

namespace {

// The parameters of a consolidated file's state dict, in order: its tensors
// but ties, `buffers` and what is_buffer recognises.
std::vector<std::pair<std::string, const StoredTensor*>> parameters(const ManifestFile& file,
                                                                    const std::vector<std::string>& buffers) {
  std::set<std::string_view> buffer_set(buffers.begin(), buffers.end());
  std::vector<std::pair<std::string, const StoredTensor*>> out;
  DistinctViews views;
  for (auto& [key, tensor] : state_dict_tensors(file, std::string(kModelPrefix))) {
    if (tensor->alias_of || views.tied_to(*tensor) != nullptr || buffer_set.count(key) != 0 ||
        is_buffer(key, *tensor, nullptr)) {
      continue;
    }
    out.emplace_back(std::move(key), tensor);
  }
  return out;
}

}  // namespace

std::vector<NamedTensor> consolidate_optimizer_state(const Manifest& manifest, const std::vector<int>& shard_files,
                                                     const std::string& state_name,
                                                     const std::vector<std::string>& buffers) {
  const ManifestFile& first = manifest.files.at(shard_files.at(0));
  if (is_flattened(first, std::string(kModelPrefix))) {
    return unflatten(manifest, shard_files,
                     [&](const FlatParamMeta&, std::size_t index) { return optimizer_state_path(index, state_name); });
  }
  // Every state checked against its parameter first (optimizer_state_names).
  std::vector<std::string> names = optimizer_state_names(first, buffers);
  if (std::find(names.begin(), names.end(), state_name) == names.end()) {
    throw Error(Location{first.path, std::string(kOptimizerStateKey), std::nullopt},
                fmt::format("no optimizer state '{}' here (the states hold: {})", state_name, fmt::join(names, ", ")));
  }
  std::vector<std::pair<std::string, const StoredTensor*>> params = parameters(first, buffers);
  std::vector<NamedTensor> out;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const StoredTensor* state = find_tensor(first, optimizer_state_path(i, state_name));
    check_invariant(state != nullptr, "a state optimizer_state_names has checked");
    out.push_back(
        {params[i].first, source_of(*state, first, static_cast<std::uint32_t>(shard_files[0])), std::nullopt, {}});
  }
  return out;
}

namespace {

bool is_tensor_node(const nlohmann::ordered_json& value) {
  return value.is_object() && value.contains("$tensor");
}

// "12" -> 12; nullopt for anything but plain decimal digits.
std::optional<std::size_t> index_label(const std::string& label) {
  std::size_t value = 0;
  if (label.empty() || label.size() > 18 || (label.size() > 1 && label[0] == '0')) return std::nullopt;
  for (char c : label) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + static_cast<std::size_t>(c - '0');
  }
  return value;
}

}  // namespace

std::vector<std::string> optimizer_state_names(const ManifestFile& file, const std::vector<std::string>& buffers) {
  const nlohmann::ordered_json& root = *file.objects;
  const std::string prefix = std::string(kOptimizerStateKey) + "/";
  bool has_tensors = std::any_of(file.tensors.begin(), file.tensors.end(),
                                 [&](const StoredTensor& tensor) { return tensor.path.starts_with(prefix); });
  const nlohmann::ordered_json* frame =
      root.is_object() && root.contains(kOptimizerStateKey) ? &root[std::string(kOptimizerStateKey)] : nullptr;
  const nlohmann::ordered_json* states =
      frame != nullptr && frame->is_object() && frame->contains("state") ? &(*frame)["state"] : nullptr;
  if (!has_tensors) return {};
  auto fail = [&](const std::string& where, const std::string& message,
                  std::optional<std::uint64_t> offset = std::nullopt) {
    return Error(Location{file.path, std::string(kOptimizerStateKey) + where, offset},
                 message +
                     ": this optimizer state cannot be cut with its weights (stitch without --optimizer-state, or "
                     "reshard --drop-optimizer-state, leaves it out)");
  };
  if (states == nullptr || !states->is_object()) throw fail("", "tensors, but no per-parameter 'state' dict");

  // What state k belongs to: flat parameter k (FSDP), or the k-th parameter.
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> owners;
  bool flat = is_flattened(file, std::string(kModelPrefix));
  if (flat) {
    for (const FsdpInstanceMeta& instance : file.fsdp->instances) {
      for (const FlatParamMeta& param : instance.flat_params) {
        const StoredTensor* tensor = find_tensor(file, state_dict_path(kModelPrefix, param.state_key));
        if (tensor == nullptr) throw fail("", fmt::format("flat parameter {} is not in the model", param.state_key));
        owners.emplace_back(param.state_key, tensor->shape);
      }
    }
  } else {
    for (const auto& [key, tensor] : parameters(file, buffers)) owners.emplace_back(key, tensor->shape);
  }
  const char* owner_kind = flat ? "flat parameter" : "parameter";
  const nlohmann::ordered_json* groups = frame->contains("param_groups") ? &(*frame)["param_groups"] : nullptr;
  if (!flat && groups != nullptr && groups->is_array() && groups->size() > 1) {
    throw fail("/param_groups", fmt::format("{} param groups: torch numbers the states group by group, so which "
                                            "parameter each state belongs to is not recorded (one group can be cut)",
                                            groups->size()));
  }

  auto tensor_names = [](const nlohmann::ordered_json& state) {
    std::vector<std::string> held;
    for (const auto& [name, value] : state.items()) {
      if (is_tensor_node(value) && name != "step") held.push_back(name);
    }
    return held;
  };
  // The tensors of state 0, but step: every state holds these.
  std::vector<std::string> names;
  if (states->contains("0") && (*states)["0"].is_object()) names = tensor_names((*states)["0"]);
  std::vector<bool> seen(owners.size(), false);
  for (const auto& [label, state] : states->items()) {
    std::string where = "/state/" + label;
    std::optional<std::size_t> k = index_label(label);
    if (!k) throw fail(where, fmt::format("keyed by '{}', not by the index of a {}", label, owner_kind));
    if (*k >= owners.size()) {
      throw fail(where, fmt::format("state {}, but there are {} {}s", *k, owners.size(), owner_kind));
    }
    if (!state.is_object()) throw fail(where, "not a dict");
    seen[*k] = true;
    std::vector<std::string> held = tensor_names(state);
    if (std::set<std::string>(held.begin(), held.end()) != std::set<std::string>(names.begin(), names.end())) {
      throw fail(where, fmt::format("holds [{}], state 0 holds [{}]", fmt::join(held, ", "), fmt::join(names, ", ")));
    }
    for (const std::string& name : held) {
      std::string path = optimizer_state_path(label, name);
      const StoredTensor* tensor = find_tensor(file, path);
      const auto& [owner, shape] = owners[*k];
      if (tensor == nullptr || tensor->alias_of) throw fail(where + "/" + name, "not a tensor of its own");
      if (tensor->shape != shape) {
        throw fail(where + "/" + name,
                   fmt::format("shape [{}], but {} {} ({}) has [{}]: not this model's optimizer state",
                               fmt::join(tensor->shape, ", "), owner_kind, *k, owner, fmt::join(shape, ", ")),
                   file.place(*tensor).file_byte_offset);
      }
    }
  }
  for (std::size_t k = 0; k < owners.size(); ++k) {
    if (!seen[k]) {
      throw fail(fmt::format("/state/{}", k),
                 fmt::format("missing: the state of {} {} ({})", owner_kind, k, owners[k].first));
    }
  }
  // torch gives state ids in param_groups' order: they must be 0..K-1 in order.
  if (groups != nullptr && groups->is_array()) {
    std::size_t next = 0;
    for (const nlohmann::ordered_json& group : *groups) {
      if (!group.is_object() || !group.contains("params") || !group["params"].is_array()) continue;
      for (const nlohmann::ordered_json& id : group["params"]) {
        if (!id.is_number_integer() || id.get<std::int64_t>() != static_cast<std::int64_t>(next)) {
          throw fail("/param_groups", fmt::format("lists the states in another order than the {}s (at position {}: {})",
                                                  owner_kind, next, id.dump()));
        }
        ++next;
      }
    }
  }
  return names;
}

namespace {

// What every optimizer state of one save shares: the entries of a state but its
// tensors (step, ...), and param_groups without their params. Throws Error
// naming the state that differs from state 0 in `file`.
nlohmann::ordered_json optimizer_entries(const ManifestFile& file) {
  const nlohmann::ordered_json& frame = (*file.objects)[std::string(kOptimizerStateKey)];
  std::optional<std::pair<std::string, nlohmann::ordered_json>> first;
  for (const auto& [label, state] : frame["state"].items()) {
    nlohmann::ordered_json entries = nlohmann::ordered_json::object();
    for (const auto& [name, value] : state.items()) {
      if (!is_tensor_node(value)) entries[name] = value;
    }
    if (!first) {
      first.emplace(label, std::move(entries));
    } else if (entries != first->second) {
      throw Error(
          Location{file.path, fmt::format("{}/{}/{}", kOptimizerStateKey, kOptimizerStates, label), std::nullopt},
          fmt::format("{} here, {} in state {}: the states of one save agree on these", entries.dump(),
                      first->second.dump(), first->first));
    }
  }
  return {{"state", first ? first->second : nullptr}, {"param_groups", optimizer_hyperparameters(file)}};
}

}  // namespace

nlohmann::ordered_json optimizer_hyperparameters(const ManifestFile& file) {
  const nlohmann::ordered_json& root = *file.objects;
  if (!root.is_object() || !root.contains(kOptimizerStateKey)) return nullptr;
  const nlohmann::ordered_json& frame = root[std::string(kOptimizerStateKey)];
  if (!frame.is_object() || !frame.contains("param_groups") || !frame["param_groups"].is_array()) return nullptr;
  nlohmann::ordered_json groups = frame["param_groups"];
  for (nlohmann::ordered_json& group : groups) {
    if (group.is_object()) group.erase("params");
  }
  return groups;
}

void check_optimizer_states(const Manifest& manifest, const std::vector<std::vector<int>>& grid,
                            const std::vector<std::string>& names, const std::vector<std::string>& buffers) {
  const std::set<std::string> want(names.begin(), names.end());
  std::optional<std::pair<std::string, nlohmann::ordered_json>> first;  // (file, its step and hyperparameters)
  for (const std::vector<int>& row : grid) {
    for (int index : row) {
      const ManifestFile& file = manifest.files[static_cast<std::size_t>(index)];
      std::vector<std::string> held = optimizer_state_names(file, buffers);
      if (std::set<std::string>(held.begin(), held.end()) != want) {
        throw Error(Location{file.path, std::string(kOptimizerStateKey), std::nullopt},
                    fmt::format("optimizer states [{}], where the set's first file holds [{}]", fmt::join(held, ", "),
                                fmt::join(names, ", ")));
      }
      if (names.empty()) continue;
      nlohmann::ordered_json entries = optimizer_entries(file);
      if (!first) {
        first.emplace(file.path, std::move(entries));
      } else if (entries != first->second) {
        throw Error(Location{file.path, std::string(kOptimizerStateKey), std::nullopt},
                    fmt::format("{} here, {} in {}: the optimizer states of one save agree on these", entries.dump(),
                                first->second.dump(), first->first));
      }
    }
  }
}

}  // namespace ckpt
