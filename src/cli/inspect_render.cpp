// The renderers of `inspect`: text (a summary, the grid, an object tree, a
// tensor table) and JSON.
#include "inspect_render.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>
#include <ostream>
#include <set>

#include "ckpt/format/python_globals.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "inputs.hpp"

namespace ckpt::cli {

using json = nlohmann::ordered_json;

namespace {

// Tensors and their bytes, counted two ways: storage bytes are what the files
// hold (each storage once, whole, however many views it has); tensor bytes are
// numel x element size of each tensor (a tie once).
struct ByteCounts {
  std::uint64_t tensors = 0;  // tensors counted (a tie once)
  std::uint64_t tensor_bytes = 0;
  std::uint64_t storage_bytes = 0;
};

struct Summary {
  ModelCounts counts;
  std::map<std::string, ByteCounts> by_dtype;
  std::map<std::string, ByteCounts> by_section;
};

Summary summarize(const Manifest& manifest) {
  Summary summary;
  summary.counts = count_model(manifest);
  // Files that share a tensor list are counted by list: 992 shards hold a few lists.
  std::map<const void*, std::pair<const TensorList*, std::uint64_t>> lists;  // identity -> (list, files)
  for (const ManifestFile& file : manifest.files) {
    auto& [list, files] = lists[file.tensors.identity()];
    list = &file.tensors;
    ++files;
  }
  for (const auto& [identity, entry] : lists) {
    const auto& [list, files] = entry;
    std::set<std::string_view> storages;
    DistinctViews views;
    for (const StoredTensor& t : *list) {
      if (t.alias_of || !views.insert(t)) continue;  // tied: the same tensor
      for (ByteCounts* counts :
           {&summary.by_dtype[std::string(dtype_info(t.dtype).name)], &summary.by_section[tensor_section(t)]}) {
        counts->tensors += files;
        counts->tensor_bytes += t.numel() * dtype_info(t.dtype).itemsize * files;
        if (!storages.contains(t.storage_key)) counts->storage_bytes += t.storage_nbytes * files;
      }
      storages.insert(t.storage_key);
    }
  }
  return summary;
}

// "13.5 MiB", or "108 B of storage, 432 B of tensors" when they differ.
std::string bytes_text(const ByteCounts& counts) {
  if (counts.storage_bytes == counts.tensor_bytes) return human_bytes(counts.storage_bytes);
  return fmt::format("{} of storage, {} of tensors", human_bytes(counts.storage_bytes),
                     human_bytes(counts.tensor_bytes));
}

json bytes_json(const ByteCounts& counts) {
  return {{"tensors", counts.tensors}, {"storage_bytes", counts.storage_bytes}, {"tensor_bytes", counts.tensor_bytes}};
}

std::string scalar_text(const json& value) {
  if (value.is_string()) return fmt::format("'{}'", printable(value.get<std::string>()));
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

class TreePrinter {
 public:
  TreePrinter(const ManifestFile& file, std::ostream& out) : file_(file), out_(out) {}

  // Labels, class names and strings come from the file: escaped by `printable`.
  void print(const json& node, const std::string& raw_label, int indent) {
    std::string pad(static_cast<std::size_t>(indent) * 2, ' ');
    const std::string label = printable(raw_label);
    if (auto tensor = tensor_text(node)) {
      out_ << pad << label << ": " << *tensor << "\n";
      return;
    }
    if (!node.is_object() && !node.is_array()) {
      out_ << pad << label << ": " << scalar_text(node) << "\n";
      return;
    }
    if (node.is_object() && node.contains("$ref")) {
      out_ << pad << label << ": (same object as " << printable(node["$ref"].get<std::string>()) << ")\n";
      return;
    }
    json children = node;
    std::string kind = node.is_array() ? fmt::format("list of {}", node.size()) : "";
    if (node.is_object() && node.contains("$class")) {
      kind = printable(node["$class"].get<std::string>());
      if (node.contains("value"))
        children = node["value"];
      else if (node.contains("attributes"))
        children = node["attributes"];
      if (is_qualified_name(kind, py::kTorchSize) && children.is_array()) {
        out_ << pad << label << ": torch.Size" << children.dump() << "\n";
        return;
      }
    }
    if (children.is_object()) children.erase("$class");
    std::size_t tensors = 0;
    std::set<std::size_t> distinct;  // a tied tensor is counted once
    std::uint64_t tensor_bytes = 0;
    for (const auto& item : children.items()) {
      if (item.value().is_object() && item.value().contains("$tensor")) {
        ++tensors;
        std::size_t index = item.value()["$tensor"].get<std::size_t>();
        const StoredTensor& t = file_.tensors.at(index);
        if (distinct.insert(index).second) tensor_bytes += t.numel() * dtype_info(t.dtype).itemsize;
      }
    }
    std::string header = pad + label + ":" + (kind.empty() ? "" : " " + kind);
    if (tensors > 8 && tensors == children.size()) {
      out_ << header << fmt::format(" ({} tensors, {} of tensors)\n", tensors, human_bytes(tensor_bytes));
      return;
    }
    if (indent >= kMaxIndent) {
      out_ << header << fmt::format(" ({} entries)\n", children.size());
      return;
    }
    out_ << header << (children.empty() ? " (empty)" : "") << "\n";
    std::size_t shown = 0;
    for (const auto& item : children.items()) {
      if (++shown > kMaxChildren) {
        out_ << pad << "  ... " << children.size() - kMaxChildren << " more\n";
        break;
      }
      print(item.value(), item.key(), indent + 1);
    }
  }

 private:
  static constexpr int kMaxIndent = 5;
  static constexpr std::size_t kMaxChildren = 40;

  std::optional<std::string> tensor_text(const json& node) const {
    if (!node.is_object() || !node.contains("$tensor")) return std::nullopt;
    const StoredTensor& t = file_.tensors.at(node["$tensor"].get<std::size_t>());
    return fmt::format("tensor {} {}", dtype_info(t.dtype).name, shape_text(t.shape));
  }

  const ManifestFile& file_;
  std::ostream& out_;
};

// The size of the file in each cell, [part][shard]; nullopt when missing.
std::vector<std::vector<std::optional<std::uint64_t>>> cell_sizes(const Manifest& manifest) {
  std::vector<std::vector<std::optional<std::uint64_t>>> sizes;
  for (const std::vector<int>& part : manifest.grid.cells) {
    auto& row = sizes.emplace_back();
    for (int index : part) {
      row.push_back(index < 0
                        ? std::nullopt
                        : std::optional<std::uint64_t>(manifest.files[static_cast<std::size_t>(index)].size_bytes));
    }
  }
  return sizes;
}

// [part][shard] -> the file's size in bytes, null when missing: the table `--wide` prints.
json sizes_json(const Manifest& manifest) {
  json out = json::array();
  for (const auto& part : cell_sizes(manifest)) {
    json row = json::array();
    for (const auto& size : part) row.push_back(size ? json(*size) : json(nullptr));
    out.push_back(std::move(row));
  }
  return out;
}

// Every shard's size, a column each.
void print_grid_table(const Manifest& manifest, std::ostream& out) {
  const Grid& grid = manifest.grid;
  const auto sizes = cell_sizes(manifest);
  out << "        ";
  for (int d = 0; d < grid.dp; ++d) out << fmt::format(" {:>9}", fmt::format("shard{}", d));
  out << "\n";
  for (int m = 0; m < grid.mp; ++m) {
    out << fmt::format("  part{:<2}", m);
    for (const auto& size : sizes[static_cast<std::size_t>(m)])
      out << fmt::format(" {:>9}", size ? human_bytes(*size) : "MISSING");
    out << "\n";
  }
}

// One line per part: its shard count, the range of their sizes, and the shards
// that stand out: missing, or more than 1% (at least 4 KiB) off the part's
// median size. Shards of one part differ by a few bytes (names, padding);
// a truncated or foreign file does not.
void print_grid_parts(const Manifest& manifest, std::ostream& out) {
  constexpr std::size_t kNamed = 4;  // standing-out shards named per part
  const auto sizes = cell_sizes(manifest);
  for (std::size_t m = 0; m < sizes.size(); ++m) {
    std::vector<std::uint64_t> present;
    for (const auto& size : sizes[m]) {
      if (size) present.push_back(*size);
    }
    std::string line = fmt::format("  part{:<3} ", m);
    line += present.size() == sizes[m].size() ? fmt::format("{} shards", present.size())
                                              : fmt::format("{} of {} shards", present.size(), sizes[m].size());
    std::uint64_t median = 0;
    if (!present.empty()) {
      std::vector<std::uint64_t> sorted = present;
      std::sort(sorted.begin(), sorted.end());
      median = sorted[sorted.size() / 2];
      std::string low = human_bytes(sorted.front());
      std::string high = human_bytes(sorted.back());
      line += low == high ? fmt::format(", {} each", low) : fmt::format(", {} to {}", low, high);
    }
    const std::uint64_t tolerance = std::max<std::uint64_t>(median / 100, 4096);
    std::vector<std::string> standing_out;
    std::size_t count = 0;
    for (std::size_t d = 0; d < sizes[m].size(); ++d) {
      const auto& size = sizes[m][d];
      bool odd = !size || (*size > median ? *size - median : median - *size) > tolerance;
      if (!odd) continue;
      if (++count <= kNamed)
        standing_out.push_back(fmt::format("shard{} {}", d, size ? human_bytes(*size) : "MISSING"));
    }
    if (count > kNamed) standing_out.push_back(fmt::format("and {} more", count - kNamed));
    if (!standing_out.empty()) line += fmt::format("; stand out: {}", fmt::join(standing_out, ", "));
    out << line << "\n";
  }
  out << "  (a line per part; --wide shows every shard's size)\n";
}

void print_grid(const Manifest& manifest, bool wide, std::ostream& out) {
  const Grid& grid = manifest.grid;
  if (const InputLayout& layout = input_layout(manifest); !layout.training) {
    out << fmt::format("format: {}, one state dict in {} file(s) (no training layout)\n", layout.name,
                       manifest.files.size());
    if (layout.summary != nullptr) {
      for (const std::string& line : layout.summary(manifest)) out << "  " << printable(line) << "\n";
    }
    return;
  }
  bool fsdp = !manifest.files.empty() && static_cast<bool>(manifest.files[0].fsdp);
  out << fmt::format("grid: {} model-parallel part(s) x {} data-parallel shard(s){}\n", grid.mp, grid.dp,
                     fsdp ? ", FSDP-flattened" : "");
  if (grid.mp * grid.dp <= 1) return;
  if (wide || grid.dp <= kMaxTableShards) {
    print_grid_table(manifest, out);
  } else {
    print_grid_parts(manifest, out);
  }
}

// What stitch and reshard would say of it, shown here too (it is no problem of the file itself).
bool is_training(const Manifest& manifest) {
  return manifest.files.empty() || is_training_checkpoint(manifest.files[0]);
}

bool selected(const InspectRequest& request, const StoredTensor& t) {
  return request.filter == nullptr || std::regex_search(t.path, *request.filter);
}

// Files, sizes, grid, parameter count and bytes by dtype and by section.
void print_summary(const Manifest& manifest, bool wide, std::ostream& out) {
  Summary summary = summarize(manifest);
  std::uint64_t total = 0;
  for (const ManifestFile& file : manifest.files) total += file.size_bytes;
  out << fmt::format("{} file(s), {}\n", manifest.files.size(), human_bytes(total));
  print_grid(manifest, wide, out);
  if (input_layout(manifest).training && !is_training(manifest)) {  // (a layout that is none says so above)
    out << fmt::format(
        "not a training checkpoint: {} (reshard refuses it; stitch writes a dict of tensors as "
        "safetensors or dcp)\n",
        printable(describe_contents(manifest.files[0])));
  }
  const ModelCounts& counts = summary.counts;
  out << fmt::format(
      "parameters: {} (from {}{})\n", grouped(counts.parameters),
      counts.counted_from.empty() ? "no tensor" : counts.counted_from,
      manifest.grid.mp > 1
          ? fmt::format("; a replicated tensor once over the {} model parts, as after stitch", manifest.grid.mp)
          : "");
  out << fmt::format("buffers: {} element(s)\n", grouped(counts.buffers));
  if (counts.optimizer_state > 0)
    out << fmt::format("optimizer state: {} element(s) as stored\n", grouped(counts.optimizer_state));
  // (stored tensors: each file's, so a copy in every shard counts each time, and a DCP set's chunks)
  out << "bytes by dtype (storage bytes: what the files hold; tensor bytes: numel x element size):\n";
  for (const auto& [dtype, counts] : summary.by_dtype) {
    out << fmt::format("  {:<10} {:>12}  in {} stored tensor(s)\n", dtype, bytes_text(counts), counts.tensors);
  }
  out << "bytes by section:\n";
  for (const auto& [section, counts] : summary.by_section) {
    out << fmt::format("  {:<16} {:>12}\n", section, bytes_text(counts));
  }
}

void print_problems(const Manifest& manifest, std::ostream& out) {
  if (manifest.grid.problems.empty()) {
    out << "problems: none found\n";
    return;
  }
  out << fmt::format("problems ({}):\n", manifest.grid.problems.size());
  for (const std::string& problem : manifest.grid.problems) out << "  " << printable(problem) << "\n";
}

// The first file's objects, as a tree.
void print_objects(const Manifest& manifest, std::ostream& out) {
  if (manifest.files.empty()) return;
  const ManifestFile& first = manifest.files[0];
  out << "objects of " << printable(std::filesystem::path(first.path).filename().string()) << ":\n";
  TreePrinter printer(first, out);
  if (first.objects->is_object() && !first.objects->contains("$class")) {
    for (const auto& item : first.objects->items()) printer.print(item.value(), item.key(), 1);
  } else {
    printer.print(*first.objects, "<root>", 1);
  }
}

void print_tensor_table(const Manifest& manifest, const InspectRequest& request, std::ostream& out) {
  out << fmt::format("{:<60} {:<9} {:<18} {:>10}  {}\n", "tensor", "dtype", "shape", "bytes", "file @ offset");
  for (const ManifestFile& file : manifest.files) {
    std::string name = printable(std::filesystem::path(file.path).filename().string());
    for (const StoredTensor& t : file.tensors) {
      if (!selected(request, t)) continue;
      out << fmt::format("{:<60} {:<9} {:<18} {:>10}  {} @ 0x{:x}\n", printable(t.path), dtype_info(t.dtype).name,
                         shape_text(t.shape), t.nbytes, name, file.place(t).file_byte_offset);
    }
  }
}

json tensor_list_json(const Manifest& manifest, const InspectRequest& request) {
  json list = json::array();
  for (const ManifestFile& file : manifest.files) {
    for (const StoredTensor& t : file.tensors) {
      if (!selected(request, t)) continue;
      list.push_back({{"file", file.path},
                      {"path", t.path},
                      {"dtype", dtype_info(t.dtype).name},
                      {"shape", t.shape},
                      {"nbytes", t.nbytes},
                      {"file_byte_offset", file.place(t).file_byte_offset}});
    }
  }
  return list;
}

}  // namespace

void print_inspect_text(const Manifest& manifest, const InspectRequest& request, std::ostream& out) {
  print_summary(manifest, request.wide, out);
  print_problems(manifest, out);
  print_objects(manifest, out);
  if (request.tensors) print_tensor_table(manifest, request, out);
}

json inspect_json(const Manifest& manifest, const InspectRequest& request) {
  Summary summary = summarize(manifest);
  bool training = is_training(manifest);
  json out = {{"files", manifest.files.size()},
              {"format", input_layout(manifest).name},
              {"grid",
               {{"mp", manifest.grid.mp},
                {"dp", manifest.grid.dp},
                {"cells", manifest.grid.cells},
                {"size_bytes", sizes_json(manifest)}}},
              {"fsdp", !manifest.files.empty() && static_cast<bool>(manifest.files[0].fsdp)},
              {"parameters", summary.counts.parameters},
              {"buffers", summary.counts.buffers},
              {"optimizer_state_elements", summary.counts.optimizer_state},
              {"counted_from", summary.counts.counted_from},
              {"training_checkpoint", training},
              {"problems", manifest.grid.problems}};
  if (!training) out["contents"] = describe_contents(manifest.files[0]);
  // What the layout says of the set (a DCP directory's writer, a DeepSpeed save's stage and world), as the text.
  if (const InputLayout& layout = input_layout(manifest); layout.summary != nullptr && !manifest.files.empty()) {
    out["layout_summary"] = layout.summary(manifest);
  }
  for (const auto& [dtype, counts] : summary.by_dtype) out["bytes_by_dtype"][dtype] = bytes_json(counts);
  for (const auto& [section, counts] : summary.by_section) out["bytes_by_section"][section] = bytes_json(counts);
  if (!manifest.files.empty()) out["objects"] = *manifest.files[0].objects;
  if (request.tensors) out["tensors"] = tensor_list_json(manifest, request);
  return out;
}

}  // namespace ckpt::cli
