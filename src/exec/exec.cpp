#include "ckpt/exec/exec.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "ckpt/exec/gather.hpp"
#include "ckpt/exec/source_check.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/byte_writer.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/io/parallel.hpp"

namespace ckpt {

namespace {

constexpr std::uint64_t kBlockBytes = OutputFile::kDirectAlignment;

std::uint64_t round_up(std::uint64_t value, std::uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// A heap buffer aligned for direct I/O.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::uint64_t nbytes)
      : data_(static_cast<std::byte*>(
            std::aligned_alloc(kBlockBytes, std::max(round_up(nbytes, kBlockBytes), kBlockBytes)))) {
    if (data_ == nullptr) throw std::bad_alloc();
  }
  std::byte* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> data_;
};

// A span is destination bytes [begin, end) of one record, all inside one unit.
struct Span {
  std::size_t record = 0;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::uint32_t crc32 = 0;
};

// A unit is file bytes [begin, end), aligned, made of spans [first_span, end_span)
// and the header bytes between them.
struct Unit {
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::size_t first_span = 0;
  std::size_t end_span = 0;
};

// Reports the bytes copied to ExecOptions::progress: every 200 ms at most, and
// once at the end.
class Progress {
 public:
  Progress(const ProgressFn& report, std::uint64_t total) : report_(report), total_(total) {}
  void add(std::uint64_t nbytes) {
    std::uint64_t done = done_.fetch_add(nbytes) + nbytes;
    if (!report_) return;
    auto now = Clock::now();
    std::lock_guard lock(mutex_);
    if (now - last_ < std::chrono::milliseconds(200) && done != total_) return;
    last_ = now;
    report_(done, total_);
  }

 private:
  using Clock = std::chrono::steady_clock;
  const ProgressFn& report_;
  std::uint64_t total_;
  std::atomic<std::uint64_t> done_{0};
  Clock::time_point last_{};
  std::mutex mutex_;
};

// Writes one output file. Every unit is assembled in an aligned buffer (record
// bytes from their pieces, zeros where headers go) and written whole, so the
// same code runs with direct and buffered I/O. A local header needs its record's
// CRC, known only once every unit of the record is written: the blocks that
// hold header bytes are kept aside while their unit is in the buffer, and at the
// end the headers and the central directory are laid into them and they are
// written again as whole blocks (no read-modify-write of a block on disk).
class FileWriter {
 public:
  FileWriter(const std::vector<const MappedFile*>& sources, const PlannedFile& file, ZipLayout& layout,
             const OutputFile& out, const ExecOptions& options, SourceCrcCheck* check)
      : sources_(sources), file_(file), layout_(layout), out_(out), options_(options), check_(check) {
    for (const PlannedRecord& record : file.records) sequential_.push_back(record.sequential());
    cut();
    if (file.container != Container::Concatenated) {  // a zip, or zips back to back: local headers
      for (std::size_t r = 0; r < layout.records.size(); ++r) {
        add_header_blocks(layout.records[r].header_offset, layout.records[r].data_offset);
      }
    }
    if (file.container == Container::Zip) add_header_blocks(layout.central_directory_offset, layout.file_size);
    if (file.container == Container::Archives) archives_ = archive_layouts(file);
    for (const ArchiveLayout& archive : archives_) {
      add_header_blocks(archive.start + archive.zip.central_directory_offset, archive.start + archive.zip.file_size);
    }
    std::sort(header_blocks_.begin(), header_blocks_.end());
    header_blocks_.erase(std::unique(header_blocks_.begin(), header_blocks_.end()), header_blocks_.end());
  }

  // Blocks to keep aside; when there are too many the caller writes buffered and
  // lays the headers straight into the file instead.
  std::size_t header_block_count() const { return header_blocks_.size(); }
  void keep_header_blocks() { kept_ = AlignedBuffer(header_blocks_.size() * kBlockBytes); }

  std::vector<Unit>& units() { return units_; }

