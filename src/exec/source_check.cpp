#include "ckpt/exec/source_check.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "ckpt/io/byte_writer.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/parallel.hpp"

namespace ckpt {

namespace {

// The name of the zip record whose data starts at `offset`, for a message: the
// directory is parsed again only when a record has failed its check.
std::string record_name(const MappedFile& file, std::uint64_t offset) {
  try {
    ZipArchive zip(file);
    for (const ZipRecord& record : zip.records()) {
      if (record.data_offset == offset) return record.name;
    }
  } catch (const Error&) {
    // No name then: the offset still says where.
  }
  return "";
}

}  // namespace

SourceCrcCheck::SourceCrcCheck(const Plan& plan, const std::vector<std::size_t>& outputs,
                               std::vector<const MappedFile*> files)
    : plan_(plan), files_(std::move(files)), touched_(plan.sources.size()) {
  for (std::size_t s = 0; s < plan.sources.size(); ++s) touched_[s].assign(plan.sources[s].records.size(), false);
  // Every byte a copy reads lies in one record (validate checked it): mark the
  // records touched.
  for (std::size_t k : outputs) {
    std::optional<PlannedFile> holder;
    for (const PlannedRecord& record : unpacked(plan.files.at(k), holder).records) {
      for (const Piece& piece : record.copies) {
        if (!piece.mapped() || piece.nbytes == 0) continue;
        std::int64_t index = record_at(piece.source, piece.source_offset);
        check_invariant(index >= 0, "a copy outside every record of its source");
        touched_[piece.source][static_cast<std::size_t>(index)] = true;
      }
    }
  }
}

std::int64_t SourceCrcCheck::record_at(std::uint32_t source, std::uint64_t offset) const {
  std::optional<std::size_t> index = record_index(plan_.sources.at(source), offset);
  return index ? static_cast<std::int64_t>(*index) : -1;
}

void SourceCrcCheck::note(std::uint32_t source, std::uint64_t byte_offset, Bytes bytes,
                          std::optional<std::uint32_t> crc) {
  if (bytes.empty() || !plan_.sources.at(source).has_crcs) return;
  std::vector<Covered> parts;
  // Usually one record holds every byte; a read that spans records (or leaves
  // them) is split, and bytes outside every record are simply not counted.
  for (std::uint64_t at = byte_offset, end = byte_offset + bytes.size(); at < end;) {
    std::int64_t index = record_at(source, at);
    if (index < 0) break;
    const CheckedRange& record = plan_.sources[source].records[static_cast<std::size_t>(index)];
    std::uint64_t part_end = std::min(end, record.end());
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

// Each note: u32 source, u32 record, u64 begin, u64 end, u32 CRC.
std::vector<std::byte> SourceCrcCheck::notes() const {
  ByteWriter out;
  for (const Covered& part : covered_) {
    out.u32(part.source);
    out.u32(part.record);
    out.u64(part.begin);
    out.u64(part.end);
    out.u32(part.crc);
  }
  return out.take();
}

void SourceCrcCheck::add_notes(Bytes notes, int reader) {
  ByteReader in(notes, "", "CRC notes");
  std::lock_guard lock(mutex_);
  while (!in.at_end()) {
    Covered part;
    part.source = in.u32();
    part.record = in.u32();
    part.begin = in.u64();
    part.end = in.u64();
    part.crc = in.u32();
    part.reader = reader;
    check_invariant(part.source < plan_.sources.size() && part.record < plan_.sources[part.source].records.size(),
                    "CRC notes of a record the plan does not have");
    covered_.push_back(part);
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
  for (std::uint32_t s = 0; s < plan_.sources.size(); ++s) {
    for (std::uint32_t r = 0; r < plan_.sources[s].records.size(); ++r) {
      std::size_t first = next;
      while (next < covered_.size() && covered_[next].source == s && covered_[next].record == r) ++next;
      if ((touched_[s][r] || next > first) && plan_.sources[s].has_crcs) jobs.push_back({s, r, first, next});
    }
  }
  std::mutex reread_mutex;
  parallel_for(jobs.size(), threads, [&] {
    return [&, buffer = std::vector<std::byte>()](std::size_t j) mutable {
      const Job& job = jobs[j];
      const MappedFile& file = *files_[job.source];
      const CheckedRange& record = plan_.sources[job.source].records[job.record];
      std::uint64_t cursor = record.offset;
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
      read_up_to(record.end());
      {
        std::lock_guard lock(reread_mutex);
        reread_bytes_ += reread;
      }
      if (crc != record.crc32) {
        int reader = -1;
        for (std::size_t i = job.first_covered; i < job.end_covered; ++i) {
          if (reader < 0 || covered_[i].reader < reader) reader = covered_[i].reader;
        }
        {
          std::lock_guard lock(reread_mutex);
          failed_reader_ = std::max(reader, 0);
        }
        throw Error(ErrorKind::CorruptData, Location{file.path(), record_name(file, record.offset), record.offset},
                    fmt::format("CRC-32 of the record's {} bytes of data (from this offset) is 0x{:08x}, the zip "
                                "directory says 0x{:08x}: the input is corrupted",
                                record.nbytes, crc, record.crc32));
      }
    };
  });
}

}  // namespace ckpt
