#include "ckpt/plan/synth.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <tuple>

#include "ckpt/layout/fsdp.hpp"
#include "ckpt/manifest/optimizer_state.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"

namespace ckpt {

using pickle::NodeId;

namespace {

// OPT's heads are 64 wide (128 at 175B): as many as that gives, divisible by the
// part count (Megatron gives each part whole heads) and dividing the width.
std::int64_t attention_heads(const SynthModel& model, int parts) {
  for (std::int64_t heads = std::max<std::int64_t>(model.embed_dim / 64, parts); heads > parts; --heads) {
    if (model.embed_dim % heads == 0 && heads % parts == 0) return heads;
  }
  return parts;
}

pickle::NodeId real(pickle::Graph& graph, double value) {
  pickle::Node node;
  node.kind = pickle::Kind::Float;
  node.real = value;
  return graph.add(std::move(node));
}

std::int64_t round_up(std::int64_t value, std::int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Small builders for plain Python values.
struct Values {
  pickle::Graph& graph;

  NodeId real(double value) {
    pickle::Node node;
    node.kind = pickle::Kind::Float;
    node.real = value;
    return graph.add(std::move(node));
  }
  NodeId dict(std::vector<std::pair<std::string, NodeId>> entries) {
    pickle::Node node;
    node.kind = pickle::Kind::Dict;
    for (auto& [key, value] : entries) node.entries.emplace_back(graph.str(key), value);
    return graph.add(std::move(node));
  }
  NodeId int_dict(std::vector<std::pair<std::int64_t, NodeId>> entries) {
    pickle::Node node;
    node.kind = pickle::Kind::Dict;
    for (auto& [key, value] : entries) node.entries.emplace_back(graph.integer(key), value);
    return graph.add(std::move(node));
  }
  NodeId strings(const std::vector<std::string>& values) {
    std::vector<NodeId> items;
    for (const std::string& value : values) items.push_back(graph.str(value));
    return add_list(graph, std::move(items));
  }
};

// One model part's parameters, named as metaseq names them, each a slice of
// the synthetic stream. Replicated parameters take the same stream range in
// every part, so the parts agree on them as real training keeps them.
struct PartParams {
  std::vector<NamedTensor> params;
  FsdpMetadata layout;
};

PartParams part_params(const SynthModel& model, int mp, int part, DType dtype, std::uint64_t stream_base) {
  const std::int64_t E = model.embed_dim;
  std::map<std::string, std::uint64_t> replicated_offsets;
  std::uint64_t next = stream_base;
  auto tensor = [&](std::vector<std::int64_t> shape, bool sharded, const std::string& key) {
    TensorSource source;
    source.dtype = dtype;
    source.shape = std::move(shape);
    Piece piece;
    piece.source = Piece::kSynthetic;
    piece.nbytes = source.nbytes();
    std::uint64_t stride = (source.nbytes() + 4095) / 4096 * 4096;
    if (sharded) {
      piece.source_offset = next + static_cast<std::uint64_t>(part) * stride;
      next += static_cast<std::uint64_t>(mp) * stride;
    } else {
      auto [it, inserted] = replicated_offsets.try_emplace(key, next);
      if (inserted) next += stride;
      piece.source_offset = it->second;
    }
    if (piece.nbytes > 0) source.pieces.push_back(piece);
    return source;
  };
  PartParams out;
  FsdpInstanceMeta root;
  root.fsdp_path = "";
  root.shared_param_info = {{"decoder.embed_tokens.weight", "decoder.output_projection.weight"}};
  FlatParamMeta root_flat;
  root_flat.name = "flat_param_0";
  root_flat.state_key = "flat_param_0";
  auto add = [&](FlatParamMeta& flat, const std::string& prefix, const std::string& name,
                 std::vector<std::int64_t> shape, bool sharded) {
    std::string key = fsdp_key(prefix, name);
    out.params.push_back({key, tensor(std::move(shape), sharded, key), std::nullopt});
    flat.names.push_back(name);
  };
  add(root_flat, "", "decoder.embed_tokens.weight", {model.vocab / mp, E}, true);
  add(root_flat, "", "decoder.embed_positions.weight", {model.positions, E}, false);
  add(root_flat, "", "decoder.layer_norm.weight", {E}, false);
  add(root_flat, "", "decoder.layer_norm.bias", {E}, false);
  root.flat_params.push_back(root_flat);
  out.layout.instances.push_back(root);
  for (std::int64_t i = 0; i < model.layers; ++i) {
    FsdpInstanceMeta layer;
    layer.fsdp_path = fmt::format("decoder.layers.{}", i);
    FlatParamMeta flat;
    flat.name = "flat_param_0";
    flat.state_key = layer.fsdp_path + ".flat_param_0";
    const std::string& p = layer.fsdp_path;
    add(flat, p, "self_attn.qkv_proj.weight", {3 * E / mp, E}, true);
    add(flat, p, "self_attn.qkv_proj.bias", {3 * E / mp}, true);
    add(flat, p, "self_attn.out_proj.weight", {E, E / mp}, true);
    add(flat, p, "self_attn.out_proj.bias", {E}, false);
    add(flat, p, "self_attn_layer_norm.weight", {E}, false);
    add(flat, p, "self_attn_layer_norm.bias", {E}, false);
    add(flat, p, "fc1.weight", {model.ffn_dim / mp, E}, true);
    add(flat, p, "fc1.bias", {model.ffn_dim / mp}, true);
    add(flat, p, "fc2.weight", {E, model.ffn_dim / mp}, true);
    add(flat, p, "fc2.bias", {E}, false);
    add(flat, p, "final_layer_norm.weight", {E}, false);
    add(flat, p, "final_layer_norm.bias", {E}, false);
    layer.flat_params.push_back(flat);
    out.layout.instances.push_back(layer);
  }
  out.layout.buffer_names = {"decoder.version"};
  return out;
}

std::vector<NamedTensor> retyped(const std::vector<NamedTensor>& params, DType dtype, std::uint64_t stream_base) {
  std::vector<NamedTensor> out = params;
  std::uint64_t next = stream_base;
  for (NamedTensor& param : out) {
    param.source.dtype = dtype;
    for (Piece& piece : param.source.pieces) {
      piece.nbytes = param.source.nbytes();
      piece.source_offset = next;
      next += (piece.nbytes + 4095) / 4096 * 4096;
    }
  }
  return out;
}

}  // namespace

SynthModel synth_model(const SynthOptions& options) {
  SynthModel model{};
  int mp = options.mp;
  model.vocab = options.vocab != 0 ? options.vocab : round_up(50272, 8 * mp);
  model.positions = options.positions;
  double target = std::max(options.params, 1e3);
  model.layers =
      options.layers != 0 ? options.layers : std::clamp<std::int64_t>(std::llround(std::sqrt(target) / 1400.0), 2, 96);
  if (options.embed_dim != 0) {
    model.embed_dim = options.embed_dim;
  } else {
    // 12 L E^2 + (V + P) E = params, E a multiple of 64 x mp
    double a = 12.0 * static_cast<double>(model.layers);
    double b = static_cast<double>(model.vocab + model.positions);
    double e = (-b + std::sqrt(b * b + 4.0 * a * target)) / (2.0 * a);
    model.embed_dim = std::max<std::int64_t>(64 * mp, std::llround(e / (64.0 * mp)) * 64 * mp);
  }
  model.ffn_dim = options.ffn_dim != 0 ? options.ffn_dim : 4 * model.embed_dim;
  for (auto [value, what] :
       {std::pair{model.vocab, "vocab"}, {model.embed_dim, "embed_dim"}, {model.ffn_dim, "ffn_dim"}}) {
    if (value % mp != 0) throw Error(fmt::format("synth: {} {} is not divisible by --mp {}", what, value, mp));
  }
  for (auto [value, what, max] : {std::tuple{model.layers, "layers", kSynthMaxLayers},
                                  {model.embed_dim, "embed_dim", kSynthMaxDim},
                                  {model.ffn_dim, "ffn_dim", kSynthMaxDim},
                                  {model.vocab, "vocab", kSynthMaxDim},
                                  {model.positions, "positions", kSynthMaxDim}}) {
    if (value < 1 || value > max) throw Error(fmt::format("synth: {} {} is not in [1, {}]", what, value, max));
  }
  const std::uint64_t E = static_cast<std::uint64_t>(model.embed_dim);
  const std::uint64_t F = static_cast<std::uint64_t>(model.ffn_dim);
  // layers x (4 E^2 + 2 E F + 9 E + F) + (vocab + positions) E + 2 E, checked
  const char* what = "synth: parameter count";
  std::uint64_t per_layer =
      checked_add(checked_mul(4, checked_mul(E, E, what), what), checked_mul(2, checked_mul(E, F, what), what), what);
  per_layer = checked_add(per_layer, checked_add(checked_mul(9, E, what), F, what), what);
  std::uint64_t total = checked_mul(static_cast<std::uint64_t>(model.layers), per_layer, what);
  total = checked_add(total, checked_mul(static_cast<std::uint64_t>(model.vocab + model.positions), E, what), what);
  model.parameters = checked_add(total, 2 * E, what);
  if (static_cast<double>(model.parameters) > kSynthMaxParameters) {
    throw Error(fmt::format("synth: the model would have {} parameters, more than the {:g} synth writes",
                            model.parameters, kSynthMaxParameters));
  }
  return model;
}

Plan plan_synth(const SynthOptions& options, const std::string& directory) {
  if (options.mp < 1 || options.dp < 1) throw Error("synth: --mp and --dp must be at least 1");
  SynthModel model = synth_model(options);
  Plan plan;
  const std::vector<std::uint32_t> no_sources;
  std::vector<std::byte> version(4);
  const float three = 3.0f;
  std::memcpy(version.data(), &three, 4);
  for (int m = 0; m < options.mp; ++m) {
    PartParams part = part_params(model, options.mp, m, options.dtype, 0);
    std::vector<NamedTensor> exp_avg = retyped(part.params, DType::Float32, 1ull << 50);
    std::vector<NamedTensor> exp_avg_sq = retyped(part.params, DType::Float32, 1ull << 51);
    for (int d = 0; d < options.dp; ++d) {
      CheckpointBuilder builder;
      pickle::Graph& graph = builder.graph();
      Values v{graph};
      std::vector<FlatShard> flats = flatten_fsdp(part.layout, part.params, options.dp, d);

      NodeId cfg =
          v.dict({{"model", v.dict({{"_name", graph.str("transformer_lm_megatron")},
                                    {"decoder_layers", graph.integer(model.layers)},
                                    {"decoder_embed_dim", graph.integer(model.embed_dim)},
                                    {"decoder_ffn_embed_dim", graph.integer(model.ffn_dim)},
                                    {"decoder_attention_heads", graph.integer(attention_heads(model, options.mp))},
                                    {"activation_fn", graph.str("relu")},
                                    {"dropout", real(graph, 0.1)},
                                    {"attention_dropout", real(graph, 0.0)},
                                    {"max_target_positions", graph.integer(model.positions - 2)},
                                    {"model_parallel_size", graph.integer(options.mp)}})},
                  {"distributed_training", v.dict({{"distributed_world_size", graph.integer(options.mp * options.dp)},
                                                   {"ddp_backend", graph.str("fully_sharded")}})}});
      builder.set_top_level("cfg", cfg);
      NodeId state_dict = add_ordered_dict(graph);
      for (std::size_t k = 0; k < flats.size(); ++k) {
        NodeId key = graph.str(flats[k].state_key);
        NodeId value = builder.add_tensor({flats[k].state_key, options.dtype, flats[k].source, std::nullopt});
        graph.append_entry(state_dict, key, value);
        if (k == 0) {  // the root's buffers follow its flat parameter, as in module order
          NodeId buffer_key = graph.str("decoder.version");
          NodeId buffer = builder.add_inline_tensor(DType::Float32, {1}, version);
          graph.append_entry(state_dict, buffer_key, buffer);
        }
      }
      builder.set_top_level("model", state_dict);
      builder.set_top_level("criterion", graph.none());
      builder.set_top_level(
          "optimizer_history",
          add_list(graph, {v.dict({{"criterion_name", graph.str("VocabParallelCrossEntropyCriterion")},
                                   {"optimizer_name", graph.str("MemoryEfficientFP16Optimizer")},
                                   {"num_updates", graph.integer(1000)}})}));
      builder.set_top_level(
          "extra_state", v.dict({{"train_iterator",
                                  v.dict({{"epoch", graph.integer(1)}, {"iterations_in_epoch", graph.integer(1000)}})},
                                 {"val_loss", v.real(3.25)}}));
      if (options.optimizer_state) {
        std::vector<FlatShard> avg = flatten_fsdp(part.layout, exp_avg, options.dp, d);
        std::vector<FlatShard> avg_sq = flatten_fsdp(part.layout, exp_avg_sq, options.dp, d);
        std::vector<std::pair<std::int64_t, NodeId>> states;
        std::vector<NodeId> indices;
        for (std::size_t k = 0; k < flats.size(); ++k) {
          states.emplace_back(
              static_cast<std::int64_t>(k),
              v.dict({{"step", graph.integer(1000)},
                      {"exp_avg", builder.add_tensor({"exp_avg", DType::Float32, avg[k].source, std::nullopt})},
                      {"exp_avg_sq",
                       builder.add_tensor({"exp_avg_sq", DType::Float32, avg_sq[k].source, std::nullopt})}}));
          indices.push_back(graph.integer(static_cast<std::int64_t>(k)));
        }
        NodeId group = v.dict({{"lr", v.real(3e-4)},
                               {"betas", graph.tuple({v.real(0.9), v.real(0.98)})},
                               {"eps", v.real(1e-8)},
                               {"weight_decay", v.real(0.1)},
                               {"params", add_list(graph, std::move(indices))}});
        builder.set_top_level(std::string(kOptimizerStateKey), v.dict({{"state", v.int_dict(std::move(states))},
                                                                       {"param_groups", add_list(graph, {group})},
                                                                       {"loss_scale", v.real(128.0)}}));
      }
      // shard_metadata, as fairscale writes it for this rank.
      std::vector<NodeId> instances;
      for (std::size_t i = 0; i < part.layout.instances.size(); ++i) {
        const FsdpInstanceMeta& instance = part.layout.instances[i];
        const FlatShard& flat = flats[i];
        std::vector<NodeId> shapes;
        for (const auto& shape : flat.shapes) shapes.push_back(add_torch_size(graph, shape));
        std::vector<NodeId> shared;
        for (const auto& [src, dst] : instance.shared_param_info)
          shared.push_back(graph.tuple({graph.str(src), graph.str(dst)}));
        instances.push_back(
            v.dict({{"fsdp_path", graph.str(instance.fsdp_path)},
                    {"params", v.dict({{"flat_param_0", v.dict({{"names", v.strings(instance.flat_params[0].names)},
                                                                {"shapes", add_list(graph, std::move(shapes))},
                                                                {"numels", add_int_list(graph, flat.numels)},
                                                                {"padding", graph.integer(flat.padding)}})}})},
                    {"no_broadcast_optim_state", graph.boolean(false)},
                    {"shared_param_info", add_list(graph, std::move(shared))}}));
      }
      builder.set_top_level("shard_metadata", v.dict({{"param_metadata", add_list(graph, std::move(instances))},
                                                      {"buffer_names", v.strings(part.layout.buffer_names)}}));
      std::string path =
          (std::filesystem::path(directory) / fmt::format("checkpoint_last-model_part-{}-shard{}.pt", m, d)).string();
      plan.files.push_back(builder.finish(path, no_sources, plan));
    }
  }
  return plan;
}

}  // namespace ckpt