  // What this process wrote of units [first, end), for the process that
  // finishes the file (FilePart): the CRCs of their spans and the header
  // blocks among them, as bytes: u64 first span, u64 count, count x u32 CRC,
  // u64 blocks, each u64 block index + its bytes (none when the headers go in
  // place: the file is written buffered).
  std::vector<std::byte> part_report(std::uint64_t first, std::uint64_t end) const {
    ByteWriter out;
    std::size_t first_span = units_.at(first).first_span;
    std::size_t end_span = units_.at(end - 1).end_span;
    out.u64(first_span);
    out.u64(end_span - first_span);
    for (std::size_t i = first_span; i < end_span; ++i) out.u32(spans_[i].crc32);
    std::vector<std::size_t> blocks;
    if (kept_.data() != nullptr) {
      for (std::size_t b = 0; b < header_blocks_.size(); ++b) {
        std::uint64_t at = header_blocks_[b] * kBlockBytes;
        if (at >= units_[first].begin && at < units_[end - 1].end) blocks.push_back(b);
      }
    }
    out.u64(blocks.size());
    for (std::size_t b : blocks) {
      out.u64(header_blocks_[b]);
      out.text(std::string_view(reinterpret_cast<const char*>(kept_.data() + b * kBlockBytes), kBlockBytes));
    }
    return out.take();
  }
  // Takes in a part_report() of another process.
  void absorb_part(Bytes report) {
    ByteReader in(report, out_.target_path(), "a part report");
    std::uint64_t first_span = in.u64();
    std::uint64_t count = in.u64();
    check_invariant(first_span + count <= spans_.size(), "a part report past the file's spans");
    for (std::uint64_t i = 0; i < count; ++i) spans_[first_span + i].crc32 = in.u32();
    std::uint64_t blocks = in.u64();
    for (std::uint64_t b = 0; b < blocks; ++b) {
      std::uint64_t block = in.u64();
      auto it = std::lower_bound(header_blocks_.begin(), header_blocks_.end(), block);
      check_invariant(it != header_blocks_.end() && *it == block && kept_.data() != nullptr,
                      "a part report with a block that holds no header");
      Bytes bytes = in.take(kBlockBytes);
      std::memcpy(kept_.data() + (it - header_blocks_.begin()) * kBlockBytes, bytes.data(), kBlockBytes);
    }
    check_invariant(in.at_end(), "bytes after a part report");
  }
  // Record bytes in the unit (what the progress line counts).
  std::uint64_t record_bytes(const Unit& unit) const {
    std::uint64_t nbytes = 0;
    for (std::size_t i = unit.first_span; i < unit.end_span; ++i) nbytes += spans_[i].end - spans_[i].begin;
    return nbytes;
  }

  // Assembles `unit` in `buffer` (kUnitBytes, aligned) and writes it.
  void run_unit(const Unit& unit, std::byte* buffer) {
    std::uint64_t cursor = unit.begin;  // file bytes before it are in the buffer
    for (std::size_t i = unit.first_span; i < unit.end_span; ++i) {
      Span& span = spans_[i];
      std::uint64_t at = layout_.records[span.record].data_offset + span.begin;
      std::memset(buffer + (cursor - unit.begin), 0, at - cursor);
      std::byte* dest = buffer + (at - unit.begin);
      std::optional<SourceRange> copied = fill_span(span, dest);
      Bytes bytes(dest, span.end - span.begin);
      span.crc32 = crc32(bytes);
      // A plain copy: the span's CRC is the CRC of the input bytes too.
      if (check_ != nullptr && copied) check_->note(copied->source, copied->byte_offset, bytes, span.crc32);
      cursor = at + (span.end - span.begin);
    }
    std::memset(buffer + (cursor - unit.begin), 0, unit.end - cursor);
    if (kept_.data() != nullptr) {
      auto first = std::lower_bound(header_blocks_.begin(), header_blocks_.end(), unit.begin / kBlockBytes);
      for (auto it = first; it != header_blocks_.end() && *it * kBlockBytes < unit.end; ++it) {
        std::memcpy(kept_.data() + (it - header_blocks_.begin()) * kBlockBytes,
                    buffer + (*it * kBlockBytes - unit.begin), kBlockBytes);
      }
    }
    out_.write_at(unit.begin, Bytes(buffer, unit.end - unit.begin));
  }

