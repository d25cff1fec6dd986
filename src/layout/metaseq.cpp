#include "ckpt/layout/metaseq.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <regex>

#include "ckpt/format/pyobject.hpp"

namespace ckpt {

std::string fsdp_key(const std::string& fsdp_path, const std::string& name) {
  return fsdp_path.empty() ? name : fsdp_path + "." + name;
}

using pickle::kNoNode;
using pickle::NodeId;

FileRole parse_file_role(std::string_view path) {
  std::string name = std::filesystem::path(std::string(path)).filename().string();
  static const std::regex part_re(R"((?:^|[-_.])model_part-(\d+)(?=[-_.]|$))");
  static const std::regex shard_re(R"((?:^|[-_.])shard(\d+)(?=[-_.]|$))");
  FileRole role;
  std::smatch match;
  if (std::regex_search(name, match, part_re) && match[1].length() < 9) role.mp_part = std::stoi(match[1]);
  if (std::regex_search(name, match, shard_re) && match[1].length() < 9) role.dp_shard = std::stoi(match[1]);
  return role;
}

std::int64_t FlatParamMeta::total_numel() const {
  std::int64_t total = 0;
  for (std::int64_t n : numels) total += n;
  return total;
}

std::optional<FlatParamProblem> flat_param_problem(const FlatParamMeta& flat) {
  if (flat.names.size() != flat.shapes.size() || flat.names.size() != flat.numels.size()) {
    return FlatParamProblem{"", std::nullopt, "names, shapes and numels have different lengths"};
  }
  std::int64_t total = 0;
  for (std::size_t i = 0; i < flat.numels.size(); ++i) {
    if (flat.numels[i] < 0) return FlatParamProblem{"numels", i, "negative numel"};
    if (__builtin_add_overflow(total, flat.numels[i], &total))
      return FlatParamProblem{"numels", i, "numels overflow 64 bits"};
  }
  for (std::size_t i = 0; i < flat.shapes.size(); ++i) {
    std::int64_t product = 1;
    for (std::int64_t d : flat.shapes[i]) {
      if (d < 0 || __builtin_mul_overflow(product, d, &product)) return FlatParamProblem{"shapes", i, "invalid shape"};
    }
    if (product != flat.numels[i]) {
      return FlatParamProblem{
          "numels", i,
          fmt::format("{}: shape has {} elements but numel says {}", flat.names[i], product, flat.numels[i])};
    }
  }
  if (flat.padding < 0) return FlatParamProblem{"padding", std::nullopt, "negative padding"};
  return std::nullopt;
}

FsdpChunk fsdp_chunk(std::int64_t numel, int world_size, int rank) {
  if (numel < 0 || world_size <= 0 || rank < 0 || rank >= world_size) {
    throw Error(fmt::format("invalid FSDP chunk request: {} elements, rank {} of {}", numel, rank, world_size));
  }
  // 128-bit intermediates: numel comes from untrusted metadata and may be huge.
  __extension__ typedef __int128 Wide;
  Wide chunk = (Wide{numel} + world_size - 1) / world_size;
  Wide begin = std::min<Wide>(Wide{rank} * chunk, numel);
  Wide held = std::max<Wide>(0, std::min<Wide>(chunk, Wide{numel} - begin));
  FsdpChunk out;
  out.begin = static_cast<std::int64_t>(begin);
  out.numel = static_cast<std::int64_t>(held);
  out.padding = static_cast<std::int64_t>(chunk - held);
  return out;
}

namespace {

class MetadataReader {
 public:
  MetadataReader(const Checkpoint& checkpoint) : graph_(checkpoint.graph()), checkpoint_(checkpoint) {}

  [[noreturn]] void fail(const std::string& field, const std::string& message) const {
    throw Error(Location{checkpoint_.path(), checkpoint_.pickle_record().name + " (" + field + ")", std::nullopt},
                "shard_metadata: " + message);
  }
  std::string text(NodeId id, const std::string& field) const {
    auto value = as_str(graph_, id);
    if (!value) fail(field, "expected a string");
    return *value;
  }
  std::int64_t integer(NodeId id, const std::string& field) const {
    auto value = as_int(graph_, id);
    if (!value) fail(field, "expected an integer");
    return *value;
  }
  std::span<const NodeId> sequence(NodeId id, const std::string& field) const {
    auto items = as_sequence(graph_, id);
    if (!items) fail(field, "expected a list");
    return *items;
  }

