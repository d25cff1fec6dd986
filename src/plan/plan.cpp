#include "ckpt/plan/plan.hpp"

#include <fmt/format.h>
#include <zstd.h>

#include <algorithm>
#include <iterator>
#include <optional>

#include "ckpt/plan/plan_file.hpp"

namespace ckpt {

void PlannedRecord::append_copy(std::uint32_t source, std::uint64_t source_offset, std::uint64_t count) {
  Piece piece;
  piece.source = source;
  piece.source_offset = source_offset;
  piece.nbytes = count;
  append_plain(piece);
}

void PlannedRecord::append_plain(Piece piece) {
  if (piece.nbytes == 0) return;
  piece.offset = nbytes;
  nbytes += piece.nbytes;
  append_piece(copies, piece);
}

bool PlannedRecord::sequential() const {
  std::uint64_t expected = 0;
  for (const Piece& piece : copies) {
    if (!piece.plain() || piece.offset != expected) return false;
    expected += piece.nbytes;
  }
  return true;
}

PlanSource plan_source(const MappedFile& file, std::vector<CheckedRange> records) {
  std::sort(records.begin(), records.end(),
            [](const CheckedRange& a, const CheckedRange& b) { return a.offset < b.offset; });
  records.erase(std::unique(records.begin(), records.end()), records.end());
  return {file.path(),        file.size(), file.mtime_ns(), file.device(), file.inode(),
          std::move(records), true,        file.ctime_ns()};
}

std::uint32_t Plan::add_source(PlanSource source) {
  for (std::uint32_t i = 0; i < sources.size(); ++i) {
    PlanSource& known = sources[i];
    if (known.path != source.path) continue;
    check_invariant(known.size_bytes == source.size_bytes && known.mtime_ns == source.mtime_ns &&
                        known.inode == source.inode && known.ctime_ns == source.ctime_ns &&
                        known.has_crcs == source.has_crcs,
                    "one input planned as two different files: " + source.path);
    std::vector<CheckedRange> merged;
    std::merge(known.records.begin(), known.records.end(), source.records.begin(), source.records.end(),
               std::back_inserter(merged),
               [](const CheckedRange& a, const CheckedRange& b) { return a.offset < b.offset; });
    merged.erase(std::unique(merged.begin(), merged.end()), merged.end());
    known.records = std::move(merged);
    return i;
  }
  sources.push_back(std::move(source));
  return static_cast<std::uint32_t>(sources.size() - 1);
}

std::uint64_t Plan::bytes_to_copy() const {
  std::uint64_t total = 0;
  for (const PlannedFile& file : files) {
    if (file.is_packed()) total += file.packed_record_bytes;
    for (const PlannedRecord& record : file.records) total += record.nbytes;
  }
  return total;
}

namespace {

// Above this many rows the exact tiling check is skipped in release builds (the
// byte count and bounds are still checked).
constexpr std::uint64_t kTilingCheckRows = 1 << 22;

// offset + (rows - 1) * stride + nbytes, or nothing when it overflows 64 bits.
std::optional<std::uint64_t> span_end(std::uint64_t offset, std::uint64_t rows, std::uint64_t stride,
                                      std::uint64_t nbytes) {
  std::uint64_t end = 0;
  if (__builtin_mul_overflow(rows - 1, stride, &end) || __builtin_add_overflow(end, offset, &end) ||
      __builtin_add_overflow(end, nbytes, &end)) {
    return std::nullopt;
  }
  return end;
}

}  // namespace

namespace {

constexpr std::size_t kInlineWorthCompressing = 64 << 10;

// The bytes the zstd frames one after the other in `bytes` expand to, as their
// headers state them; ZSTD_CONTENTSIZE_ERROR when a frame is bad or does not say.
std::uint64_t frames_content_size(Bytes bytes) {
  std::uint64_t total = 0;
  while (!bytes.empty()) {
    std::size_t frame = ZSTD_findFrameCompressedSize(bytes.data(), bytes.size());
    if (ZSTD_isError(frame)) return ZSTD_CONTENTSIZE_ERROR;
    unsigned long long size = ZSTD_getFrameContentSize(bytes.data(), frame);
    if (size == ZSTD_CONTENTSIZE_ERROR || size == ZSTD_CONTENTSIZE_UNKNOWN) return ZSTD_CONTENTSIZE_ERROR;
    total += size;
    bytes = bytes.subspan(frame);
  }
  return total;
}

}  // namespace

void compress_inline(PlannedRecord& record) {
  if (record.inline_zstd || record.inline_bytes.size() < kInlineWorthCompressing) return;
  InlineRecordWriter writer(record.name);
  writer.append(record.inline_bytes);
  record = writer.finish();
}

InlineRecordWriter::InlineRecordWriter(std::string name) {
  record_.name = std::move(name);
}

void InlineRecordWriter::append(Bytes piece) {
  record_.nbytes += piece.size();
  pending_.insert(pending_.end(), piece.begin(), piece.end());
  if (pending_.size() >= kFrameBytes) compress_pending();
}

void InlineRecordWriter::compress_pending() {
  // One frame per piece, each stating its size: validate() adds them up.
  std::vector<std::byte>& frames = record_.inline_bytes;
  std::size_t used = frames.size();
  frames.resize(used + ZSTD_compressBound(pending_.size()));
  std::size_t n = ZSTD_compress(frames.data() + used, frames.size() - used, pending_.data(), pending_.size(), 1);
  check_invariant(!ZSTD_isError(n), "zstd cannot compress an inline record");
  frames.resize(used + n);
  record_.inline_zstd = true;
  pending_.clear();
}

PlannedRecord InlineRecordWriter::finish() {
  if (record_.inline_zstd || pending_.size() >= kInlineWorthCompressing) {
    if (!pending_.empty()) compress_pending();
  } else {
    record_.inline_bytes = std::move(pending_);
  }
  record_.inline_bytes.shrink_to_fit();
  return std::move(record_);
}

std::uint64_t planned_file_size(const PlannedFile& file) {
  return file.is_packed() ? file.packed_file_size : layout_file(file).file_size;
}

const PlannedFile& unpacked(const PlannedFile& file, std::optional<PlannedFile>& holder, const std::string& origin) {
  if (!file.is_packed()) return file;
  holder = unpack(file, origin);
  return *holder;
}

std::optional<PlannedFile> expand_inline(const PlannedFile& file) {
  std::optional<PlannedFile> holder;
  const std::vector<PlannedRecord>& records = unpacked(file, holder).records;
  bool any = std::any_of(records.begin(), records.end(), [](const PlannedRecord& r) { return r.inline_zstd; });
  if (!any) return holder;
  PlannedFile expanded = holder ? std::move(*holder) : file;
  for (PlannedRecord& record : expanded.records) {
    if (!record.inline_zstd) continue;
    std::vector<std::byte> bytes(record.nbytes);
    std::size_t n = ZSTD_decompress(bytes.data(), bytes.size(), record.inline_bytes.data(), record.inline_bytes.size());
    check_invariant(!ZSTD_isError(n) && n == record.nbytes, "an inline record does not expand to its size");
    record.inline_bytes = std::move(bytes);
    record.inline_zstd = false;
  }
  return expanded;
}

std::optional<std::size_t> record_index(const PlanSource& source, std::uint64_t offset) {
  auto it = std::upper_bound(source.records.begin(), source.records.end(), offset,
                             [](std::uint64_t at, const CheckedRange& r) { return at < r.offset; });
  if (it == source.records.begin() || offset >= std::prev(it)->end()) return std::nullopt;
  return static_cast<std::size_t>(std::prev(it) - source.records.begin());
}

namespace {

// Whether one record of `source` holds bytes [begin, end) (end > begin).
bool in_one_record(const PlanSource& source, std::uint64_t begin, std::uint64_t end) {
  std::optional<std::size_t> index = record_index(source, begin);
  return index && end <= source.records[*index].end();
}

// validate's checks; `fail(where, message)` throws. `exhaustive`: the tiling
// check runs however many rows there are.
template <typename Fail>
void check_plan(const Plan& plan, bool exhaustive, const std::string& origin, const Fail& fail) {
  for (const PlanSource& source : plan.sources) {
    std::uint64_t end = 0;
    for (const CheckedRange& record : source.records) {
      if (record.offset < end)
        fail(source.path, fmt::format("records overlap or are out of order at {}", record.offset));
      std::optional<std::uint64_t> record_end = span_end(record.offset, 1, 0, record.nbytes);
      if (!record_end || *record_end > source.size_bytes) fail(source.path, "a record past the end of the file");
      end = *record_end;
    }
  }
  for (const PlannedFile& planned : plan.files) {
    std::optional<PlannedFile> holder;
    const PlannedFile& file = unpacked(planned, holder, origin);
    if (file.container == Container::Archives) {
      bool ordered = !file.archives.empty() && file.archives.front() == 0 && file.archives.back() < file.records.size();
      for (std::size_t a = 1; a < file.archives.size() && ordered; ++a)
        ordered = file.archives[a - 1] < file.archives[a];
      if (!ordered) fail(file.path, "archives that do not start at ascending records from the first");
    } else if (!file.archives.empty()) {
      fail(file.path, "archives in a file of one zip or none");
    }
    for (const PlannedRecord& record : file.records) {
      auto bug = [&](const std::string& message) { fail(file.path + ": " + record.name, message); };
      if (record.copies.empty()) {
        std::uint64_t inline_size =
            record.inline_zstd ? frames_content_size(record.inline_bytes) : record.inline_bytes.size();
        if (inline_size != record.nbytes) bug("inline bytes do not match the record size");
        continue;
      }
      std::uint64_t covered = 0;
      std::uint64_t rows = 0;
      for (const Piece& piece : record.copies) {
        if (piece.rows == 0 || piece.nbytes == 0) bug("empty copy");
        if (piece.rows > 1 && piece.stride < piece.nbytes) bug("rows of a copy overlap");
        std::optional<std::uint64_t> dest_end = span_end(piece.offset, piece.rows, piece.stride, piece.nbytes);
        if (!dest_end || *dest_end > record.nbytes) bug("copy past the end of the record");
        if (piece.converts() && (piece.nbytes % dtype_info(piece.dest_dtype).itemsize != 0 ||
                                 piece.offset % dtype_info(piece.dest_dtype).itemsize != 0)) {
          bug("conversion of partial elements");
        }
        covered = checked_add(covered, checked_mul(piece.nbytes, piece.rows, "copy"), "copy");
        rows = checked_add(rows, piece.rows, "copy rows");
        if (!piece.mapped()) continue;
        if (piece.source >= plan.sources.size()) bug("copy from an unknown source");
        std::optional<std::uint64_t> source_end =
            span_end(piece.source_offset, piece.rows, piece.source_stride, piece.source_nbytes());
        const PlanSource& source = plan.sources[piece.source];
        if (!source_end || *source_end > source.size_bytes) bug("copy past the end of its source");
        if (!in_one_record(source, piece.source_offset, *source_end)) {
          bug(fmt::format("copy of bytes {}..{} of {}, outside every record of its zip directory", piece.source_offset,
                          *source_end, source.path));
        }
      }
      if (covered != record.nbytes)
        bug(fmt::format("copies cover {} bytes of a {}-byte record", covered, record.nbytes));
      if (record.sequential()) continue;
      if (!exhaustive && rows > kTilingCheckRows) continue;
      std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
      ranges.reserve(rows);
      for (const Piece& piece : record.copies) {
        for (std::uint64_t r = 0; r < piece.rows; ++r)
          ranges.emplace_back(piece.offset + r * piece.stride, piece.nbytes);
      }
      std::sort(ranges.begin(), ranges.end());
      std::uint64_t expected = 0;
      for (const auto& [start, length] : ranges) {
        if (start != expected) bug(fmt::format("gap or overlap at offset {}", start));
        expected += length;
      }
    }
  }
}

}  // namespace

void validate(const Plan& plan) {
#ifdef NDEBUG
  constexpr bool kExhaustive = false;
#else
  constexpr bool kExhaustive = true;
#endif
  check_plan(plan, kExhaustive, "a packed plan", [](const std::string& where, const std::string& message) {
    throw InternalError(fmt::format("invalid plan: {}: {}", where, message));
  });
}

void validate_untrusted(const Plan& plan, const std::string& origin) {
  check_plan(plan, /*exhaustive=*/true, origin, [&](const std::string& where, const std::string& message) {
    throw Error(Location{origin, where, std::nullopt}, "not a valid plan: " + message);
  });
}

std::vector<ArchiveLayout> archive_layouts(const PlannedFile& file) {
  std::vector<ArchiveLayout> out;
  std::uint64_t at = 0;
  for (std::size_t a = 0; a < file.archives.size(); ++a) {
    const std::size_t first = file.archives[a];
    const std::size_t end = a + 1 < file.archives.size() ? file.archives[a + 1] : file.records.size();
    check_invariant(first < end && end <= file.records.size(), "archives out of order or past the records");
    std::vector<ZipEntrySpec> specs;
    for (std::size_t r = first; r < end; ++r) specs.push_back({file.records[r].name, file.records[r].nbytes});
    ArchiveLayout archive;
    archive.start = checked_add(at, (kTorchAlignment - at % kTorchAlignment) % kTorchAlignment, "file size");
    archive.first_record = first;
    archive.zip = layout_zip(specs);
    at = checked_add(archive.start, archive.zip.file_size, "file size");
    out.push_back(std::move(archive));
  }
  return out;
}

ZipLayout layout_file(const PlannedFile& file) {
  if (file.container == Container::Zip) {
    std::vector<ZipEntrySpec> specs;
    for (const PlannedRecord& record : file.records) specs.push_back({record.name, record.nbytes});
    return layout_zip(specs);
  }
  if (file.container == Container::Archives) {
    ZipLayout layout;
    for (const ArchiveLayout& archive : archive_layouts(file)) {
      for (ZipRecord record : archive.zip.records) {
        record.header_offset += archive.start;
        record.data_offset += archive.start;
        layout.records.push_back(std::move(record));
      }
      layout.file_size = archive.start + archive.zip.file_size;
    }
    layout.central_directory_offset = layout.file_size;
    return layout;
  }
  ZipLayout layout;
  std::uint64_t at = 0;
  for (const PlannedRecord& record : file.records) {
    layout.records.push_back(ZipRecord{record.name, at, at, record.nbytes, 0});
    at = checked_add(at, record.nbytes, "file size");
  }
  layout.central_directory_offset = layout.file_size = at;
  return layout;
}

std::uint64_t record_alignment(const PlannedRecord& record) {
  std::uint64_t alignment = 1;
  for (const Piece& piece : record.copies) {
    if (piece.converts() || piece.source == Piece::kSynthetic) {
      alignment = std::max<std::uint64_t>(alignment, dtype_info(piece.dest_dtype).itemsize);
    }
  }
  return alignment;
}

}  // namespace ckpt
