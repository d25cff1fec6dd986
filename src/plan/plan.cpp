#include "ckpt/plan.hpp"

#include <fmt/format.h>

namespace ckpt {

void PlannedRecord::append_copy(std::uint32_t source, std::uint64_t source_offset, std::uint64_t count) {
  if (count == 0) return;
  if (!copies.empty()) {
    CopyOp& last = copies.back();
    bool continues = last.source == source && last.dest_offset + last.nbytes == nbytes &&
                     (source == CopyOp::kZeros || last.source_offset + last.nbytes == source_offset);
    if (continues) {
      last.nbytes += count;
      nbytes += count;
      return;
    }
  }
  copies.push_back(CopyOp{source, source_offset, nbytes, count});
  nbytes += count;
}

std::uint32_t Plan::add_source(const MappedFile& file) {
  for (std::uint32_t i = 0; i < sources.size(); ++i) {
    if (sources[i] == &file) return i;
  }
  sources.push_back(&file);
  return static_cast<std::uint32_t>(sources.size() - 1);
}

std::uint64_t Plan::bytes_to_copy() const {
  std::uint64_t total = 0;
  for (const PlannedFile& file : files) {
    for (const PlannedRecord& record : file.records) total += record.nbytes;
  }
  return total;
}

void validate(const Plan& plan) {
  for (const PlannedFile& file : plan.files) {
    for (const PlannedRecord& record : file.records) {
      auto bug = [&](const std::string& message) {
        return Error(Location{file.path, record.name, std::nullopt}, "invalid plan (a bug): " + message);
      };
      if (record.copies.empty()) {
        if (record.inline_bytes.size() != record.nbytes) throw bug("inline bytes do not match the record size");
        continue;
      }
      std::uint64_t expected = 0;
      for (const CopyOp& op : record.copies) {
        if (op.dest_offset != expected) throw bug(fmt::format("gap or overlap at offset {}", op.dest_offset));
        expected += op.nbytes;
        if (op.source == CopyOp::kZeros) continue;
        if (op.source >= plan.sources.size()) throw bug("copy from an unknown source");
        if (op.source_offset + op.nbytes > plan.sources[op.source]->size()) throw bug("copy past the end of its source");
      }
      if (expected != record.nbytes) throw bug("copies do not cover the record");
    }
  }
}

}  // namespace ckpt
