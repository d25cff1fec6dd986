#include "ckpt/layout/hf_opt.hpp"

#include <fmt/format.h>

#include <map>
#include <regex>

#include "ckpt/io/error.hpp"
#include "ckpt/layout/megatron.hpp"

namespace ckpt {

namespace {

constexpr std::string_view kPrefix = "model.";  // OPTForCausalLM's OPTModel

// Keys kept under their own name (but for the prefix): the embeddings and every
// per-layer weight transformers' OPTDecoderLayer names as metaseq does.
bool same_name(std::string_view key) {
  static const std::regex layer(
      R"(decoder\.layers\.\d+\.(self_attn\.(k|v|q|out)_proj|self_attn_layer_norm|fc1|fc2|final_layer_norm)\.(weight|bias))");
  return key == "decoder.embed_tokens.weight" || key == "decoder.embed_positions.weight" ||
         std::regex_match(key.begin(), key.end(), layer);
}

}  // namespace

HfOptRule hf_opt_rule(std::string_view key) {
  using Action = HfOptRule::Action;
  static const std::regex fused(R"((decoder\.layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias))");
  static const std::pair<std::string_view, std::string_view> kRenamed[] = {
      {"decoder.layer_norm.weight", "decoder.final_layer_norm.weight"},
      {"decoder.layer_norm.bias", "decoder.final_layer_norm.bias"},
      {"decoder.project_in_dim.weight", "decoder.project_in.weight"},
      {"decoder.project_out_dim.weight", "decoder.project_out.weight"},
  };
  if (key == "decoder.version" || key == "decoder.output_projection.weight") return {Action::Drop, ""};
  for (const auto& [from, to] : kRenamed) {
    if (key == from) return {Action::Rename, std::string(kPrefix) + std::string(to)};
  }
  if (same_name(key)) return {Action::Rename, std::string(kPrefix) + std::string(key)};
  std::match_results<std::string_view::const_iterator> match;
  if (std::regex_match(key.begin(), key.end(), match, fused)) {
    return {Action::SplitQkv, fmt::format("{}{}{{}}.{}", kPrefix, match[1].str(), match[2].str())};
  }
  throw Error(Location{"", std::string(key), std::nullopt},
              "no Hugging Face OPT name for this key (the mapping covers metaseq's OPT decoder: embed_tokens, "
              "embed_positions, layers.N.{self_attn.{q,k,v,qkv,out}_proj,self_attn_layer_norm,fc1,fc2,"
              "final_layer_norm}, layer_norm, project_in_dim, project_out_dim, output_projection, version)");
}

HfOptModel to_hf_opt(const std::vector<NamedTensor>& tensors) {
  HfOptModel out;
  for (const NamedTensor& tensor : tensors) {
    HfOptRule rule = hf_opt_rule(tensor.name);
    switch (rule.action) {
      case HfOptRule::Action::Drop:
        // An output projection of its own is the language-model head, not a tie.
        if (tensor.name == "decoder.output_projection.weight" && !tensor.alias_of) {
          out.tied_embeddings = false;
          out.tensors.push_back({"lm_head.weight", tensor.dtype(), tensor.source, std::nullopt});
        }
        break;
      case HfOptRule::Action::Rename:
        if (tensor.alias_of) {
          throw Error(
              Location{"", tensor.name, std::nullopt},
              fmt::format("tied to '{}': safetensors and transformers' OPT hold no tie here", *tensor.alias_of));
        }
        out.tensors.push_back({rule.name, tensor.dtype(), tensor.source, std::nullopt});
        break;
      case HfOptRule::Action::SplitQkv: {
        auto kvq = split_qkv(tensor.source, tensor.name);
        static constexpr std::string_view kProjections[] = {"k_proj", "v_proj", "q_proj"};
        for (int t = 0; t < 3; ++t) {
          out.tensors.push_back(
              {fmt::format(fmt::runtime(rule.name), kProjections[t]), tensor.dtype(), kvq[t], std::nullopt});
        }
        break;
      }
    }
  }
  return out;
}

std::optional<std::vector<std::int64_t>> hf_opt_shape(std::string_view hf_name, const HfOptSizes& sizes) {
  using Shape = std::vector<std::int64_t>;
  const std::int64_t h = sizes.hidden;
  const std::map<std::string_view, Shape> model = {
      {"lm_head.weight", {sizes.vocab, sizes.word_embed_proj_dim}},
      {"model.decoder.embed_tokens.weight", {sizes.vocab, sizes.word_embed_proj_dim}},
      {"model.decoder.embed_positions.weight", {sizes.positions + 2, h}},
      {"model.decoder.final_layer_norm.weight", {h}},
      {"model.decoder.final_layer_norm.bias", {h}},
      {"model.decoder.project_in.weight", {h, sizes.word_embed_proj_dim}},
      {"model.decoder.project_out.weight", {sizes.word_embed_proj_dim, h}},
  };
  const std::map<std::string_view, Shape> layer = {
      {"self_attn.k_proj.weight", {h, h}},   {"self_attn.k_proj.bias", {h}},
      {"self_attn.v_proj.weight", {h, h}},   {"self_attn.v_proj.bias", {h}},
      {"self_attn.q_proj.weight", {h, h}},   {"self_attn.q_proj.bias", {h}},
      {"self_attn.out_proj.weight", {h, h}}, {"self_attn.out_proj.bias", {h}},
      {"self_attn_layer_norm.weight", {h}},  {"self_attn_layer_norm.bias", {h}},
      {"fc1.weight", {sizes.ffn, h}},        {"fc1.bias", {sizes.ffn}},
      {"fc2.weight", {h, sizes.ffn}},        {"fc2.bias", {h}},
      {"final_layer_norm.weight", {h}},      {"final_layer_norm.bias", {h}},
  };
  if (auto it = model.find(hf_name); it != model.end()) return it->second;
  static const std::regex in_layer(R"(model\.decoder\.layers\.(\d{1,9})\.(.*))");
  std::match_results<std::string_view::const_iterator> match;
  if (!std::regex_match(hf_name.begin(), hf_name.end(), match, in_layer)) return std::nullopt;
  if (std::stoll(match[1].str()) >= sizes.layers) return std::nullopt;
  auto it = layer.find(std::string_view(match[2].first, match[2].second));
  if (it == layer.end()) return std::nullopt;
  return it->second;
}

}  // namespace ckpt
