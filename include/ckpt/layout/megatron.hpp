// Megatron's model-parallel gluing and re-cutting (metaseq naming), as pure
// functions of TensorSources: a fused qkv_proj part is [k; v; q] on dim 0, other
// keys are concatenated on dim 0 or 1 or are replicated, by the rule table in
// megatron.cpp. No file is read.
#pragma once

#include <array>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/layout/tensor_source.hpp"

namespace ckpt {

// How one key of a Megatron part is glued; the whole rule table lives in
// megatron_rule().
enum class MpRule {
  FusedQkv,     // [k_m; v_m; q_m] per part
  ConcatDim0,   // column-parallel: rows of part 0, then part 1, ...
  ConcatDim1,   // row-parallel: each row is part 0's row, part 1's row, ...
  Replicated,   // identical in every part: take part 0 (compare the others)
  Copied,       // identical by construction (version): take part 0, no comparison
  Placeholder,  // sinusoidal positions' _float_tensor: becomes zeros([1])
};
MpRule megatron_rule(std::string_view key);

// How the attention projections of a layer are written.
enum class QkvForm {
  AsInput,   // as the parts hold them
  Fused,     // one `qkv_proj` per layer, [k_m; v_m; q_m] in part m: what metaseq's model-parallel code loads
  Separate,  // `k_proj`, `v_proj`, `q_proj`
};

// One part's state dict with its attention projections in `form`: each fused
// qkv_proj module split, where its first tensor was, into k_proj, v_proj and
// q_proj in a module's order (k_proj.weight, k_proj.bias, v_proj.weight, ...),
// or each layer's k_proj, v_proj and q_proj (weight, then bias) fused into one
// qkv_proj [k; v; q] where the first of the three was; fusing then splitting
// gives the keys back in their order. Throws Error naming the key when
// a fused tensor does not split in three, a layer lacks one of the three or
// they differ in shape or dtype, or a new name is one the part holds already.
std::vector<NamedTensor> with_qkv_form(std::vector<NamedTensor> part, QkvForm form);

// Re-cuts the consolidated parts into `new_parts` parts, in part 0's key order:
// sharded tensors are glued and split evenly on their dimension (qkv per part
// as [k_i; v_i; q_i]), replicated ones copied to every part; then the
// projections of every new part put in `form` (with_qkv_form). `replicated` receives
// the keys whose parts should be compared. Throws Error naming the key when
// parts miss keys, shapes do not glue, or `new_parts` does not divide a
// sharded dimension.
std::vector<std::vector<NamedTensor>> reshard_megatron(const std::vector<std::vector<NamedTensor>>& parts,
                                                       int new_parts, std::vector<std::string>* replicated,
                                                       QkvForm form = QkvForm::AsInput);

struct GlueOptions {
  bool fused_qkv = false;  // one qkv_proj as [k_all; v_all; q_all], not k_proj, v_proj, q_proj
};

// Glues the consolidated parts into one state dict (reshard_megatron to one
// part), the projections Separate, or Fused with `options.fused_qkv`.
std::vector<NamedTensor> glue_megatron(const std::vector<std::vector<NamedTensor>>& parts, const GlueOptions& options,
                                       std::vector<std::string>* replicated);

// The three thirds (k, v, q) of a fused qkv_proj on dim 0; throws Error naming
// `key` when dim 0 does not split in three.
std::array<TensorSource, 3> split_qkv(const TensorSource& fused, const std::string& key);

// Parts that should agree across model parts (layer norms, row-parallel biases),
// or across the data-parallel shards of a part that hold whole copies.
struct ReplicatedCheck {
  std::string key;
  std::vector<TensorSource> parts;
  std::string_view unit = "model part";  // what parts[m] is, in messages: "model part 1", "data-parallel shard 1"
};

// The checks of the `keys` glued from replicated parts: each key's source in
// every consolidated part that holds it, named `what` + key ("" for weights;
// "last_optimizer_state exp_avg of " for their optimizer state).
std::vector<ReplicatedCheck> replicated_checks(const std::vector<std::vector<NamedTensor>>& parts,
                                               const std::vector<std::string>& keys, const std::string& what = "");

// glue_megatron, with the replicated_checks of what it took from one part
// appended to `checks`. Consumes the parts: a single part is the state dict
// itself (its qkv in the form asked), not a copy.
std::vector<NamedTensor> glue_and_check(std::vector<std::vector<NamedTensor>> parts, const GlueOptions& options,
                                        std::vector<ReplicatedCheck>& checks, const std::string& what = "");

}  // namespace ckpt
