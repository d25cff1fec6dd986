// Corruption is never laundered: every input byte the executor copies is checked
// against the CRC-32 of its zip record before any output is renamed into place.
//
// Copying recomputes the output's CRCs, so a flipped bit in an input would
// otherwise reach the output under a new, valid CRC. The check costs almost no
// reading: the executor reports the CRC of each range it reads anyway (for a
// plain copy that is the output piece's own CRC), the CRCs of a record's ranges
// are joined with crc32_concat, and only what no copy read (padding, columns
// skipped, rows read straight from the mapping) is read again at the end. A
// tensor record that no copy touches is not checked. The pickle, from which the
// plan and the objects the outputs carry are decoded, is checked when it is
// read (checkpoint.hpp). Ranges read twice (a buffer copied to every shard)
// count once. The records and their CRCs come with the plan (PlanSource): no zip
// directory is parsed here.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "ckpt/format/zip.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

class SourceCrcCheck {
 public:
  // Marks the records of the plan's sources (PlanSource::records) that the
  // copies of `outputs` (indices in plan.files) reach; `files[s]` maps
  // plan.sources[s]. The plan and the files must outlive the check.
  SourceCrcCheck(const Plan& plan, const std::vector<std::size_t>& outputs, std::vector<const MappedFile*> files);

  // `bytes` were read from input `source` at `byte_offset`; `crc` is their
  // CRC-32 when the caller has it already (computed here otherwise). Thread-safe.
  void note(std::uint32_t source, std::uint64_t byte_offset, Bytes bytes, std::optional<std::uint32_t> crc = {});

  // Reads the bytes of every touched record that no note covered, joins the
  // CRCs and compares them with the records'. Throws Error naming the file, the
  // record and its byte offset at the first mismatch.
  void finish(unsigned threads);

  // What note() was told, as bytes, for the check of another process that
  // takes them in (add_notes): the processes of a job check their inputs once,
  // together (job_exec.hpp).
  std::vector<std::byte> notes() const;
  void add_notes(Bytes notes, int reader);
  // After finish() threw: the lowest rank that read bytes of the record that
  // failed (this process's own notes are rank 0's; 0 when none did).
  int failed_reader() const { return failed_reader_; }

  // Bytes read again by finish() (for --stats and the tests).
  std::uint64_t reread_bytes() const { return reread_bytes_; }

 private:
  struct Covered {
    std::uint32_t source = 0;
    std::uint32_t record = 0;
    std::uint64_t begin = 0;  // file offsets
    std::uint64_t end = 0;
    std::uint32_t crc = 0;
    int reader = 0;  // the rank of a job whose notes these are (add_notes)
  };
  // The record of input `source` holding file byte `offset`, or -1.
  std::int64_t record_at(std::uint32_t source, std::uint64_t offset) const;

  const Plan& plan_;
  std::vector<const MappedFile*> files_;    // parallel to plan.sources
  std::vector<std::vector<bool>> touched_;  // [source][record]
  std::mutex mutex_;
  std::vector<Covered> covered_;
  std::uint64_t reread_bytes_ = 0;
  int failed_reader_ = 0;
};

}  // namespace ckpt
