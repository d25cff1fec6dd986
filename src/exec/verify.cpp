#include "ckpt/exec/verify.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ckpt/exec/compare.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/parallel.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/manifest/consolidate.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/input_layouts.hpp"

namespace ckpt {

namespace {

// CRC-32 of every record of one archive, records spread over threads.
void check_crcs(const MappedFile& file, const std::vector<ZipRecord>& records, unsigned threads, VerifyReport& report,
                std::mutex& mutex) {
  parallel_for(records.size(), threads, [&] {
    // One buffer per thread (crc32_update_from). A failed read (an I/O error, a
    // file that shrank) is a problem to report, like a wrong CRC.
    return [&, buffer = std::vector<std::byte>()](std::size_t i) mutable {
      const ZipRecord& record = records[i];
      std::string problem;
      try {
        std::uint32_t crc = crc32_update_from(0, file, record.data_offset, record.nbytes, buffer);
        if (crc != record.crc32) {
          problem = fmt::format(
              "{}: {}: at byte 0x{:x}: CRC-32 of the data is 0x{:08x}, the zip directory says "
              "0x{:08x} (corrupted data)",
              file.path(), record.name, record.data_offset, crc, record.crc32);
        }
      } catch (const std::exception& e) {
        problem = fmt::format("{} (record {})", e.what(), record.name);
      }
      if (!problem.empty()) {
        std::lock_guard lock(mutex);
        report.problems.push_back(problem);
      }
    };
  });
  std::lock_guard lock(mutex);
  report.records += records.size();
  for (const ZipRecord& record : records) report.bytes += record.nbytes;
}

}  // namespace

VerifyReport check_crcs_of(const std::vector<std::string>& paths, const std::vector<std::size_t>& indices,
                           unsigned threads) {
  threads = resolve_threads(threads);
  VerifyReport report;
  std::mutex mutex;
  FileDescriber describer;
  for (std::size_t index : indices) {
    try {
      const InputLayout& layout = input_layout_of_path(paths.at(index));
      if (!layout.has_crcs) continue;
      MappedFile file(paths[index]);
      check_crcs(file, layout.crc_records(file, describer), threads, report, mutex);
    } catch (const Error& e) {
      report.problems.push_back(e.what());
      report.unread.push_back(index);
    }
  }
  return report;
}

VerifyReport verify_files(const std::vector<std::string>& paths, unsigned threads,
                          std::optional<std::int64_t> model_parts, const std::vector<std::string>& inputs,
                          const VerifyReport* crc_pass) {
  threads = resolve_threads(threads);
  VerifyReport report;
  std::mutex mutex;
  Manifest manifest;
  FileDescriber describer;  // each distinct pickle decoded once
  std::vector<bool> unread(paths.size(), false);
  if (crc_pass != nullptr) {
    report.records = crc_pass->records;
    report.bytes = crc_pass->bytes;
    report.problems = crc_pass->problems;
    for (std::size_t index : crc_pass->unread) unread.at(index) = true;
  }
  for (std::size_t index = 0; index < paths.size(); ++index) {
    const std::string& path = paths[index];
    ++report.files;
    if (unread[index]) continue;  // its problem is the CRC pass's
    try {
      const InputLayout& layout = input_layout_of_path(path);
      if (!layout.has_crcs) {  // no checksum: the layout's own rules are what can be checked
        manifest.files.push_back(describer.describe(path));
        report.records += manifest.files.back().tensors.size();
        continue;
      }
      if (crc_pass == nullptr) {
        MappedFile file(path);
        check_crcs(file, layout.crc_records(file, describer), threads, report, mutex);
      }
      manifest.files.push_back(describer.describe(path));
    } catch (const Error& e) {
      report.problems.push_back(e.what());
    }
  }
  if (manifest.files.empty()) return report;
  // The same set check stitch and reshard make, even for one file: a model part
  // alone is incomplete when cfg names more parts.
  manifest.grid = detect_grid(manifest.files, model_parts);
  for (const std::string& problem : manifest.grid.problems) report.problems.push_back(problem);
  if (manifest.files.size() == paths.size()) {
    try {
      for (std::string& problem : index_problems(inputs, manifest.files)) report.problems.push_back(std::move(problem));
    } catch (const Error& e) {
      report.problems.push_back(e.what());
    }
  }
  if (!manifest.grid.problems.empty() || manifest.files.size() != paths.size()) return report;
  // Any file of a layout verifies; a set of training files, or a sharded one,
  // must read as one state dict: every part consolidates, the parts glue.
  const InputLayout& layout = input_layout(manifest);
  if (!layout.training) return report;  // (names in two files: the set check's)
  if (manifest.files.size() == 1 && !manifest.files[0].fsdp) return report;
  try {
    StateDict glued = layout.state_dict(manifest, {});
    // A replicated tensor that differs between the parts: stitch refuses it
    // (after a CRC problem, it is that problem again).
    if (!report.problems.empty()) return report;
    std::vector<std::unique_ptr<MappedFile>> mapped;
    std::vector<const MappedFile*> files;
    for (const ManifestFile& file : manifest.files)
      files.push_back(mapped.emplace_back(std::make_unique<MappedFile>(file.path)).get());
    for (std::string& problem : compare_replicated(glued.checks, files)) report.problems.push_back(std::move(problem));
  } catch (const Error& e) {
    report.problems.push_back(e.what());
  }
  return report;
}

}  // namespace ckpt