  FsdpMetadata read(NodeId metadata) {
    FsdpMetadata out;
    NodeId params = config_get(graph_, metadata, "param_metadata");
    std::span<const NodeId> instances = sequence(params, "param_metadata");
    for (std::size_t i = 0; i < instances.size(); ++i) {
      out.instances.push_back(read_instance(instances[i], fmt::format("param_metadata/{}", i)));
    }
    NodeId buffers = config_get(graph_, metadata, "buffer_names");
    if (buffers != kNoNode) {
      for (NodeId name : sequence(buffers, "buffer_names")) out.buffer_names.push_back(text(name, "buffer_names"));
    }
    return out;
  }

 private:
  FsdpInstanceMeta read_instance(NodeId node, const std::string& field) {
    FsdpInstanceMeta instance;
    instance.fsdp_path = text(config_get(graph_, node, "fsdp_path"), field + "/fsdp_path");
    NodeId no_broadcast = config_get(graph_, node, "no_broadcast_optim_state");
    if (no_broadcast != kNoNode && graph_[no_broadcast].kind == pickle::Kind::Bool) {
      instance.no_broadcast_optim_state = graph_[no_broadcast].boolean;
    }
    NodeId shared = config_get(graph_, node, "shared_param_info");
    if (shared != kNoNode) {
      for (NodeId pair : sequence(shared, field + "/shared_param_info")) {
        std::span<const NodeId> items = sequence(pair, field + "/shared_param_info");
        if (items.size() != 2) fail(field + "/shared_param_info", "expected (src, dst) pairs");
        instance.shared_param_info.emplace_back(text(items[0], field), text(items[1], field));
      }
    }
    NodeId params = config_get(graph_, node, "params");
    if (!graph_.is_mapping(params)) fail(field + "/params", "expected a dict");
    for (const auto& [key, value] : graph_.mapping_entries(params)) {
      FlatParamMeta flat;
      flat.name = text(key, field + "/params");
      std::string where = field + "/params/" + flat.name;
      flat.state_key = fsdp_key(instance.fsdp_path, flat.name);
      for (NodeId name : sequence(config_get(graph_, value, "names"), where + "/names")) {
        flat.names.push_back(text(name, where + "/names"));
      }
      for (NodeId shape : sequence(config_get(graph_, value, "shapes"), where + "/shapes")) {
        auto dims = as_int_list(graph_, shape);
        if (!dims) fail(where + "/shapes", "expected torch.Size values");
        flat.shapes.push_back(*dims);
      }
      for (NodeId numel : sequence(config_get(graph_, value, "numels"), where + "/numels")) {
        flat.numels.push_back(integer(numel, where + "/numels"));
      }
      flat.padding = integer(config_get(graph_, value, "padding"), where + "/padding");
      if (auto problem = flat_param_problem(flat)) {
        fail(problem->field.empty() ? where : where + "/" + problem->field, problem->message);
      }
      instance.flat_params.push_back(std::move(flat));
    }
    return instance;
  }

  const pickle::Graph& graph_;
  const Checkpoint& checkpoint_;
};

}  // namespace

std::optional<FsdpMetadata> read_fsdp_metadata(const Checkpoint& checkpoint) {
  NodeId metadata = config_get(checkpoint.graph(), checkpoint.graph().root, "shard_metadata");
  if (metadata == kNoNode || checkpoint.graph()[metadata].kind == pickle::Kind::None) return std::nullopt;
  return MetadataReader(checkpoint).read(metadata);
}

std::optional<DeclaredParts> declared_model_parallel_size(const Checkpoint& checkpoint) {
  const pickle::Graph& graph = checkpoint.graph();
  for (const auto& keys : kModelParallelSizeKeys) {
    NodeId top = config_get(graph, graph.root, keys.front());
    if (top == kNoNode) continue;
    NodeId value = config_get_path(graph, top, {keys.begin() + 1, keys.end()});
    if (value == kNoNode) continue;
    if (auto parts = as_int(graph, value)) {
      return DeclaredParts{*parts, fmt::format("{}", fmt::join(keys, "."))};
    }
  }
  return std::nullopt;
}

}  // namespace ckpt
