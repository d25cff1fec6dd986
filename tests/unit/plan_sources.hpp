// Plan sources for unit tests that build plans by hand from files they wrote.
#pragma once

#include "ckpt/format/zip.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/plan/plan.hpp"

namespace test_files {

// `file` as a plan's input whose one record is the whole file.
inline ckpt::PlanSource whole_file_source(const ckpt::MappedFile& file) {
  return ckpt::plan_source(file, {{0, file.size(), ckpt::crc32(file.bytes())}});
}

// `file`, a zip archive, as a plan's input whose records are its zip records.
inline ckpt::PlanSource zip_source(const ckpt::MappedFile& file) {
  std::vector<ckpt::CheckedRange> records;
  ckpt::ZipArchive zip(file);
  for (const ckpt::ZipRecord& record : zip.records()) {
    records.push_back({record.data_offset, record.nbytes, record.crc32});
  }
  return ckpt::plan_source(file, std::move(records));
}

// An output file of a plan, its records in place.
inline ckpt::PlannedFile planned_file(std::string path, std::vector<ckpt::PlannedRecord> records,
                                      ckpt::Container container = ckpt::Container::Zip,
                                      std::vector<std::uint64_t> archives = {}) {
  ckpt::PlannedFile file;
  file.path = std::move(path);
  file.records = std::move(records);
  file.container = container;
  file.archives = std::move(archives);
  return file;
}

}  // namespace test_files
