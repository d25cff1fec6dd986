// --format dcp: a PyTorch Distributed Checkpoint directory that torch's DCP
// loader reads into any world size (it reshards at load), as one rank saving
// the whole state dict writes it: every item a torch.save archive in a data
// file `__0_<n>.distcp` (one file, or with --max-shard-size as many as it
// takes), a tensor as one chunk covering it (with --max-shard-size, a tensor
// larger than it as chunks of whole rows), an object item (a DCP input's)
// as its object decoded and pickled again. `.metadata` (torch 2.x's classes
// and fields, planner_data giving each key's nesting) is the plan's last file,
// so the commit renames it last: a directory without it is no checkpoint to a
// reader.
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "ckpt/format/dcp.hpp"
#include "ckpt/layout/boxes.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/nested_output.hpp"
#include "ckpt/plan/output_formats.hpp"
#include "ckpt/plan/stitch.hpp"

namespace ckpt {

namespace {

constexpr std::string_view kItemArchive = "archive";  // what torch.save into a stream names it
constexpr std::string_view kDcpVersion = "1.0.0";     // torch 2.6's writer's

// A state dict of another layout as items: each tensor under its key, at the
// top level; a tie its own item holding the tensor it is tied to, as DCP saves
// a model's tied weights.
std::vector<NestedItem> flat_items(const std::vector<NamedTensor>& tensors) {
  std::vector<NestedItem> items;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    NestedItem item;
    item.key = tensors[i].name;
    item.path = {item.key};
    item.tensor = i;
    items.push_back(std::move(item));
  }
  return items;
}

// `tensor` as the chunks it is written in: one box covering it, or with
// `max_bytes` (--max-shard-size) a tensor larger than that cut into boxes of
// whole rows (dim 0), each at most `max_bytes` but for a row larger alone.
std::vector<std::pair<Box, NamedTensor>> row_chunks(const NamedTensor& tensor, std::uint64_t max_bytes) {
  const std::vector<std::int64_t>& shape = tensor.source.shape;
  const std::uint64_t out_bytes = tensor.source.numel() * dtype_info(tensor.dtype()).itemsize;
  if (max_bytes == 0 || out_bytes <= max_bytes || shape.empty() || shape[0] <= 1) {
    return {{Box{std::vector<std::int64_t>(shape.size(), 0), shape}, tensor}};
  }
  const auto rows = static_cast<std::uint64_t>(shape[0]);
  const std::uint64_t rows_per_chunk = std::max<std::uint64_t>(1, max_bytes / (out_bytes / rows));
  const std::uint64_t source_row_bytes = tensor.source.nbytes() / rows;
  std::vector<std::pair<Box, NamedTensor>> out;
  for (std::uint64_t first = 0; first < rows; first += rows_per_chunk) {
    Box box{std::vector<std::int64_t>(shape.size(), 0), shape};
    box.offsets[0] = static_cast<std::int64_t>(first);
    box.sizes[0] = static_cast<std::int64_t>(std::min(rows_per_chunk, rows - first));
    NamedTensor chunk = tensor;
    chunk.source = tensor.source.slice(first * source_row_bytes,
                                       static_cast<std::uint64_t>(box.sizes[0]) * source_row_bytes, box.sizes);
    out.emplace_back(std::move(box), std::move(chunk));
  }
  return out;
}

// The data files the DCP checkpoint in `folder` names, by name, sorted: none
// when the folder holds no .metadata or one that does not read (nothing is
// removed that no checkpoint there names).
std::vector<std::string> earlier_data_files(const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path path = fs::path(folder) / ".metadata";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return {};
  std::vector<std::string> names;
  try {
    names = dcp_data_files(read_dcp_metadata_file(path.string()));
  } catch (const Error&) {
    return {};
  }
  std::vector<std::string> out;
  for (const std::string& name : names) {
    if (name != ".metadata" && fs::is_regular_file(fs::symlink_status(fs::path(folder) / name, ec)))
      out.push_back(name);
  }
  return out;
}

}  // namespace

