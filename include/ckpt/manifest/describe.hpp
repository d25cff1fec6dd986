// Describing files into a manifest: each file's tensors as byte ranges, read
// from zip directories and pickles only, never tensor data; each distinct
// pickle decoded once, and what files share held once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/format/checkpoint.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/manifest/manifest.hpp"

namespace ckpt {

// Makes files that hold equal tensor lists, shard_metadata or object trees
// share one copy of each: what keeps a manifest of hundreds of shards small.
// Thread-safe.
class SharedContent {
 public:
  SharedContent();
  ~SharedContent();
  void share(ManifestFile& file);

 private:
  struct Seen;
  std::unique_ptr<Seen> seen_;
};

// The checkpoints decoded while describing files (the first file of each
// distinct pickle), with their mappings: kept for the planner that opens the
// same files next (PlanInputs), so that no pickle is decoded twice. Thread-safe.
class DecodedFiles {
 public:
  struct Decoded {
    std::unique_ptr<MappedFile> file;
    std::shared_ptr<const Checkpoint> checkpoint;  // of *file
  };
  void keep(Decoded decoded);
  // What was kept for `path` (as ManifestFile::path spells it), once; null members when nothing.
  Decoded take(const std::string& path);

 private:
  std::mutex mutex_;
  std::map<std::string, Decoded> by_path_;
};

// Describes files as build_manifest does, each distinct pickle decoded once:
// a file whose pickle bytes are those of a file described before (the shards
// of a model part, but for padding) is read for its zip directory only. What
// the files share is shared (SharedContent). Thread-safe.
class FileDescriber {
 public:
  // With `keep`, the checkpoints decoded are kept there (DecodedFiles).
  explicit FileDescriber(DecodedFiles* keep = nullptr);
  ~FileDescriber();
  // `path` described by its layout (input_layouts.hpp). Throws Error naming
  // the file when it is not a readable file of that layout.
  ManifestFile describe(const std::string& path);
  // A torch.save file described (the torch layout's describe).
  ManifestFile describe_torch(const std::string& path);
  // What `make` gives, made once for `key` while this describer lives: what
  // the files of one set share (a DCP directory's metadata). A failure of
  // `make` is thrown to every caller of its key.
  std::shared_ptr<const void> shared_value(const std::string& key,
                                           const std::function<std::shared_ptr<const void>()>& make);

 private:
  struct Known;
  std::unique_ptr<Known> known_;
  DecodedFiles* keep_ = nullptr;
};

// Indexes `paths` (files, already expanded; a name ending in .safetensors is
// read as safetensors, its header checked by read_safetensors_header). Throws
// Error on unreadable input.
Manifest build_manifest(const std::vector<std::string>& paths, DecodedFiles* keep = nullptr);
bool is_safetensors_path(std::string_view path);
// The shard files a safetensors index names (paths beside it), read and
// bounded (format/safetensors.hpp). Throws Error naming the index.
std::vector<std::string> safetensors_index_files(const std::string& index_path);
// What is wrong between a safetensors index and its shards' descriptions
// (`files`): a name the index puts in a file that does not hold it, a tensor
// the index does not name; one line each.
std::vector<std::string> safetensors_index_problems(const std::string& index_path,
                                                    const std::vector<ManifestFile>& files);
ManifestFile describe_file(const Checkpoint& checkpoint);
// A manifest read from `source` is trusted only as far as its files say the
// same: each file is described again (FileDescriber: each distinct pickle
// decoded once, about a second for 992 shards) and must give exactly the
// manifest's tensors, places and CRCs, shard_metadata, object tree and other
// fields. Throws Error naming `source` and the first field that differs, with
// the file: a hand-edited manifest never redirects a copy.
void check_describes_files(const Manifest& manifest, const std::string& source, DecodedFiles* keep = nullptr);
// read_manifest, check_fresh, then check_describes_files, with the files
// described on a second thread while the manifest is parsed (from its files
// section, which comes first): the one way to read a manifest that is trusted.
Manifest read_checked_manifest(const std::string& path, DecodedFiles* keep = nullptr);

}  // namespace ckpt
