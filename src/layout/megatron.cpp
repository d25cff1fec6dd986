// Megatron model-parallel gluing (metaseq naming), as byte ranges.
#include <fmt/format.h>

#include <array>
#include <map>

#include "ckpt/layout.hpp"

namespace ckpt {

namespace {

bool contains(std::string_view text, std::string_view part) { return text.find(part) != std::string_view::npos; }
bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

// The three thirds (k, v, q) of a fused part on dim 0.
std::array<TensorSource, 3> split_qkv(const TensorSource& part, const std::string& key) {
  if (part.shape.empty() || part.shape[0] % 3 != 0) {
    throw Error(fmt::format("{}: fused qkv of shape [{}] does not split in three on dim 0", key,
                            fmt::join(part.shape, ", ")));
  }
  std::vector<std::int64_t> shape = part.shape;
  shape[0] /= 3;
  std::uint64_t third = part.nbytes() / 3;
  return {part.slice(0, third, shape), part.slice(third, third, shape), part.slice(2 * third, third, shape)};
}

std::string replace_qkv(const std::string& key, const char* with) {
  std::string out = key;
  std::size_t at = out.find("qkv_proj");
  out.replace(at, 8, with);
  return out;
}

}  // namespace

MpRule megatron_rule(std::string_view key) {
  // Checked in this order, as metaseq's reshard_megatron_parts does.
  if (contains(key, "qkv")) return MpRule::FusedQkv;
  if (contains(key, "ffn_layernorm")) return MpRule::ConcatDim0;
  if (contains(key, "layer_norm")) return MpRule::Replicated;
  if (contains(key, "fc1") || contains(key, "k_proj") || contains(key, "q_proj") || contains(key, "v_proj")) {
    return MpRule::ConcatDim0;
  }
  if (contains(key, "fc2") || contains(key, "out_proj")) {
    return ends_with(key, "bias") ? MpRule::Replicated : MpRule::ConcatDim1;
  }
  if (contains(key, "embed_tokens.weight")) return MpRule::ConcatDim0;
  if (contains(key, "embed_positions")) {
    return contains(key, "_float_tensor") ? MpRule::Placeholder : MpRule::Replicated;
  }
  if (contains(key, "version")) return MpRule::Copied;
  return MpRule::Replicated;
}

std::vector<OutputTensor> glue_megatron(const std::vector<std::vector<NamedTensor>>& parts, const GlueOptions& options,
                                        std::vector<std::string>* replicated) {
  if (parts.empty()) return {};
  std::vector<std::map<std::string, const NamedTensor*>> index(parts.size());
  for (std::size_t m = 0; m < parts.size(); ++m) {
    for (const NamedTensor& tensor : parts[m]) index[m][tensor.name] = &tensor;
  }
  std::vector<OutputTensor> out;
  for (const NamedTensor& head : parts[0]) {
    const std::string& key = head.name;
    if (head.alias_of) {  // ties are restored between the glued tensors
      out.push_back(as_output(head));
      continue;
    }
    std::vector<TensorSource> sources;
    for (std::size_t m = 0; m < parts.size(); ++m) {
      auto it = index[m].find(key);
      if (it == index[m].end() || it->second->alias_of) {
        throw Error(fmt::format("{}: missing from model part {}", key, m));
      }
      const TensorSource& source = it->second->source;
      if (source.dtype != head.source.dtype || source.shape.size() != head.source.shape.size()) {
        throw Error(fmt::format("{}: dtype or rank differs between model parts 0 and {}", key, m));
      }
      sources.push_back(source);
    }
    auto same_shape_except = [&](std::size_t dim) {
      for (std::size_t m = 1; m < sources.size(); ++m) {
        for (std::size_t d = 0; d < head.source.shape.size(); ++d) {
          if (d != dim && sources[m].shape[d] != head.source.shape[d]) {
            throw Error(fmt::format("{}: shape [{}] in model part {} does not glue with [{}] in part 0", key,
                                    fmt::join(sources[m].shape, ", "), m, fmt::join(head.source.shape, ", ")));
          }
        }
      }
    };
    auto glued_shape = [&](std::size_t dim) {
      std::vector<std::int64_t> shape = head.source.shape;
      shape[dim] = 0;
      for (const TensorSource& source : sources) shape[dim] += source.shape[dim];
      return shape;
    };
    OutputTensor glued;
    glued.name = key;
    glued.dtype = head.source.dtype;
    switch (megatron_rule(key)) {
      case MpRule::FusedQkv: {
        same_shape_except(0);
        std::array<std::vector<TensorSource>, 3> thirds;  // all k's, all v's, all q's
        for (const TensorSource& source : sources) {
          auto kvq = split_qkv(source, key);
          for (int t = 0; t < 3; ++t) thirds[t].push_back(kvq[t]);
        }
        std::vector<std::int64_t> third_shape = glued_shape(0);
        third_shape[0] /= 3;
        if (options.fused_qkv) {
          glued.shape = glued_shape(0);
          for (int t = 0; t < 3; ++t) glued.parts.push_back(concat(thirds[t], third_shape));
          out.push_back(std::move(glued));
        } else {
          static constexpr const char* kNames[] = {"k_proj", "v_proj", "q_proj"};
          for (int t = 0; t < 3; ++t) {
            OutputTensor one;
            one.name = replace_qkv(key, kNames[t]);
            one.dtype = glued.dtype;
            one.shape = third_shape;
            one.parts.push_back(concat(thirds[t], third_shape));
            out.push_back(std::move(one));
          }
        }
        continue;
      }
      case MpRule::ConcatDim0:
        if (head.source.shape.empty()) throw Error(key + ": a scalar cannot be glued on dim 0");
        same_shape_except(0);
        glued.shape = glued_shape(0);
        glued.parts = sources;
        break;
      case MpRule::ConcatDim1: {
        if (head.source.shape.size() < 2) throw Error(key + ": fewer than 2 dimensions, cannot glue on dim 1");
        same_shape_except(1);
        glued.shape = glued_shape(1);
        glued.parts = sources;
        glued.rows = static_cast<std::uint64_t>(head.source.shape[0]);
        break;
      }
      case MpRule::Replicated:
        if (replicated != nullptr && parts.size() > 1) replicated->push_back(key);
        [[fallthrough]];
      case MpRule::Copied:
        glued.shape = head.source.shape;
        glued.parts = {head.source};
        break;
      case MpRule::Placeholder:
        glued.dtype = DType::Float32;
        glued.shape = {1};
        glued.parts = {zeros_source(DType::Float32, {1})};
        break;
    }
    out.push_back(std::move(glued));
  }
  return out;
}

}  // namespace ckpt