  // Once every unit is written: folds the CRCs, then writes the local headers and
  // the central directory (a concatenated file has none).
  void write_headers() {
    if (file_.container == Container::Concatenated) return;
    std::vector<std::uint32_t> crcs(file_.records.size(), 0);
    for (const Span& span : spans_) {  // in destination order within each record
      crcs[span.record] = crc32_concat(crcs[span.record], span.crc32, span.end - span.begin);
    }
    for (std::size_t r = 0; r < layout_.records.size(); ++r) layout_.records[r].crc32 = crcs[r];
    for (ArchiveLayout& archive : archives_) {
      for (std::size_t r = 0; r < archive.zip.records.size(); ++r) {
        archive.zip.records[r].crc32 = crcs[archive.first_record + r];
      }
    }
    // Each header is placed as it is rendered: a file of 200,000 records would
    // otherwise hold them all at once.
    auto place = [&](std::uint64_t offset, const std::vector<std::byte>& bytes) {
      if (kept_.data() == nullptr) {  // written buffered: headers go in place
        out_.write_at(offset, bytes);
        return;
      }
      for (std::uint64_t at = offset; at < offset + bytes.size();) {
        std::uint64_t block = at / kBlockBytes;
        auto it = std::lower_bound(header_blocks_.begin(), header_blocks_.end(), block);
        std::uint64_t count = std::min(offset + bytes.size(), (block + 1) * kBlockBytes) - at;
        std::memcpy(kept_.data() + (it - header_blocks_.begin()) * kBlockBytes + at % kBlockBytes,
                    bytes.data() + (at - offset), count);
        at += count;
      }
    };
    // (a local header is the same bytes at any offset; a central directory
    // gives offsets from its archive's first byte)
    for (const ZipRecord& record : layout_.records) place(record.header_offset, render_local_header(record));
    if (file_.container == Container::Zip) place(layout_.central_directory_offset, render_central_directory(layout_));
    for (const ArchiveLayout& archive : archives_) {
      place(archive.start + archive.zip.central_directory_offset, render_central_directory(archive.zip));
    }
    if (kept_.data() == nullptr) return;
    // Consecutive blocks go out in one write.
    for (std::size_t i = 0; i < header_blocks_.size();) {
      std::size_t j = i + 1;
      while (j < header_blocks_.size() && header_blocks_[j] == header_blocks_[j - 1] + 1) ++j;
      out_.write_at(header_blocks_[i] * kBlockBytes, Bytes(kept_.data() + i * kBlockBytes, (j - i) * kBlockBytes));
      i = j;
    }
  }

 private:
  // Spans: every record's data cut at unit boundaries, in file order; units:
  // the aligned file range [0, round_up(file_size)) in kUnitBytes steps.
  void cut() {
    std::uint64_t padded_size = out_.padded_size();
    for (std::size_t r = 0; r < file_.records.size(); ++r) {
      std::uint64_t base = layout_.records[r].data_offset;
      // Spans are cut at file offsets: aligned records keep them whole elements.
      check_invariant(base % record_alignment(file_.records[r]) == 0, "record data not aligned to its elements");
      for (std::uint64_t begin = 0; begin < file_.records[r].nbytes;) {
        std::uint64_t end = std::min(file_.records[r].nbytes, round_up(base + begin + 1, kUnitBytes) - base);
        spans_.push_back(Span{r, begin, end, 0});
        begin = end;
      }
    }
    std::size_t next_span = 0;
    for (std::uint64_t begin = 0; begin < padded_size; begin += kUnitBytes) {
      Unit unit{begin, std::min(begin + kUnitBytes, padded_size), next_span, next_span};
      while (unit.end_span < spans_.size() &&
             layout_.records[spans_[unit.end_span].record].data_offset + spans_[unit.end_span].begin < unit.end) {
        ++unit.end_span;
      }
      next_span = unit.end_span;
      units_.push_back(unit);
    }
  }

  void add_header_blocks(std::uint64_t begin, std::uint64_t end) {
    for (std::uint64_t block = begin / kBlockBytes; block * kBlockBytes < end; ++block) header_blocks_.push_back(block);
  }

  struct SourceRange {
    std::uint32_t source = 0;
    std::uint64_t byte_offset = 0;
  };

  // Fills `dest` with the span's bytes. When they are one range of an input,
  // copied as they are, returns where it starts; otherwise the input bytes read
  // are reported to the CRC check here.
  std::optional<SourceRange> fill_span(const Span& span, std::byte* dest) const {
    const PlannedRecord& record = file_.records[span.record];
    std::uint64_t length = span.end - span.begin;
    if (record.copies.empty()) {
      std::memcpy(dest, record.inline_bytes.data() + span.begin, length);
      return std::nullopt;
    }
    if (sequential_[span.record]) {
      // Plain ranges in order: find the first piece that reaches this span.
      auto it = std::upper_bound(
          record.copies.begin(), record.copies.end(), span.begin,
          [](std::uint64_t offset, const Piece& piece) { return offset < piece.offset + piece.nbytes; });
      if (it != record.copies.end() && it->mapped() && it->offset <= span.begin &&
          it->offset + it->nbytes >= span.end) {
        // The common case: one pread, faster than copying from the mapping
        // (page faults) or copy_file_range.
        std::uint64_t source_offset = it->source_offset + (span.begin - it->offset);
        sources_[it->source]->read_at(source_offset, dest, length);
        return SourceRange{it->source, source_offset};
      }
    }
    gather(record.copies, span.begin, span.end, PieceSources{sources_, &options_.convert, check_}, dest);
    return std::nullopt;
  }

