// A Hugging Face OPT folder (`stitch --format hf`): the state dict under
// transformers' names (layout/hf_opt.hpp) as safetensors (export.hpp), and
// config.json. Its plan function is the hf row of the output-format table
// (output_formats.hpp: plan_hf_opt_state_dict).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/plan/export.hpp"

namespace ckpt {

// config.json of transformers' OPTConfig for the state dict `tensors`
// (transformers' names, as to_hf_opt gives them, in their output dtype), from
// the shapes and from the checkpoint `base`'s cfg (cfg.model, else args):
// num_attention_heads, activation_function, dropout, attention_dropout,
// do_layer_norm_before (when cfg lacks it: whether the final layer norm is
// there). `overrides` (--hf-config) set or replace fields. Throws Error naming
// the field the cfg lacks, or a cfg value that disagrees with the shapes.
nlohmann::ordered_json hf_opt_config(const std::vector<NamedTensor>& tensors, bool tied_embeddings,
                                     const Checkpoint& base,
                                     const std::vector<std::pair<std::string, nlohmann::ordered_json>>& overrides);

}  // namespace ckpt
