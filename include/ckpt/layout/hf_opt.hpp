// metaseq's OPT state-dict names to Hugging Face transformers' (OPTForCausalLM),
// as transformers' converter (convert_opt_original_pytorch_checkpoint_to_pytorch.py)
// renames them: the whole table is hf_opt_rule() in hf_opt.cpp. No file is read.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/layout/tensor_source.hpp"

namespace ckpt {

// What becomes of one metaseq key.
struct HfOptRule {
  enum class Action {
    Rename,    // to `name`
    Drop,      // decoder.version; decoder.output_projection.weight when tied to embed_tokens
    SplitQkv,  // a fused qkv_proj: [k; v; q] on dim 0 to `name` with k_proj, v_proj, q_proj
  };
  Action action = Action::Rename;
  std::string
      name;  // the transformers name ("model.decoder.final_layer_norm.weight"); SplitQkv: with "{}" for the projection
};

// The rule for `key`; throws Error naming the key when the table has none.
HfOptRule hf_opt_rule(std::string_view key);

struct HfOptModel {
  std::vector<NamedTensor> tensors;  // in the input's order, aliases dropped; dtypes kept
  // decoder.output_projection.weight was tied to embed_tokens (or absent): it is
  // dropped; otherwise it is written as lm_head.weight and this is false.
  bool tied_embeddings = true;
};

// The state dict `tensors` (metaseq names) under transformers' names. Throws
// Error naming the first key with no mapping.
HfOptModel to_hf_opt(const std::vector<NamedTensor>& tensors);

// The sizes config.json states, which fix the shape of every tensor
// transformers' OPTForCausalLM loads.
struct HfOptSizes {
  std::int64_t vocab = 0;
  std::int64_t word_embed_proj_dim = 0;
  std::int64_t hidden = 0;
  std::int64_t ffn = 0;
  std::int64_t layers = 0;
  std::int64_t positions = 0;  // max_position_embeddings
};

// The shape transformers gives the tensor named `hf_name` ("lm_head.weight",
// "model.decoder.layers.3.fc1.bias") under `sizes`; nullopt for a name it has
// no parameter for (a layer past num_hidden_layers among them).
std::optional<std::vector<std::int64_t>> hf_opt_shape(std::string_view hf_name, const HfOptSizes& sizes);

}  // namespace ckpt
