// A Hugging Face OPT folder: transformers' names (layout/hf_opt.hpp) as
// safetensors files, and config.json from the shapes and metaseq's cfg.
#include "ckpt/plan/hf_folder.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <regex>

#include "ckpt/format/pyobject.hpp"
#include "ckpt/format/safetensors.hpp"
#include "ckpt/layout/hf_opt.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/output_formats.hpp"
#include "ckpt/plan/stitch.hpp"

namespace ckpt {

using json = nlohmann::ordered_json;

namespace {

const NamedTensor* find_output(const std::vector<NamedTensor>& tensors, std::string_view name) {
  for (const NamedTensor& tensor : tensors) {
    if (tensor.name == name) return &tensor;
  }
  return nullptr;
}

// The cfg node that holds the model's hyperparameters: cfg.model, else args.
pickle::NodeId model_config(const Checkpoint& base) {
  const pickle::Graph& graph = base.graph();
  pickle::NodeId model = config_get_path(graph, graph.root, {"cfg", "model"});
  if (model != pickle::kNoNode && graph[model].kind != pickle::Kind::None) return model;
  return config_get(graph, graph.root, "args");
}

}  // namespace

json hf_opt_config(const std::vector<NamedTensor>& tensors, bool tied_embeddings, const Checkpoint& base,
                   const std::vector<std::pair<std::string, json>>& overrides) {
  auto shape_of = [&](std::string_view name) -> const std::vector<std::int64_t>& {
    const NamedTensor* tensor = find_output(tensors, name);
    if (tensor == nullptr || tensor->source.shape.size() != 2) {
      throw Error(Location{base.path(), std::string(name), std::nullopt},
                  "config.json needs this tensor (2-D), and the state dict has none");
    }
    return tensor->source.shape;
  };
  const auto& embed = shape_of("model.decoder.embed_tokens.weight");
  const auto& positions = shape_of("model.decoder.embed_positions.weight");
  const auto& fc1 = shape_of("model.decoder.layers.0.fc1.weight");
  if (positions[0] < 2) {
    throw Error(Location{base.path(), "model.decoder.embed_positions.weight", std::nullopt},
                fmt::format("{} rows: OPT's learned positions have 2 more rows than positions", positions[0]));
  }
  std::int64_t layers = 0;
  static const std::regex layer(R"(model\.decoder\.layers\.(\d+)\..*)");
  for (const NamedTensor& tensor : tensors) {
    std::smatch match;
    if (std::regex_match(tensor.name, match, layer) && match[1].length() < 9) {
      layers = std::max<std::int64_t>(layers, std::stoll(match[1]) + 1);
    }
  }

  const pickle::Graph& graph = base.graph();
  pickle::NodeId model = model_config(base);
  std::map<std::string, json, std::less<>> given(overrides.begin(), overrides.end());
  // A value of the cfg's model section, or of --hf-config; nullopt when neither has it.
  auto from_cfg = [&](const std::string& field, std::string_view cfg_key) -> std::optional<json> {
    if (auto it = given.find(field); it != given.end()) return it->second;
    if (model == pickle::kNoNode) return std::nullopt;
    pickle::NodeId node = config_get(graph, model, cfg_key);
    if (node == pickle::kNoNode) return std::nullopt;
    return to_json(graph, node, {});
  };
  std::vector<std::string> missing;  // every field cfg lacks, told at once
  auto required = [&](const std::string& field, std::string_view cfg_key) {
    std::optional<json> value = from_cfg(field, cfg_key);
    if (!value) missing.push_back(fmt::format("{} (cfg.model.{})", field, cfg_key));
    return value.value_or(json());
  };
  // A size from the shapes, checked against the cfg's when it has one.
  auto from_shape = [&](const std::string& field, std::string_view cfg_key, std::int64_t value) {
    if (given.count(field) != 0) return given.at(field);
    std::optional<json> declared = from_cfg(field, cfg_key);
    if (declared && declared->is_number_integer() && declared->get<std::int64_t>() != value) {
      throw Error(Location{base.path(), fmt::format("cfg.model.{}", cfg_key), std::nullopt},
                  fmt::format("{} here, but the weights have {} (override with --hf-config {}=VALUE)", declared->dump(),
                              value, field));
    }
    return json(value);
  };

  json config = json::object();
  config["_name_or_path"] = "";
  config["architectures"] = json::array({"OPTForCausalLM"});
  config["model_type"] = "opt";
  config["vocab_size"] = embed[0];
  config["word_embed_proj_dim"] = embed[1];
  config["hidden_size"] = from_shape("hidden_size", "decoder_embed_dim", positions[1]);
  config["ffn_dim"] = from_shape("ffn_dim", "decoder_ffn_embed_dim", fc1[0]);
  config["num_hidden_layers"] = from_shape("num_hidden_layers", "decoder_layers", layers);
  config["num_attention_heads"] = required("num_attention_heads", "decoder_attention_heads");
  config["max_position_embeddings"] = positions[0] - 2;
  std::optional<json> pre_norm = from_cfg("do_layer_norm_before", "decoder_normalize_before");
  config["do_layer_norm_before"] =
      pre_norm ? *pre_norm : json(find_output(tensors, "model.decoder.final_layer_norm.weight") != nullptr);
  config["activation_function"] = required("activation_function", "activation_fn");
  config["dropout"] = required("dropout", "dropout");
  config["attention_dropout"] = required("attention_dropout", "attention_dropout");
  if (!missing.empty()) {
    throw Error(Location{base.path(), "cfg", std::nullopt},
                fmt::format("config.json needs {}, which cfg lacks: give each with --hf-config FIELD=VALUE",
                            fmt::join(missing, ", ")));
  }
  config["tie_word_embeddings"] = tied_embeddings;
  // OPT variants transformers' OPTConfig tells apart: no biases, no final layer norm.
  const bool biases = find_output(tensors, "model.decoder.layers.0.fc1.bias") != nullptr;
  const bool final_norm = find_output(tensors, "model.decoder.final_layer_norm.weight") != nullptr;
  config["enable_bias"] = biases;
  const bool remove_final_norm = config["do_layer_norm_before"] == true && !final_norm;
  if (remove_final_norm) config["_remove_final_layer_norm"] = true;
  config["torch_dtype"] =
      std::string(dtype_info(find_output(tensors, "model.decoder.embed_tokens.weight")->dtype()).name);
  config["bos_token_id"] = 2;
  config["eos_token_id"] = 2;
  config["pad_token_id"] = 1;
  // What the weights decide cannot be overridden into something else.
  const json derived = {{"vocab_size", embed[0]},
                        {"word_embed_proj_dim", embed[1]},
                        {"hidden_size", positions[1]},
                        {"ffn_dim", fc1[0]},
                        {"num_hidden_layers", layers},
                        {"max_position_embeddings", positions[0] - 2},
                        {"tie_word_embeddings", tied_embeddings},
                        {"enable_bias", biases},
                        {"_remove_final_layer_norm", remove_final_norm}};
  for (const auto& [field, value] : overrides) {
    // (the same value of the same type: a size of 10.0 is not 10 to transformers)
    auto same_kind = [](const json& x, const json& y) {
      return (x.is_boolean() && y.is_boolean()) || (x.is_number_integer() && y.is_number_integer());
    };
    if (derived.contains(field) && (value != derived[field] || !same_kind(value, derived[field]))) {
      throw Error(Location{"--hf-config", field, std::nullopt},
                  fmt::format("{} here, but the weights give {}", value.dump(), derived[field].dump()));
    }
    config[field] = value;
  }
  if (config["do_layer_norm_before"] == false && final_norm) {
    throw Error(Location{base.path(), "cfg", std::nullopt},
                "do_layer_norm_before is false, but the weights hold decoder.layer_norm, which transformers' OPT "
                "then never loads (--hf-config do_layer_norm_before=true if the model is pre-norm)");
  }
  // Every tensor must have the shape config.json gives it: transformers refuses a
  // checkpoint whose shapes disagree (an lm_head of half the vocabulary).
  const HfOptSizes sizes{embed[0], embed[1], positions[1], fc1[0], layers, positions[0] - 2};
  for (const NamedTensor& tensor : tensors) {
    std::optional<std::vector<std::int64_t>> expected = hf_opt_shape(tensor.name, sizes);
    if (!expected) {
      throw Error(Location{base.path(), tensor.name, std::nullopt},
                  "transformers' OPT has no parameter of this name under this config.json");
    }
    if (*expected != tensor.source.shape) {
      throw Error(Location{base.path(), tensor.name, std::nullopt},
                  fmt::format("shape [{}], but config.json (vocab_size {}, hidden_size {}, ffn_dim {}) makes it [{}]",
                              fmt::join(tensor.source.shape, ", "), sizes.vocab, sizes.hidden, sizes.ffn,
                              fmt::join(*expected, ", ")));
    }
  }
  const json& heads = config["num_attention_heads"];
  if (!heads.is_number_integer() || heads.get<std::int64_t>() <= 0 || positions[1] % heads.get<std::int64_t>() != 0) {
    throw Error(Location{base.path(), "cfg", std::nullopt},
                fmt::format("num_attention_heads {} does not divide hidden size {}", heads.dump(), positions[1]));
  }
  return config;
}

// A Hugging Face OPT folder: the state dict under transformers' names as
// safetensors, and config.json.
void plan_hf_opt_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out) {
  HfOptModel model = to_hf_opt(output.tensors);
  const std::vector<NamedTensor>& renamed = model.tensors;
  check_invariant(output.base != nullptr, "an hf folder planned without the checkpoint whose cfg it reads");
  json config = hf_opt_config(renamed, model.tied_embeddings, *output.base, options.hf_config);
  std::filesystem::path dir(output.path);
  for (auto& file : plan_safetensors(renamed, {(dir / "model.safetensors").string(), options.max_shard_bytes},
                                     output.sources, out.plan)) {
    out.tensors.push_back(options.list_tensors ? std::move(file) : std::vector<NamedTensor>{});
  }
  out.plan.files.push_back(plan_text_file((dir / "config.json").string(), config.dump(2) + "\n"));
  out.tensors.emplace_back();
}

}  // namespace ckpt
