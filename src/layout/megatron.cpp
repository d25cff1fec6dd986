// Megatron model-parallel gluing and re-cutting (metaseq naming), as byte ranges.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <map>
#include <optional>
#include <set>

#include "ckpt/layout/megatron.hpp"

#include "ckpt/io/error.hpp"

namespace ckpt {

namespace {

std::vector<std::int64_t> glued_shape(const std::vector<TensorSource>& sources, std::size_t dim) {
  std::vector<std::int64_t> shape = sources.front().shape;
  shape[dim] = 0;
  for (const TensorSource& source : sources) shape[dim] += source.shape[dim];
  return shape;
}

void check_shapes(const std::string& key, const std::vector<TensorSource>& sources, std::size_t dim) {
  const std::vector<std::int64_t>& head = sources.front().shape;
  for (std::size_t m = 1; m < sources.size(); ++m) {
    bool ok = sources[m].shape.size() == head.size();
    for (std::size_t d = 0; ok && d < head.size(); ++d) ok = d == dim || sources[m].shape[d] == head[d];
    if (!ok) {
      throw Error(Location{"", key, std::nullopt},
                  fmt::format("shape {} in model part {} does not glue with {} in part 0", shape_text(sources[m].shape),
                              m, shape_text(head)));
    }
  }
}

// Splits `glued` into `parts` equal pieces on dim 0.
std::vector<TensorSource> split_dim0(const std::string& key, const TensorSource& glued, int parts) {
  if (glued.shape.empty() || glued.shape[0] % parts != 0) {
    throw Error(Location{"", key, std::nullopt}, fmt::format("dim 0 of size {} does not split into {} model parts",
                                                             glued.shape.empty() ? 0 : glued.shape[0], parts));
  }
  std::vector<std::int64_t> shape = glued.shape;
  shape[0] /= parts;
  std::uint64_t chunk = glued.nbytes() / static_cast<std::uint64_t>(parts);
  std::vector<TensorSource> out;
  for (int i = 0; i < parts; ++i) out.push_back(glued.slice(static_cast<std::uint64_t>(i) * chunk, chunk, shape));
  return out;
}

// Splits `glued` into `parts` equal pieces on dim 1.
std::vector<TensorSource> split_dim1(const std::string& key, const TensorSource& glued, int parts) {
  if (glued.shape[1] % parts != 0) {
    throw Error(Location{"", key, std::nullopt},
                fmt::format("dim 1 of size {} does not split into {} model parts", glued.shape[1], parts));
  }
  std::vector<std::int64_t> shape = glued.shape;
  shape[1] /= parts;
  auto rows = static_cast<std::uint64_t>(glued.shape[0]);
  std::uint64_t row_bytes = rows == 0 ? 0 : glued.nbytes() / rows;
  std::uint64_t width = row_bytes / static_cast<std::uint64_t>(parts);
  std::vector<TensorSource> out;
  for (int i = 0; i < parts; ++i) {
    out.push_back(rows == 0 ? glued.slice(0, 0, shape)
                            : glued.columns(rows, static_cast<std::uint64_t>(i) * width, width, shape));
  }
  return out;
}

}  // namespace

std::array<TensorSource, 3> split_qkv(const TensorSource& fused, const std::string& key) {
  if (fused.shape.empty() || fused.shape[0] % 3 != 0) {
    throw Error(Location{"", key, std::nullopt},
                fmt::format("fused qkv of shape {} does not split in three on dim 0", shape_text(fused.shape)));
  }
  std::vector<std::int64_t> shape = fused.shape;
  shape[0] /= 3;
  std::uint64_t third = fused.nbytes() / 3;
  return {fused.slice(0, third, shape), fused.slice(third, third, shape), fused.slice(2 * third, third, shape)};
}

MpRule megatron_rule(std::string_view key) {
  // Checked in this order, as metaseq's reshard_megatron_parts does.
  if (key.find("qkv") != std::string_view::npos) return MpRule::FusedQkv;
  if (key.find("ffn_layernorm") != std::string_view::npos) return MpRule::ConcatDim0;
  if (key.find("layer_norm") != std::string_view::npos) return MpRule::Replicated;
  if (key.find("fc1") != std::string_view::npos || key.find("k_proj") != std::string_view::npos ||
      key.find("q_proj") != std::string_view::npos || key.find("v_proj") != std::string_view::npos) {
    return MpRule::ConcatDim0;
  }
  if (key.find("fc2") != std::string_view::npos || key.find("out_proj") != std::string_view::npos) {
    return key.ends_with("bias") ? MpRule::Replicated : MpRule::ConcatDim1;
  }
  // The vocabulary is cut over the parts: the embedding, and an output
  // projection of its own (Megatron's vocab-parallel output layer; a tied one is
  // an alias of embed_tokens).
  if (key.find("embed_tokens.weight") != std::string_view::npos ||
      key.find("output_projection.weight") != std::string_view::npos) {
    return MpRule::ConcatDim0;
  }
  if (key.find("embed_positions") != std::string_view::npos) {
    return key.find("_float_tensor") != std::string_view::npos ? MpRule::Placeholder : MpRule::Replicated;
  }
  if (key.find("version") != std::string_view::npos) return MpRule::Copied;
  return MpRule::Replicated;
}

namespace {

constexpr std::array<std::string_view, 3> kProjections = {"k_proj", "v_proj", "q_proj"};  // a fused part's order

// Which of k, v, q a separate projection's key names, and where; nullopt for
// any other key (a fused qkv_proj included).
struct Projection {
  int which = 0;
  std::size_t at = 0;
};
std::optional<Projection> projection_of(std::string_view key) {
  if (megatron_rule(key) == MpRule::FusedQkv) return std::nullopt;
  for (int t = 0; t < 3; ++t) {
    std::size_t at = key.find(kProjections[t]);
    if (at != std::string_view::npos) return Projection{t, at};
  }
  return std::nullopt;
}

// A part's keys, and for each key others are tied to one of them: what a
// renaming must not collide with or leave dangling.
struct PartKeys {
  explicit PartKeys(const std::vector<NamedTensor>& part) {
    for (const NamedTensor& tensor : part) {
      names.insert(tensor.name);
      if (tensor.alias_of) tied_to.emplace(*tensor.alias_of, tensor.name);
    }
  }
  std::set<std::string> names;
  std::map<std::string, std::string> tied_to;  // target -> a key tied to it
};

// The module a fused tensor belongs to: "...self_attn.qkv_proj" for its weight
// and its bias; a fused key not named qkv_proj is a module of its own.
std::string fused_module(const std::string& key) {
  std::size_t at = key.find("qkv_proj");
  return at == std::string::npos ? key : key.substr(0, at + 8);
}

// Each fused module split where its first tensor was, projection by
// projection as the module holds them (k_proj.weight, k_proj.bias,
// v_proj.weight, ...): a module's order, so that fusing and splitting again
// gives the keys back in their order.
std::vector<NamedTensor> split_fused(std::vector<NamedTensor> part) {
  auto fused = [](const NamedTensor& tensor) {
    return !tensor.alias_of && megatron_rule(tensor.name) == MpRule::FusedQkv;
  };
  if (std::none_of(part.begin(), part.end(), fused)) return part;
  const PartKeys keys(part);
  std::map<std::string, std::vector<const NamedTensor*>> modules;  // module -> its fused tensors, in order
  for (const NamedTensor& tensor : part) {
    if (!fused(tensor)) continue;
    if (keys.tied_to.count(tensor.name) != 0) {
      throw Error(Location{"", tensor.name, std::nullopt},
                  fmt::format("'{}' is tied to it: a tied qkv_proj cannot be split", keys.tied_to.at(tensor.name)));
    }
    modules[fused_module(tensor.name)].push_back(&tensor);
  }
  std::vector<NamedTensor> out;
  for (NamedTensor& tensor : part) {
    if (!fused(tensor)) {
      out.push_back(std::move(tensor));  // (`modules` points at fused tensors only)
      continue;
    }
    const std::vector<const NamedTensor*>& members = modules.at(fused_module(tensor.name));
    if (members.front() != &tensor) continue;  // split with the module's first tensor
    std::vector<std::array<TensorSource, 3>> thirds;
    for (const NamedTensor* member : members) thirds.push_back(split_qkv(member->source, member->name));
    for (int t = 0; t < 3; ++t) {
      for (std::size_t i = 0; i < members.size(); ++i) {
        const NamedTensor& member = *members[i];
        std::string name = member.name;
        std::size_t at = name.find("qkv_proj");
        if (at != std::string::npos)
          name.replace(at, 8, kProjections[t]);
        else
          name += fmt::format(".{}", kProjections[t]);
        if (keys.names.count(name) != 0) {
          throw Error(
              Location{"", member.name, std::nullopt},
              fmt::format("split into k, v and q, it would give '{}', which the state dict holds already", name));
        }
        out.push_back({name, thirds[i][t], std::nullopt, member.kind});
      }
    }
  }
  return out;
}

std::vector<NamedTensor> fuse_separate(std::vector<NamedTensor> part) {
  const PartKeys keys(part);
  struct Group {
    std::array<const NamedTensor*, 3> kvq{};
    std::size_t first = 0;  // where the fused tensor goes
  };
  std::map<std::string, Group> groups;  // fused name -> its projections
  auto fused_name = [](const std::string& key, const Projection& projection) {
    std::string name = key;
    return name.replace(projection.at, kProjections[projection.which].size(), "qkv_proj");
  };
  for (std::size_t i = 0; i < part.size(); ++i) {
    std::optional<Projection> projection = projection_of(part[i].name);
    if (!projection) continue;
    if (part[i].alias_of) {
      throw Error(Location{"", part[i].name, std::nullopt},
                  fmt::format("tied to {}: a tied projection cannot be fused into qkv_proj (reshard --split-qkv "
                              "keeps k, v and q separate)",
                              *part[i].alias_of));
    }
    auto [it, fresh] = groups.try_emplace(fused_name(part[i].name, *projection));
    if (fresh) it->second.first = i;
    it->second.kvq[static_cast<std::size_t>(projection->which)] = &part[i];
  }
  std::vector<NamedTensor> out;
  for (std::size_t i = 0; i < part.size(); ++i) {
    std::optional<Projection> projection = projection_of(part[i].name);
    if (!projection) {
      out.push_back(std::move(part[i]));
      continue;
    }
    std::string name = fused_name(part[i].name, *projection);
    const Group& group = groups.at(name);
    if (group.first != i) continue;  // fused where its first projection was
    auto fail = [&](const std::string& message) {
      return Error(Location{"", part[i].name, std::nullopt},
                   message + " (reshard --split-qkv keeps k, v and q separate)");
    };
    for (int t = 0; t < 3; ++t) {
      const NamedTensor* member = group.kvq[static_cast<std::size_t>(t)];
      if (member == nullptr) {
        std::string missing = name;
        missing.replace(projection->at, 8, kProjections[t]);
        throw fail(fmt::format("'{}' is missing, so k, v and q cannot be fused into {}", missing, name));
      }
      if (keys.tied_to.count(member->name) != 0) {
        throw fail(fmt::format("'{}' is tied to {}: a tied projection cannot be fused", keys.tied_to.at(member->name),
                               member->name));
      }
    }
    const TensorSource& k = group.kvq[0]->source;
    const TensorSource& v = group.kvq[1]->source;
    const TensorSource& q = group.kvq[2]->source;
    if (k.shape.empty() || v.shape != k.shape || q.shape != k.shape || v.dtype != k.dtype || q.dtype != k.dtype) {
      throw fail(fmt::format("k, v and q of shapes {}, {}, {} or dtypes {}, {}, {} do not fuse on dim 0",
                             shape_text(k.shape), shape_text(v.shape), shape_text(q.shape), dtype_info(k.dtype).name,
                             dtype_info(v.dtype).name, dtype_info(q.dtype).name));
    }
    std::vector<TensorSource> kvq = {k, v, q};
    if (keys.names.count(name) != 0)
      throw fail(fmt::format("fused, it would be '{}', which the state dict holds already", name));
    out.push_back({name, concat(kvq, glued_shape(kvq, 0)), std::nullopt, group.kvq[0]->kind});
  }
  return out;
}

QkvForm glued_form(const GlueOptions& options) {
  return options.fused_qkv ? QkvForm::Fused : QkvForm::Separate;
}

}  // namespace

std::vector<NamedTensor> with_qkv_form(std::vector<NamedTensor> part, QkvForm form) {
  switch (form) {
    case QkvForm::AsInput: return part;
    case QkvForm::Fused: return fuse_separate(std::move(part));
    case QkvForm::Separate: return split_fused(std::move(part));
  }
  internal_error("unknown QkvForm");
}

std::vector<std::vector<NamedTensor>> reshard_megatron(const std::vector<std::vector<NamedTensor>>& parts,
                                                       int new_parts, std::vector<std::string>* replicated,
                                                       QkvForm form) {
  if (form != QkvForm::AsInput) {  // re-cut as they are (errors name the input's keys), then fused or split
    std::vector<std::vector<NamedTensor>> out = reshard_megatron(parts, new_parts, replicated, QkvForm::AsInput);
    for (std::vector<NamedTensor>& part : out) part = with_qkv_form(std::move(part), form);
    return out;
  }
  check_invariant(!parts.empty() && new_parts >= 1, "model parts: nothing to re-cut");
  if (parts.size() == 1 && new_parts == 1) return {parts[0]};  // nothing to glue or cut, nothing replicated
  std::vector<std::map<std::string, const NamedTensor*>> index(parts.size());
  for (std::size_t m = 0; m < parts.size(); ++m) {
    for (const NamedTensor& tensor : parts[m]) index[m][tensor.name] = &tensor;
  }
  // Every part must hold the same keys as part 0.
  for (std::size_t m = 1; m < parts.size(); ++m) {
    for (const NamedTensor& tensor : parts[m]) {
      if (index[0].count(tensor.name) == 0)
        throw Error(ErrorKind::IncompleteSet, Location{"", tensor.name, std::nullopt},
                    fmt::format("in model part {} but not in part 0", m));
    }
  }
  std::vector<std::vector<NamedTensor>> out(static_cast<std::size_t>(new_parts));
  auto emit_all = [&](const NamedTensor& part0, const std::vector<TensorSource>& sources) {
    for (int i = 0; i < new_parts; ++i) out[i].push_back({part0.name, sources[i], std::nullopt, part0.kind});
  };
  for (const NamedTensor& head : parts[0]) {
    const std::string& key = head.name;
    if (head.alias_of) {  // ties are restored between the re-cut tensors
      for (std::size_t m = 1; m < parts.size(); ++m) {
        auto it = index[m].find(key);
        if (it == index[m].end() || it->second->alias_of != head.alias_of) {
          throw Error(ErrorKind::IncompleteSet, Location{"", key, std::nullopt},
                      fmt::format("tied to {} in model part 0 but not in part {}", *head.alias_of, m));
        }
      }
      for (auto& part : out) part.push_back(head);
      continue;
    }
    std::vector<TensorSource> sources;
    for (std::size_t m = 0; m < parts.size(); ++m) {
      auto it = index[m].find(key);
      if (it == index[m].end() || it->second->alias_of)
        throw Error(ErrorKind::IncompleteSet, Location{"", key, std::nullopt},
                    fmt::format("missing from model part {}", m));
      const TensorSource& source = it->second->source;
      if (source.dtype != head.source.dtype) {
        throw Error(ErrorKind::IncompleteSet, Location{"", key, std::nullopt},
                    fmt::format("dtype {} in model part {} differs from {} in part 0", dtype_info(source.dtype).name, m,
                                dtype_info(head.source.dtype).name));
      }
      sources.push_back(source);
    }
    switch (megatron_rule(key)) {
      case MpRule::FusedQkv: {
        check_shapes(key, sources, 0);
        std::array<std::vector<TensorSource>, 3> thirds;  // all k's, all v's, all q's
        for (const TensorSource& source : sources) {
          auto kvq = split_qkv(source, key);
          for (int t = 0; t < 3; ++t) thirds[t].push_back(kvq[t]);
        }
        std::array<std::vector<TensorSource>, 3> cut;
        for (int t = 0; t < 3; ++t) cut[t] = split_dim0(key, concat(thirds[t], glued_shape(thirds[t], 0)), new_parts);
        std::vector<TensorSource> fused;
        for (int i = 0; i < new_parts; ++i) {
          std::vector<TensorSource> kvq = {cut[0][i], cut[1][i], cut[2][i]};
          fused.push_back(concat(kvq, glued_shape(kvq, 0)));
        }
        emit_all(head, fused);
        break;
      }
      case MpRule::ConcatDim0:
        if (head.source.shape.empty())
          throw Error(Location{"", key, std::nullopt}, "a scalar cannot be glued on dim 0");
        check_shapes(key, sources, 0);
        emit_all(head, split_dim0(key, concat(sources, glued_shape(sources, 0)), new_parts));
        break;
      case MpRule::ConcatDim1: {
        if (head.source.shape.size() < 2)
          throw Error(Location{"", key, std::nullopt}, "fewer than 2 dimensions, cannot glue on dim 1");
        check_shapes(key, sources, 1);
        auto rows = static_cast<std::uint64_t>(head.source.shape[0]);
        emit_all(head, split_dim1(key, interleave_rows(sources, rows, glued_shape(sources, 1)), new_parts));
        break;
      }
      case MpRule::Replicated:
        if (replicated != nullptr && parts.size() > 1) replicated->push_back(key);
        [[fallthrough]];
      case MpRule::Copied:
        emit_all(head, std::vector<TensorSource>(static_cast<std::size_t>(new_parts), head.source));
        break;
      case MpRule::Placeholder:
        emit_all(head,
                 std::vector<TensorSource>(static_cast<std::size_t>(new_parts), zeros_source(DType::Float32, {1})));
        break;
    }
  }
  return out;
}

std::vector<NamedTensor> glue_megatron(const std::vector<std::vector<NamedTensor>>& parts, const GlueOptions& options,
                                       std::vector<std::string>* replicated) {
  return reshard_megatron(parts, 1, replicated, glued_form(options)).front();
}

std::vector<NamedTensor> glue_and_check(std::vector<std::vector<NamedTensor>> parts, const GlueOptions& options,
                                        std::vector<ReplicatedCheck>& checks, const std::string& what) {
  if (parts.size() == 1) return with_qkv_form(std::move(parts[0]), glued_form(options));
  std::vector<std::string> replicated;
  std::vector<NamedTensor> glued = glue_megatron(parts, options, &replicated);
  for (ReplicatedCheck& check : replicated_checks(parts, replicated, what)) checks.push_back(std::move(check));
  return glued;
}

std::vector<ReplicatedCheck> replicated_checks(const std::vector<std::vector<NamedTensor>>& parts,
                                               const std::vector<std::string>& keys, const std::string& what) {
  std::vector<ReplicatedCheck> checks;
  for (const std::string& key : keys) {
    ReplicatedCheck check;
    check.key = what + key;
    for (const auto& part : parts) {
      for (const NamedTensor& tensor : part) {
        if (tensor.name == key) check.parts.push_back(tensor.source);
      }
    }
    checks.push_back(std::move(check));
  }
  return checks;
}

}  // namespace ckpt