  const std::vector<const MappedFile*>& sources_;  // plan.sources, mapped
  const PlannedFile& file_;
  ZipLayout& layout_;                    // its CRCs are filled in by write_headers()
  std::vector<ArchiveLayout> archives_;  // Container::Archives: each archive's own layout, CRCs likewise
  const OutputFile& out_;
  const ExecOptions& options_;
  SourceCrcCheck* check_;  // null with --no-crc-check
  std::vector<bool> sequential_;
  std::vector<Span> spans_;
  std::vector<Unit> units_;
  std::vector<std::uint64_t> header_blocks_;  // sorted block indices
  AlignedBuffer kept_;                        // their bytes, in that order (when kept)
};

// Writes units [first, end) of the writer's file (all of them by default).
void run_units(FileWriter& writer, unsigned threads, Progress& progress, std::uint64_t first = 0,
               std::uint64_t end = ~0ull) {
  std::vector<Unit>& units = writer.units();
  end = std::min<std::uint64_t>(end, units.size());
  if (first >= end) return;
  parallel_for(end - first, threads, [&] {
    return [&, buffer = AlignedBuffer(kUnitBytes)](std::size_t i) {
      writer.run_unit(units[first + i], buffer.data());
      progress.add(writer.record_bytes(units[first + i]));
    };
  });
}

// A file's writer as every process writing a part of it makes it: the same
// layout and units, and the same choice of direct or buffered I/O.
struct PreparedFile {
  std::optional<PlannedFile> expanded;  // its records and pickle, kept compressed until now
  ZipLayout layout;
  std::unique_ptr<FileWriter> writer;
};
PreparedFile prepare_file(const Plan& plan, std::size_t k, const std::vector<const MappedFile*>& sources,
                          OutputFile& out, const ExecOptions& options, SourceCrcCheck* check) {
  PreparedFile prepared;
  prepared.expanded = expand_inline(plan.files.at(k));
  const PlannedFile& file = prepared.expanded ? *prepared.expanded : plan.files[k];
  prepared.layout = layout_file(file);
  prepared.writer = std::make_unique<FileWriter>(sources, file, prepared.layout, out, options, check);
  // Direct I/O needs the header blocks kept (a header written in place would
  // be a partial block); without them the file is written buffered.
  if (prepared.writer->header_block_count() <= kMaxKeptHeaderBlocks) {
    prepared.writer->keep_header_blocks();
    if (options.direct_io) out.enable_direct_io();
  }
  return prepared;
}

// fsyncs in flight at once when several outputs are made durable: they wait on
// the disk, not on the cores.
constexpr unsigned kSyncThreads = 16;

// Renames every finished output into place, signals deferred. When a rename
// fails, takes back the outputs renamed before it that replaced nothing, and
// names in the error those it cannot take back (they replaced a file).
void commit_all(std::vector<std::unique_ptr<OutputFile>>& outputs) {
  DeferSignals defer;
  std::vector<bool> replaces;
  for (const auto& out : outputs) replaces.push_back(identity_of(out->target_path()).has_value());
  // Several outputs are one set, its keystone last (a sharded set's index): an
  // old keystone goes before the first rename, so that a run killed between
  // renames leaves a set without one, which no reader takes for whole, never
  // new files beside an old index.
  std::string removed_first;
  if (outputs.size() > 1 && replaces.back()) {
    const std::string& keystone = outputs.back()->target_path();
    if (::unlink(keystone.c_str()) != 0) {
      const int error = errno;
      throw Error(kind_of_errno(error), Location{keystone, "", std::nullopt},
                  std::string("cannot remove the file this run replaces: ") + std::strerror(error));
    }
    sync_directory(std::filesystem::path(keystone).parent_path().empty()
                       ? "."
                       : std::filesystem::path(keystone).parent_path().string());
    replaces.back() = false;
    removed_first =
        fmt::format("; {} (the set's last file, which it replaced) was removed before the renames", keystone);
  }
  std::vector<std::string> replaced;
  std::vector<std::string> created;
  std::set<std::string> directories;
  for (std::size_t k = 0; k < outputs.size(); ++k) {
    try {
      outputs[k]->commit(/*sync_directory=*/false);
    } catch (const Error& e) {
      for (const std::string& path : created) ::unlink(path.c_str());
      std::string undone = created.empty() ? ""
                                           : fmt::format(
                                                 "; the {} output(s) renamed before it were removed "
                                                 "again",
                                                 created.size());
      std::string kept = replaced.empty()
                             ? ""
                             : fmt::format("; these replaced existing files and stay: {}", fmt::join(replaced, ", "));
      throw Error(e.kind(), e.where(), e.message() + undone + kept + removed_first);
    }
    (replaces[k] ? replaced : created).push_back(outputs[k]->target_path());
    directories.insert(std::filesystem::path(outputs[k]->target_path()).parent_path().string());
  }
  for (const std::string& dir : directories) sync_directory(dir.empty() ? "." : dir);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

std::uint64_t unit_count(std::uint64_t file_size) {
  return (round_up(file_size, kBlockBytes) + kUnitBytes - 1) / kUnitBytes;
}

std::vector<std::unique_ptr<MappedFile>> map_sources(const Plan& plan) {
  std::vector<std::unique_ptr<MappedFile>> mapped;
  for (const PlanSource& source : plan.sources) {
    mapped.push_back(std::make_unique<MappedFile>(source.path));
    const MappedFile& file = *mapped.back();
    if (file.size() != source.size_bytes || file.mtime_ns() != source.mtime_ns || file.inode() != source.inode ||
        file.device() != source.device || file.ctime_ns() != source.ctime_ns) {
      throw Error(Location{source.path, "", std::nullopt},
                  fmt::format("the input changed after it was planned from (size {} -> {} bytes, modification or "
                              "change time, or device and inode): nothing was written; plan again",
                              source.size_bytes, file.size()));
    }
  }
  return mapped;
}

MadeDirectories prepare(const Plan& plan, const ExecOptions& options) {
  MadeDirectories made(plan.directories);
  std::vector<OutputTarget> targets;
  for (const PlannedFile& file : plan.files) targets.push_back({file.path, planned_file_size(file)});
  std::vector<FileIdentity> inputs;
  for (const PlanSource& source : plan.sources) {
    inputs.push_back(identity_of(source.path).value_or(FileIdentity{source.device, source.inode}));
  }
  for (const std::string& path : plan.read_only) {
    if (std::optional<FileIdentity> identity = identity_of(path)) inputs.push_back(*identity);
  }
  check_output_targets(targets, inputs, options.overwrite, options.notice);
  std::vector<std::string> stale;
  for (const std::string& path : plan.stale_files) {
    if (identity_of(path)) stale.push_back(path);
  }
  if (!stale.empty() && !options.overwrite) {
    throw Error(Location{stale.front(), "", std::nullopt},
                fmt::format("a file of another safetensors set is here ({} in all): readers would mix the two; "
                            "--force writes this set and removes them",
                            stale.size()));
  }
  return made;
}

Staged stage(const Plan& plan, const std::vector<std::size_t>& files, const ExecOptions& options) {
  auto start = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<MappedFile>> mapped = map_sources(plan);
  std::vector<const MappedFile*> sources;
  for (const auto& file : mapped) sources.push_back(file.get());
  std::optional<SourceCrcCheck> check;
  if (options.check_crc) check.emplace(plan, files, sources);
  Staged staged = stage_files(plan, files, sources, options, check ? &*check : nullptr);
  finish_check(check ? &*check : nullptr, options, staged.stats);
  staged.stats.seconds = seconds_since(start);
  return staged;
}

void finish_check(SourceCrcCheck* check, const ExecOptions& options, ExecStats& stats) {
  auto start = std::chrono::steady_clock::now();
  if (check != nullptr) {
    check->finish(resolve_threads(options.threads));
    stats.crc_checked = true;
    stats.crc_reread_bytes = check->reread_bytes();
  }
  stats.crc_seconds = seconds_since(start);
}

Staged stage_files(const Plan& plan, const std::vector<std::size_t>& files,
                   const std::vector<const MappedFile*>& sources, const ExecOptions& options, SourceCrcCheck* check) {
  auto start = std::chrono::steady_clock::now();
  unsigned threads = resolve_threads(options.threads);

  std::uint64_t total = 0;
  for (std::size_t k : files) {
    const PlannedFile& file = plan.files.at(k);
    total += file.packed_record_bytes;
    for (const PlannedRecord& record : file.records) total += record.nbytes;
  }
  Progress progress(options.progress, total);
  Staged staged;
  ExecStats& stats = staged.stats;
  for (std::size_t k : files) {
    auto t0 = std::chrono::steady_clock::now();
    staged.outputs.push_back(
        std::make_unique<OutputFile>(plan.files[k].path, planned_file_size(plan.files[k]), options.overwrite));
    OutputFile& out = *staged.outputs.back();
    PreparedFile prepared = prepare_file(plan, k, sources, out, options, check);
    stats.create_seconds += seconds_since(t0);
    auto t1 = std::chrono::steady_clock::now();
    run_units(*prepared.writer, threads, progress);
    stats.copy_seconds += seconds_since(t1);
    auto t2 = std::chrono::steady_clock::now();
    prepared.writer->write_headers();
    if (out.direct_io()) ++stats.direct_files;
    out.finish(/*sync=*/files.size() == 1);
    stats.commit_seconds += seconds_since(t2);
    stats.bytes_written += prepared.layout.file_size;
  }
  // Several outputs are made durable together: fsyncs in flight at once let
  // the file system commit them in a few journal transactions, where one after
  // another each waits for its own.
  auto t3 = std::chrono::steady_clock::now();
  if (files.size() > 1) {
    parallel_for(staged.outputs.size(), kSyncThreads,
                 [&] { return [&](std::size_t k) { staged.outputs[k]->sync_finished(); }; });
  }
  stats.commit_seconds += seconds_since(t3);
  stats.seconds = seconds_since(start);
  return staged;
}

std::uint64_t write_part(const Plan& plan, const FilePart& part, OutputFile& out,
                         const std::vector<const MappedFile*>& sources, const ExecOptions& options,
                         SourceCrcCheck* check, std::vector<std::byte>& report) {
  PreparedFile prepared = prepare_file(plan, part.file, sources, out, options, check);
  Progress progress(options.progress, 0);
  FileWriter& writer = *prepared.writer;
  run_units(writer, resolve_threads(options.threads), progress, part.first_unit, part.end_unit);
  report = writer.part_report(part.first_unit, part.end_unit);
  std::uint64_t nbytes = 0;
  for (std::uint64_t u = part.first_unit; u < part.end_unit; ++u) nbytes += writer.record_bytes(writer.units()[u]);
  return nbytes;
}

void finish_shared(const Plan& plan, std::size_t file, OutputFile& out, const std::vector<const MappedFile*>& sources,
                   const ExecOptions& options, const std::vector<Bytes>& reports) {
  PreparedFile prepared = prepare_file(plan, file, sources, out, options, nullptr);
  for (Bytes report : reports) prepared.writer->absorb_part(report);
  prepared.writer->write_headers();
  out.finish(/*sync=*/true);
}

void commit(const Plan& plan, Staged& staged, const ExecOptions& options) {
  auto start = std::chrono::steady_clock::now();
  commit_all(staged.outputs);
  // Once this set is in place, what is left of the other goes.
  std::set<std::string> folders;
  for (const std::string& path : plan.stale_files) {
    std::error_code ec;
    if (!std::filesystem::remove(path, ec)) continue;
    folders.insert(std::filesystem::path(path).parent_path().string());
    if (options.notice) options.notice("removed " + path + " (of the set written before)");
  }
  for (const std::string& folder : folders) sync_directory(folder.empty() ? "." : folder);
  double seconds = seconds_since(start);
  staged.stats.commit_seconds += seconds;
  staged.stats.seconds += seconds;
}

ExecStats execute(const Plan& plan, const ExecOptions& options) {
  auto start = std::chrono::steady_clock::now();
  validate(plan);
  MadeDirectories made = prepare(plan, options);
  std::vector<std::size_t> all(plan.files.size());
  for (std::size_t k = 0; k < all.size(); ++k) all[k] = k;
  Staged staged = stage(plan, all, options);
  commit(plan, staged, options);
  made.keep();
  staged.stats.seconds = seconds_since(start);
  return staged.stats;
}

}  // namespace ckpt