void plan_dcp_state_dict(StateDictOutput output, const StitchOptions& options, StitchPlan& out) {
  namespace fs = std::filesystem;
  std::vector<NestedItem> flat;
  if (output.nested == nullptr) flat = flat_items(output.tensors);
  const std::vector<NestedItem>& items = output.nested != nullptr ? output.nested->items : flat;
  // Paths a loader could not nest are refused here as for a torch output, not passed on.
  if (output.nested != nullptr) check_nesting(items, output.nested->items_from);
  std::map<std::string, std::size_t> by_name;  // ties resolve to the tensor they share
  for (std::size_t i = 0; i < output.tensors.size(); ++i) by_name.emplace(output.tensors[i].name, i);

  DcpMetadata metadata;
  metadata.version = std::string(kDcpVersion);
  std::vector<PlannedFile> data_files;
  std::vector<std::uint64_t> data_bytes;  // each data file's items' bytes so far
  // Where each archive went: its data file and index there, and the chunk (or
  // object item: chunk SIZE_MAX) of metadata.tensors / objects it holds.
  struct Placed {
    std::size_t file, archive, entry, chunk;
  };
  std::vector<Placed> placed;
  auto add_archive = [&](CheckpointBuilder& builder, pickle::NodeId value, std::size_t entry, std::size_t chunk) {
    PlannedFile archive = builder.finish_value("", std::string(kItemArchive), value, output.sources);
    const std::uint64_t size = layout_file(archive).file_size;
    // --max-shard-size: a new data file when this item would pass it
    if (data_files.empty() ||
        (options.max_shard_bytes > 0 && data_bytes.back() > 0 && data_bytes.back() + size > options.max_shard_bytes)) {
      PlannedFile file;
      file.path = (fs::path(output.path) / fmt::format("__0_{}.distcp", data_files.size())).string();
      file.container = Container::Archives;
      data_files.push_back(std::move(file));
      data_bytes.push_back(0);
    }
    PlannedFile& file = data_files.back();
    placed.push_back({data_files.size() - 1, file.archives.size(), entry, chunk});
    file.archives.push_back(file.records.size());
    for (PlannedRecord& record : archive.records) file.records.push_back(std::move(record));
    data_bytes.back() += size;
  };
  for (std::size_t n = 0; n < items.size(); ++n) {
    const NestedItem& item = items[n];
    metadata.planner_data.emplace_back(item.key, std::vector<DcpPathElement>(item.path.begin(), item.path.end()));
    if (!item.tensor) {
      check_invariant(output.files != nullptr, "an object item planned without its input files");
      CheckpointBuilder builder;
      metadata.objects.push_back({item.key, {}, n});
      add_archive(builder, add_object_item(builder, item, *output.files), metadata.objects.size() - 1, SIZE_MAX);
      continue;
    }
    NamedTensor tensor = output.tensors.at(*item.tensor);
    if (tensor.alias_of) {
      auto target = by_name.find(*tensor.alias_of);
      if (target == by_name.end()) {
        throw Error(fmt::format("{}: tied to {}, which is not in the state dict", tensor.name, *tensor.alias_of));
      }
      untie(tensor, output.tensors[target->second]);
    }
    tensor.kind = {};  // a chunk is a plain tensor
    DcpTensor entry;
    entry.key = item.key;
    entry.dtype = tensor.dtype();
    entry.size = tensor.source.shape;
    entry.position = n;
    metadata.tensors.push_back(entry);
    for (auto& [box, chunk] : row_chunks(tensor, options.max_shard_bytes)) {
      metadata.tensors.back().chunks.push_back({box.offsets, box.sizes, {}});
      CheckpointBuilder builder;
      add_archive(builder, builder.add_tensor(chunk), metadata.tensors.size() - 1,
                  metadata.tensors.back().chunks.size() - 1);
    }
  }
  // Each archive's place: its first byte and size in its data file.
  std::vector<std::vector<ArchiveLayout>> layouts;
  for (const PlannedFile& file : data_files) layouts.push_back(archive_layouts(file));
  for (const Placed& at : placed) {
    DcpItemPlace place{fs::path(data_files[at.file].path).filename().string(), layouts[at.file][at.archive].start,
                       layouts[at.file][at.archive].zip.file_size};
    if (at.chunk == SIZE_MAX) {
      metadata.objects[at.entry].place = place;
    } else {
      metadata.tensors[at.entry].chunks[at.chunk].place = place;
    }
  }
  // The data files of the checkpoint the folder holds (-f) that the new .metadata does not name
  std::set<std::string> ours;
  for (const PlannedFile& file : data_files) ours.insert(fs::path(file.path).filename().string());
  for (const std::string& name : earlier_data_files(output.path)) {
    if (ours.count(name) == 0) out.plan.stale_files.push_back((fs::path(output.path) / name).string());
  }
  for (PlannedFile& file : data_files) {
    out.plan.files.push_back(std::move(file));
    out.tensors.emplace_back();  // (--dry-run lists a data file's records)
  }
  InlineRecordWriter writer(".metadata");
  writer.append(encode_dcp_metadata(metadata));
  PlannedFile last;
  last.path = (fs::path(output.path) / ".metadata").string();
  last.container = Container::Concatenated;
  last.records.push_back(writer.finish());
  out.plan.files.push_back(std::move(last));
  out.tensors.emplace_back();
}

}  // namespace ckpt
