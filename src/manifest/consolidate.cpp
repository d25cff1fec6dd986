// fairscale's consolidate_shard_weights as byte ranges: no tensor is loaded.
#include "ckpt/manifest/consolidate.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <set>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/layout/metaseq.hpp"
#include "ckpt/manifest/input_layouts.hpp"

namespace ckpt {

namespace {
constexpr std::uint64_t kMaxViewPieces = std::uint64_t{1} << 22;
}  // namespace

TensorSource source_of(const StoredTensor& tensor, const ManifestFile& in, std::uint32_t file) {
  return source_of(tensor, in.place(tensor).file_byte_offset, file, in.path);
}

TensorSource source_of(const StoredTensor& tensor, std::uint64_t file_byte_offset, std::uint32_t file,
                       const std::string& path) {
  TensorSource out;
  out.dtype = tensor.dtype;
  out.shape = tensor.shape;
  std::uint64_t itemsize = dtype_info(tensor.dtype).itemsize;
  std::uint64_t numel = tensor.numel();
  if (numel == 0) return out;
  // Dimensions at the end that are laid out contiguously form one run.
  std::size_t inner = tensor.shape.size();
  std::int64_t expected_stride = 1;
  std::uint64_t run_elements = 1;
  while (inner > 0) {
    std::size_t d = inner - 1;
    if (tensor.shape[d] != 1 && tensor.stride[d] != expected_stride) break;
    expected_stride *= tensor.shape[d];
    run_elements *= static_cast<std::uint64_t>(tensor.shape[d]);
    --inner;
  }
  std::uint64_t run_bytes = run_elements * itemsize;
  // The innermost dimension that is not contiguous is one strided piece's rows:
  // a piece per run there would cost memory per element of a strided or
  // stride-0 view (a 10-element storage viewed as 2^28 elements: 24 GB).
  const std::size_t rows_dim = inner == 0 ? 0 : inner - 1;
  const std::uint64_t rows = inner == 0 ? 1 : static_cast<std::uint64_t>(tensor.shape[rows_dim]);
  const std::uint64_t row_source_stride =
      inner == 0 ? 0 : static_cast<std::uint64_t>(tensor.stride[rows_dim]) * itemsize;
  // One piece per index of the dimensions before: bounded, so that a view
  // laid out in more runs than any real checkpoint holds (a stride-0 [2^27, 2])
  // is refused, not planned a piece at a time.
  std::uint64_t pieces = 1;
  for (std::size_t d = 0; d < rows_dim; ++d) {
    pieces *= static_cast<std::uint64_t>(tensor.shape[d]);  // (each extent below numel, itself capped)
    if (pieces > kMaxViewPieces) {
      throw Error(Location{path, tensor.path, file_byte_offset},
                  fmt::format("a view of shape {} and strides {} lies in more than {} separate runs of its storage: "
                              "more than ckpt-tool copies for one tensor",
                              shape_text(tensor.shape), shape_text(tensor.stride), kMaxViewPieces));
    }
  }
  std::vector<std::int64_t> index(rows_dim, 0);
  std::uint64_t logical = 0;
  while (true) {
    std::uint64_t element = 0;
    for (std::size_t d = 0; d < rows_dim; ++d) element += static_cast<std::uint64_t>(index[d] * tensor.stride[d]);
    Piece piece;
    piece.source = file;
    piece.source_offset = file_byte_offset + element * itemsize;
    piece.offset = logical;
    piece.nbytes = run_bytes;
    if (rows > 1) {
      piece.rows = rows;
      piece.stride = run_bytes;
      piece.source_stride = row_source_stride;
    }
    append_piece(out.pieces, piece);
    logical += rows * run_bytes;
    std::size_t d = rows_dim;
    while (true) {
      if (d == 0) return out;
      --d;
      if (++index[d] < tensor.shape[d]) break;
      index[d] = 0;
    }
  }
}

std::vector<std::pair<std::string, const StoredTensor*>> state_dict_tensors(const ManifestFile& file,
                                                                            const std::string& prefix) {
  std::vector<std::pair<std::string, const StoredTensor*>> out;
  for (const StoredTensor& tensor : file.tensors) {
    if (tensor.path.rfind(prefix, 0) != 0) continue;
    std::string_view label = std::string_view(tensor.path).substr(prefix.size());
    if (label.find('/') == std::string_view::npos) out.emplace_back(unescape_label(label), &tensor);
  }
  return out;
}

bool is_buffer(const std::string& key, const StoredTensor& tensor, const FsdpMetadata* fsdp) {
  if (!dtype_info(tensor.dtype).floating) return true;
  if (key.ends_with(".version") || key == "version" || key.ends_with("._float_tensor")) return true;
  return fsdp != nullptr &&
         std::find(fsdp->buffer_names.begin(), fsdp->buffer_names.end(), key) != fsdp->buffer_names.end();
}

namespace {

TensorKind kind_of(const StoredTensor& tensor) {
  return {tensor.wrap, tensor.requires_grad};
}

}  // namespace

bool is_flattened(const ManifestFile& file, const std::string& prefix) {
  if (!file.fsdp) return false;
  for (const FsdpInstanceMeta& instance : file.fsdp->instances) {
    for (const FlatParamMeta& flat : instance.flat_params) {
      if (find_tensor(file, state_dict_path(prefix, flat.state_key)) != nullptr) return true;
    }
  }
  return false;
}

std::vector<NamedTensor> unflatten(const Manifest& manifest, const std::vector<int>& shard_files,
                                   const FlatPath& path_of) {
  const ManifestFile& first = manifest.files.at(shard_files[0]);
  const FsdpMetadata& metadata = *first.fsdp;
  std::vector<NamedTensor> out;
  std::set<std::string> taken;
  std::size_t flat_index = 0;
  for (std::size_t i = 0; i < metadata.instances.size(); ++i) {
    const FsdpInstanceMeta& instance = metadata.instances[i];
    for (std::size_t j = 0; j < instance.flat_params.size(); ++j, ++flat_index) {
      const FlatParamMeta& flat = instance.flat_params[j];
      const std::string path = path_of(flat, flat_index);
      if (flat.numels.size() != flat.names.size() || flat.shapes.size() != flat.names.size()) {
        throw Error(Location{first.path, path, std::nullopt},
                    "shard_metadata: names, shapes and numels have different lengths");
      }
      std::vector<TensorSource> real_parts;
      std::optional<DType> flat_dtype;
      for (std::size_t d = 0; d < shard_files.size(); ++d) {
        const ManifestFile& shard = manifest.files.at(shard_files[d]);
        auto fail = [&](const std::string& message, ErrorKind kind = ErrorKind::IncompleteSet) {
          return Error(kind, Location{shard.path, path, std::nullopt}, message);
        };
        bool same_metadata = shard.fsdp.same_value(first.fsdp);  // shared: shards whose padding agrees
        if (!same_metadata && (!shard.fsdp || shard.fsdp->instances.size() != metadata.instances.size() ||
                               shard.fsdp->instances[i].flat_params.size() != instance.flat_params.size() ||
                               shard.fsdp->instances[i].flat_params[j].names != flat.names)) {
          throw fail(fmt::format("shard_metadata differs from {} (shards of different checkpoints?)", first.path));
        }
        const StoredTensor* tensor = find_tensor(shard, path);
        if (tensor == nullptr) throw fail("flat parameter missing from this shard");
        if (flat_dtype && tensor->dtype != *flat_dtype) throw fail("dtype differs between shards");
        flat_dtype = tensor->dtype;
        if (tensor->shape.size() != 1) throw fail("flat parameter is not one-dimensional", ErrorKind::BadInput);
        std::int64_t padding = shard.fsdp->instances[i].flat_params[j].padding;
        auto held = static_cast<std::int64_t>(tensor->numel());
        if (padding > held) {
          throw Error(Location{shard.path, path, shard.place(*tensor).file_byte_offset},
                      fmt::format("padding {} exceeds the {} elements held", padding, held));
        }
        TensorSource whole = source_of(*tensor, shard, static_cast<std::uint32_t>(shard_files[d]));
        std::uint64_t real_bytes = static_cast<std::uint64_t>(held - padding) * dtype_info(tensor->dtype).itemsize;
        real_parts.push_back(whole.slice(0, real_bytes, {held - padding}));
        if (instance.no_broadcast_optim_state) break;  // kept whole on every rank
      }
      std::int64_t real_numel = 0;
      for (const TensorSource& part : real_parts) real_numel += part.shape[0];
      if (real_numel != flat.total_numel()) {
        throw Error(ErrorKind::IncompleteSet, Location{first.path, path, std::nullopt},
                    fmt::format("the shards hold {} unpadded elements, shard_metadata names {}", real_numel,
                                flat.total_numel()));
      }
      TensorSource full = concat(real_parts, {real_numel});
      std::uint64_t itemsize = dtype_info(full.dtype).itemsize;
      std::uint64_t offset = 0;
      for (std::size_t k = 0; k < flat.names.size(); ++k) {
        std::string key = fsdp_key(instance.fsdp_path, flat.names[k]);
        std::uint64_t nbytes = static_cast<std::uint64_t>(flat.numels[k]) * itemsize;
        if (!taken.insert(key).second) {
          throw Error(Location{first.path, "shard_metadata", std::nullopt}, "parameter named twice: " + key);
        }
        out.push_back({key, full.slice(offset, nbytes, flat.shapes[k]), std::nullopt});
        offset += nbytes;
      }
    }
  }
  return out;
}

bool is_training_checkpoint(const ManifestFile& file, const std::string& state_dict) {
  const std::string prefix = state_dict + "/";
  return is_flattened(file, prefix) || !state_dict_tensors(file, prefix).empty();
}

void check_training_checkpoint(const ManifestFile& file, const std::string& state_dict) {
  if (is_training_checkpoint(file, state_dict)) return;
  throw Error(Location{file.path, "", std::nullopt},
              fmt::format("{}: stitch, reshard and diff of shard sets need a training checkpoint whose weights are a "
                          "'{}' state dict (metaseq/fairscale files)",
                          describe_contents(file), state_dict));
}

std::vector<NamedTensor> consolidate_part(const Manifest& manifest, const std::vector<int>& shard_files,
                                          const std::string& state_dict) {
  check_invariant(!shard_files.empty(), "no shard files for a model part");
  const ManifestFile& first = manifest.files.at(shard_files[0]);
  const std::string prefix = state_dict + "/";
  std::vector<NamedTensor> out;
  std::set<std::string> taken;
  auto add_buffers = [&](const std::vector<std::string>& names) {
    for (const std::string& buffer : names) {
      const StoredTensor* tensor = find_tensor(first, state_dict_path(prefix, buffer));
      if (tensor == nullptr)
        tensor = find_tensor(first, state_dict_path(kModelPrefix, buffer));  // an EMA copy may hold parameters only
      if (tensor == nullptr || !taken.insert(buffer).second) continue;
      out.push_back({buffer, source_of(*tensor, first, static_cast<std::uint32_t>(shard_files[0])), std::nullopt,
                     kind_of(*tensor)});
    }
  };

  check_training_checkpoint(first, state_dict);
  if (!is_flattened(first, prefix)) {
    // Already consolidated (or never sharded): the tensors as they are; ties
    // (one tensor under two keys) stay ties.
    if (const StoredTensor* nested = nested_tensor(first, prefix)) {
      throw Error(Location{first.path, nested->path, std::nullopt},
                  fmt::format("a tensor inside a container inside the '{}' state dict: a state dict maps keys "
                              "to tensors",
                              state_dict));
    }
    // A value that is not a tensor (an int, a dict) would be left out of the
    // output: refused, never dropped.
    const nlohmann::ordered_json* model =
        first.objects->is_object() && first.objects->contains(state_dict) ? &(*first.objects)[state_dict] : nullptr;
    if (model != nullptr && model->is_object()) {
      for (const auto& item : model->items()) {
        bool tensor = item.value().is_object() && item.value().contains("$tensor");
        if (!tensor) {
          throw Error(Location{first.path, state_dict_path(prefix, item.key()), std::nullopt},
                      fmt::format("a value that is not a tensor in the '{}' state dict: stitch and reshard write "
                                  "tensors only",
                                  state_dict));
        }
      }
    }
    for (const auto& [key, tensor] : state_dict_tensors(first, prefix)) {
      // "~~" labels: a key no str spells (a tuple), or the second of two keys
      // that print alike (the int 3 beside the str "3"); writing either back
      // as a str key would rename or overwrite a tensor.
      std::string_view label = std::string_view(tensor->path).substr(prefix.size());
      if (label.find("~~") != std::string_view::npos && label != kEmptyKeyLabel) {
        throw Error(Location{first.path, tensor->path, std::nullopt},
                    fmt::format("a key of the '{}' state dict that is not a str, or that prints like another key "
                                "(the int 3 and the str '3'): a state dict maps str keys to tensors",
                                state_dict));
      }
    }
    // A tie pickled as two tensor objects over one storage (model.state_dict()
    // does that) is a tie too: the second key an alias of the first.
    DistinctViews views;
    for (const auto& [key, tensor] : state_dict_tensors(first, prefix)) {
      taken.insert(key);
      const StoredTensor* tie = !tensor->alias_of ? views.tied_to(*tensor) : nullptr;
      if (tie != nullptr) {
        out.push_back({key, {}, unescape_label(std::string_view(tie->path).substr(prefix.size()))});
      } else if (tensor->alias_of && tensor->alias_of->starts_with(prefix)) {
        out.push_back({key, {}, unescape_label(std::string_view(*tensor->alias_of).substr(prefix.size()))});
      } else {
        out.push_back({key, source_of(*tensor, first, static_cast<std::uint32_t>(shard_files[0])), std::nullopt,
                       kind_of(*tensor)});
      }
    }
    if (prefix != kModelPrefix) {
      // Buffers an EMA copy lacks: those shard_metadata names, else whatever the
      // model has that the copy does not.
      std::vector<std::string> buffers;
      if (first.fsdp) {
        buffers = first.fsdp->buffer_names;
      } else {
        for (const auto& [key, tensor] : state_dict_tensors(first, std::string(kModelPrefix))) buffers.push_back(key);
      }
      add_buffers(buffers);
    }
    return out;
  }

  out = unflatten(manifest, shard_files,
                  [&](const FlatParamMeta& flat, std::size_t) { return state_dict_path(prefix, flat.state_key); });
  for (const NamedTensor& tensor : out) taken.insert(tensor.name);
  // Tied parameters: every instance's pairs (fairscale itself reads only the last
  // instance's, and so loses the tie when the root comes first).
  // fairscale fails on a tie or a buffer the state dict lacks (KeyError); a tie
  // onto a parameter of its own would replace it.
  const FsdpMetadata& metadata = *first.fsdp;
  auto bad = [&](const std::string& field, const std::string& message) {
    return Error(Location{first.path, "shard_metadata/" + field, std::nullopt}, message);
  };
  std::map<std::string, std::string> ties;  // to -> from
  for (const FsdpInstanceMeta& instance : metadata.instances) {
    for (const auto& [src, dst] : instance.shared_param_info) {
      std::string from = fsdp_key(instance.fsdp_path, src);
      std::string to = fsdp_key(instance.fsdp_path, dst);
      if (taken.count(from) == 0) {
        throw bad("shared_param_info", fmt::format("ties {} to {}, which no flat parameter holds", to, from));
      }
      if (auto it = ties.find(to); it != ties.end() && it->second == from) continue;  // listed again
      if (!taken.insert(to).second) {
        throw bad("shared_param_info", fmt::format("ties {} to {}, but {} is a parameter of its own", to, from, to));
      }
      ties.emplace(to, from);
      out.push_back({to, {}, from});
    }
  }
  for (const std::string& buffer : metadata.buffer_names) {
    if (find_tensor(first, state_dict_path(prefix, buffer)) == nullptr &&
        find_tensor(first, state_dict_path(kModelPrefix, buffer)) == nullptr) {
      throw bad("buffer_names", fmt::format("lists {}, which the state dict does not hold", buffer));
    }
  }
  add_buffers(metadata.buffer_names);
  return out;
}

namespace {

// Counted once over the model parts: what every part holds a copy of.
bool once_per_model(const std::string& key) {
  MpRule rule = megatron_rule(key);
  return rule == MpRule::Replicated || rule == MpRule::Copied || rule == MpRule::Placeholder;
}

}  // namespace

ModelCounts count_model(const Manifest& manifest) {
  return input_layout(manifest).count_model(manifest);
}

ModelCounts count_safetensors_model(const Manifest& manifest) {
  // One state dict, spread over the files.
  ModelCounts counts;
  counts.counted_from = "the safetensors state dict";
  for (const ManifestFile& file : manifest.files) {
    for (const auto& [key, tensor] : state_dict_tensors(file, std::string(kModelPrefix))) {
      (is_buffer(key, *tensor, nullptr) ? counts.buffers : counts.parameters) += tensor->numel();
    }
  }
  return counts;
}

ModelCounts count_torch_model(const Manifest& manifest) {
  ModelCounts counts;
  for (const ManifestFile& file : manifest.files) {
    for (const StoredTensor& t : file.tensors) {
      if (!t.alias_of && tensor_section(t) == "optimizer_state") counts.optimizer_state += t.numel();
    }
  }
  // One file per model part: its first shard.
  for (std::size_t m = 0; m < manifest.grid.cells.size(); ++m) {
    const auto& row = manifest.grid.cells[m];
    auto present = std::find_if(row.begin(), row.end(), [](int index) { return index >= 0; });
    if (present == row.end()) continue;
    const ManifestFile& file = manifest.files.at(static_cast<std::size_t>(*present));
    const FsdpMetadata* fsdp = file.fsdp ? &*file.fsdp : nullptr;
    DistinctViews counted;  // a tie pickled as two tensor objects counts once
    auto count = [&](const std::string& key, const StoredTensor& tensor) {
      if (tensor.alias_of || (m > 0 && once_per_model(key)) || !counted.insert(tensor)) return;
      (is_buffer(key, tensor, fsdp) ? counts.buffers : counts.parameters) += tensor.numel();
    };
    const std::string prefix(kModelPrefix);
    if (is_flattened(file, prefix)) {
      counts.counted_from = "FSDP shard_metadata";
      for (const FsdpInstanceMeta& instance : fsdp->instances) {
        for (const FlatParamMeta& flat : instance.flat_params) {
          for (std::size_t i = 0; i < flat.names.size() && i < flat.numels.size(); ++i) {
            std::string key = fsdp_key(instance.fsdp_path, flat.names[i]);
            if (m == 0 || !once_per_model(key)) counts.parameters += static_cast<std::uint64_t>(flat.numels[i]);
          }
        }
      }
      for (const std::string& buffer : fsdp->buffer_names) {
        if (const StoredTensor* tensor = find_tensor(file, state_dict_path(prefix, buffer))) count(buffer, *tensor);
      }
    } else if (auto model = state_dict_tensors(file, prefix); !model.empty()) {
      counts.counted_from = "the model state dict";
      for (const auto& [key, tensor] : model) count(key, *tensor);
    } else {
      counts.counted_from = "every tensor";
      for (const StoredTensor& t : file.tensors) {
        if (tensor_section(t) != "optimizer_state") count(unescape_label(t.path), t);
      }
    }
  }
  return counts;
}

}  // namespace ckpt
