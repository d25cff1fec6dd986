#include "ckpt/plan/export.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "ckpt/format/safetensors.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/output_formats.hpp"
#include "ckpt/plan/stitch.hpp"

namespace ckpt {

using json = nlohmann::ordered_json;

namespace {

std::uint64_t output_nbytes(const NamedTensor& tensor) {
  return tensor.source.numel() * dtype_info(tensor.dtype()).itemsize;
}

// transformers' shard_checkpoint: in order, a new file when the next tensor
// would take the current one past the limit.
std::vector<std::vector<const NamedTensor*>> fill_shards(const std::vector<const NamedTensor*>& tensors,
                                                         std::uint64_t max_shard_bytes) {
  std::vector<std::vector<const NamedTensor*>> shards(1);
  std::uint64_t used = 0;
  for (const NamedTensor* tensor : tensors) {
    std::uint64_t nbytes = output_nbytes(*tensor);
    if (max_shard_bytes != 0 && !shards.back().empty() && used + nbytes > max_shard_bytes) {
      shards.emplace_back();
      used = 0;
    }
    shards.back().push_back(tensor);
    used += nbytes;
  }
  return shards;
}

// One safetensors file of `tensors`: the header record, then one record per tensor.
PlannedFile plan_one_file(std::string path, std::vector<const NamedTensor*> tensors,
                          const std::vector<std::uint32_t>& sources, std::vector<NamedTensor>& laid_out) {
  // Largest elements first: with the data at a multiple of 8, every tensor starts
  // at a multiple of its element size.
  std::stable_sort(tensors.begin(), tensors.end(), [](const NamedTensor* a, const NamedTensor* b) {
    return dtype_info(a->dtype()).itemsize > dtype_info(b->dtype()).itemsize;
  });
  PlannedFile file;
  file.path = std::move(path);
  file.container = Container::Concatenated;
  std::vector<SafetensorsTensor> header;
  std::uint64_t at = 0;
  for (const NamedTensor* tensor : tensors) {
    std::uint64_t nbytes = output_nbytes(*tensor);
    header.push_back({tensor->name, tensor->dtype(), tensor->source.shape, at, at + nbytes});
    at += nbytes;
  }
  PlannedRecord head;
  head.name = "header";
  head.inline_bytes = render_safetensors_header(header, json{{"format", "pt"}});
  head.nbytes = head.inline_bytes.size();
  file.records.push_back(std::move(head));
  for (const NamedTensor* tensor : tensors) {
    PlannedRecord record = plan_tensor_record(*tensor, sources);
    record.name = tensor->name;
    file.records.push_back(std::move(record));
    laid_out.push_back(*tensor);
  }
  return file;
}

}  // namespace

std::string safetensors_index_path(const std::string& path) {
  return path + ".index.json";
}

PlannedFile plan_text_file(std::string path, std::string_view text) {
  PlannedFile file;
  file.path = std::move(path);
  file.container = Container::Concatenated;
  PlannedRecord record;
  record.name = std::filesystem::path(file.path).filename().string();
  record.inline_bytes.resize(text.size());
  std::transform(text.begin(), text.end(), record.inline_bytes.begin(), [](char c) { return std::byte(c); });
  record.nbytes = text.size();
  file.records.push_back(std::move(record));
  return file;
}

std::vector<std::vector<NamedTensor>> plan_safetensors(const std::vector<NamedTensor>& tensors,
                                                       const SafetensorsTarget& target,
                                                       const std::vector<std::uint32_t>& sources, Plan& plan) {
  std::vector<const NamedTensor*> kept;
  std::set<std::string_view> names;
  for (const NamedTensor& tensor : tensors) {
    if (tensor.alias_of) continue;  // the tie's data is written under the name it ties to
    if (!safetensors_dtype_name(tensor.dtype())) {
      throw Error(Location{"", tensor.name, std::nullopt},
                  fmt::format("{} has no safetensors dtype", dtype_info(tensor.dtype()).name));
    }
    if (tensor.name == "__metadata__") {
      throw Error(Location{"", tensor.name, std::nullopt}, "a safetensors file cannot hold a tensor of this name");
    }
    if (!names.insert(tensor.name).second) {
      throw Error(Location{"", tensor.name, std::nullopt}, "two tensors of the state dict have this name");
    }
    kept.push_back(&tensor);
  }
  std::vector<std::vector<const NamedTensor*>> shards = fill_shards(kept, target.max_shard_bytes);
  std::vector<std::vector<NamedTensor>> out;
  if (shards.size() == 1) {
    out.emplace_back();
    plan.files.push_back(plan_one_file(target.path, shards[0], sources, out.back()));
    return out;
  }
  std::filesystem::path path(target.path);
  std::string stem = path.stem().string();
  SafetensorsIndex index;
  std::uint64_t total = 0;
  for (std::size_t k = 0; k < shards.size(); ++k) {
    std::string name = safetensors_shard_name(stem, k + 1, shards.size());
    for (const NamedTensor* tensor : shards[k]) {
      index.weight_map.emplace_back(tensor->name, name);
      total += output_nbytes(*tensor);
    }
    out.emplace_back();
    plan.files.push_back(plan_one_file((path.parent_path() / name).string(), shards[k], sources, out.back()));
  }
  index.total_size = total;
  plan.files.push_back(plan_text_file(safetensors_index_path(target.path), render_safetensors_index(index)));
  out.emplace_back();
  return out;
}

std::vector<std::string> stale_set_files(const Plan& plan, const std::vector<std::string>& outputs, bool folder) {
  std::set<std::string> written;
  for (const PlannedFile& file : plan.files) written.insert(std::filesystem::absolute(file.path).lexically_normal());
  std::vector<std::string> stale;
  for (const std::string& output : outputs) {
    std::filesystem::path path =
        folder ? std::filesystem::path(output) / "model.safetensors" : std::filesystem::path(output);
    std::filesystem::path dir = std::filesystem::absolute(path).lexically_normal().parent_path();
    std::string stem = path.stem().string();
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      std::string name = entry.path().filename().string();
      bool ours = name == stem + ".safetensors" || name == stem + ".safetensors.index.json" ||
                  safetensors_shard_stem(name) == std::optional<std::string_view>(stem);
      if (ours && written.count(entry.path().lexically_normal().string()) == 0) stale.push_back(entry.path().string());
    }
  }
  std::sort(stale.begin(), stale.end());
  return stale;
}

void plan_safetensors_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out) {
  for (const NamedTensor& tensor : output.tensors) {
    if (!tensor.alias_of) continue;
    out.notes.push_back(
        fmt::format("{} is tied to {}: safetensors holds the tensor once, under {} (tie it "
                    "again when loading, as transformers' tie_weights does)",
                    tensor.name, *tensor.alias_of, *tensor.alias_of));
  }
  for (auto& file : plan_safetensors(output.tensors, {output.path, options.max_shard_bytes}, output.sources, out.plan))
    out.tensors.push_back(options.list_tensors ? std::move(file) : std::vector<NamedTensor>{});
}

}  // namespace ckpt
