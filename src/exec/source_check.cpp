#include "ckpt/exec/source_check.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "ckpt/io/crc32.hpp"
#include "ckpt/io/parallel.hpp"

namespace ckpt {

SourceCrcCheck::SourceCrcCheck(const Plan& plan, unsigned threads) : plan_(plan), inputs_(plan.sources.size()) {
  parallel_for(plan.sources.size(), threads, [&] {
    return [&](std::size_t s) {
      ZipArchive zip(*plan.sources[s]);
      plan.sources[s]->drop_resident_pages();  // its directory, parsed from the mapping
      std::vector<const ZipRecord*> sorted;
      for (const ZipRecord& record : zip.records()) sorted.push_back(&record);
      std::sort(sorted.begin(), sorted.end(),
                [](const ZipRecord* a, const ZipRecord* b) { return a->data_offset < b->data_offset; });
      // The pickle and the other small records are decoded, not copied: the
      // plan and every object the outputs carry come from them, so they are
      // checked whatever the copies read. Tensor storages (`<archive>/data/<key>`)
      // are checked when a copy reads them.
      Input& input = inputs_[s];
      for (const ZipRecord* record : sorted) {
        input.records.push_back({record->data_offset, record->nbytes, record->crc32});
        input.touched.push_back(record->name.find("/data/") == std::string::npos);
      }
    };
  });
  // Every byte a copy may read lies in one record: mark the records touched.
  for (const PlannedFile& file : plan.files) {
    for (const PlannedRecord& record : file.records) {
      for (const Piece& op : record.copies) {
        if (!op.mapped() || op.nbytes == 0) continue;
        std::uint64_t begin = op.source_offset;
        std::uint64_t end = op.source_offset + (op.rows - 1) * op.source_stride + op.source_nbytes();
        std::int64_t index = record_at(op.source, begin);
        const std::vector<Record>& records = inputs_[op.source].records;
        if (index < 0 || end > records[index].data_offset + records[index].nbytes) {
          throw Error(Location{plan.sources[op.source]->path(), "", begin},
                      fmt::format("{} bytes to copy from here do not lie inside one record of the zip directory "
                                  "(a manifest that does not describe this file?)",
                                  end - begin));
        }
        inputs_[op.source].touched[index] = true;
      }
    }
  }
}

std::int64_t SourceCrcCheck::record_at(std::uint32_t source, std::uint64_t offset) const {
  const std::vector<Record>& records = inputs_.at(source).records;
  auto it = std::upper_bound(records.begin(), records.end(), offset,
                             [](std::uint64_t at, const Record& r) { return at < r.data_offset; });
  if (it == records.begin()) return -1;
  --it;
  if (offset >= it->data_offset + it->nbytes) return -1;
  return it - records.begin();
}

void SourceCrcCheck::note(std::uint32_t source, std::uint64_t byte_offset, Bytes bytes,
                          std::optional<std::uint32_t> crc) {
  if (bytes.empty()) return;
  std::vector<Covered> parts;
  // Usually one record holds every byte; a read that spans records (or leaves
  // them) is split, and bytes outside every record are simply not counted.
  for (std::uint64_t at = byte_offset, end = byte_offset + bytes.size(); at < end;) {
    std::int64_t index = record_at(source, at);
    if (index < 0) break;
    const Record& record = inputs_[source].records[index];
    std::uint64_t part_end = std::min(end, record.data_offset + record.nbytes);
    Bytes part = bytes.subspan(at - byte_offset, part_end - at);
    bool whole = at == byte_offset && part_end == end;
    parts.push_back({source, static_cast<std::uint32_t>(index), at, part_end, whole && crc ? *crc : crc32(part)});
    at = part_end;
  }
  std::lock_guard lock(mutex_);
  for (const Covered& part : parts) {
    // A read that continues the last one (the usual case) extends it: hundreds
    // of outputs make hundreds of thousands of reads.
    Covered* last = covered_.empty() ? nullptr : &covered_.back();
    if (last != nullptr && last->source == part.source && last->record == part.record && last->end == part.begin) {
      last->crc = crc32_concat(last->crc, part.crc, part.end - part.begin);
      last->end = part.end;
    } else {
      covered_.push_back(part);
    }
  }
}

void SourceCrcCheck::finish(unsigned threads) {
  std::sort(covered_.begin(), covered_.end(), [](const Covered& a, const Covered& b) {
    return std::tie(a.source, a.record, a.begin, b.end) < std::tie(b.source, b.record, b.begin, a.end);
  });
  struct Job {
    std::uint32_t source;
    std::uint32_t record;
    std::size_t first_covered;  // its notes: covered_[first_covered, end_covered)
    std::size_t end_covered;
  };
  std::vector<Job> jobs;
  std::size_t next = 0;
  for (std::uint32_t s = 0; s < inputs_.size(); ++s) {
    for (std::uint32_t r = 0; r < inputs_[s].records.size(); ++r) {
      std::size_t first = next;
      while (next < covered_.size() && covered_[next].source == s && covered_[next].record == r) ++next;
      if (inputs_[s].touched[r] || next > first) jobs.push_back({s, r, first, next});
    }
  }
  std::mutex reread_mutex;
  parallel_for(jobs.size(), threads, [&] {
    return [&, buffer = std::vector<std::byte>()](std::size_t j) mutable {
      const Job& job = jobs[j];
      const MappedFile& file = *plan_.sources[job.source];
      const Record& record = inputs_[job.source].records[job.record];
      std::uint64_t cursor = record.data_offset;
      std::uint32_t crc = 0;
      std::uint64_t reread = 0;
      auto read_up_to = [&](std::uint64_t end) {
        if (end <= cursor) return;
        crc = crc32_update_from(crc, file, cursor, end - cursor, buffer);
        reread += end - cursor;
        cursor = end;
      };
      for (std::size_t i = job.first_covered; i < job.end_covered; ++i) {
        const Covered& part = covered_[i];
        if (part.begin < cursor) continue;  // overlaps what is counted already
        read_up_to(part.begin);
        crc = crc32_concat(crc, part.crc, part.end - part.begin);
        cursor = part.end;
      }
      read_up_to(record.data_offset + record.nbytes);
      {
        std::lock_guard lock(reread_mutex);
        reread_bytes_ += reread;
      }
      if (crc != record.crc32) {
        std::string name;  // parsed again for the message
        ZipArchive zip(file);
        for (const ZipRecord& named : zip.records()) {
          if (named.data_offset == record.data_offset) name = named.name;
        }
        throw Error(ErrorKind::CorruptData, Location{file.path(), name, record.data_offset},
                    fmt::format("CRC-32 of the record's {} bytes of data (from this offset) is 0x{:08x}, the zip "
                                "directory says 0x{:08x}: the input is corrupted (nothing was written)",
                                record.nbytes, crc, record.crc32));
      }
    };
  });
}

}  // namespace ckpt
