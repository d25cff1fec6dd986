#include "ckpt/plan/plan_file.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <string_view>

#include "ckpt/io/byte_writer.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/io/zstd.hpp"

namespace ckpt {

namespace {

constexpr std::string_view kMagic = "CKPTPLAN";
constexpr std::size_t kHeaderBytes = kMagic.size() + 4 + 4;  // magic, version, CRC-32 of the expanded plan
constexpr std::uint8_t kDTypes = static_cast<std::uint8_t>(DType::Complex128) + 1;

// The smallest encoding of one element of each list: what a count is checked
// against before anything is allocated for it.
constexpr std::uint64_t kStrBytes = 8;
constexpr std::uint64_t kCheckedRangeBytes = 8 + 8 + 4;
constexpr std::uint64_t kSourceBytes = kStrBytes + 8 * 4 + 1 + 8 + 8;
constexpr std::uint64_t kPieceBytes = 4 + 8 * 6 + 2;
constexpr std::uint64_t kRecordBytes = kStrBytes + 8 + 1 + kStrBytes + 8;
constexpr std::uint64_t kFileBytes = kStrBytes + 1 + 8;

class Writer {
 public:
  void str(std::string_view text) {
    out_.u64(text.size());
    out_.text(text);
  }
  void bytes(const std::vector<std::byte>& data) {
    out_.u64(data.size());
    out_.text(std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
  }
  void strs(const std::vector<std::string>& list) {
    out_.u64(list.size());
    for (const std::string& text : list) str(text);
  }
  void source(const PlanSource& source) {
    str(source.path);
    out_.u64(source.size_bytes);
    out_.u64(static_cast<std::uint64_t>(source.mtime_ns));
    out_.u64(source.device);
    out_.u64(source.inode);
    out_.u8(source.has_crcs ? 1 : 0);
    out_.u64(static_cast<std::uint64_t>(source.ctime_ns));
    out_.u64(source.records.size());
    for (const CheckedRange& record : source.records) {
      out_.u64(record.offset);
      out_.u64(record.nbytes);
      out_.u32(record.crc32);
    }
  }
  void file(const PlannedFile& file) {
    str(file.path);
    out_.u8(static_cast<std::uint8_t>(file.container));
    out_.u8(file.is_packed() ? 1 : 0);
    if (!file.is_packed()) {
      records(file);
      return;
    }
    out_.u64(file.packed_file_size);
    out_.u64(file.packed_record_bytes);
    bytes(file.packed);
  }
  void records(const PlannedFile& file) {
    if (file.container == Container::Archives) {  // (only then: plans of the other containers read as before)
      out_.u64(file.archives.size());
      for (std::uint64_t first : file.archives) out_.u64(first);
    }
    out_.u64(file.records.size());
    for (const PlannedRecord& record : file.records) {
      str(record.name);
      out_.u64(record.nbytes);
      out_.u8(record.inline_zstd ? 1 : 0);
      bytes(record.inline_bytes);
      out_.u64(record.copies.size());
      for (const Piece& piece : record.copies) this->piece(piece);
    }
  }
  void plan(const Plan& plan) {
    out_.u64(plan.sources.size());
    for (const PlanSource& s : plan.sources) source(s);
    out_.u64(plan.files.size());
    for (const PlannedFile& f : plan.files) file(f);
    strs(plan.directories);
    strs(plan.stale_files);
    strs(plan.read_only);
  }
  void piece(const Piece& piece) {
    out_.u32(piece.source);
    out_.u64(piece.source_offset);
    out_.u64(piece.offset);
    out_.u64(piece.nbytes);
    out_.u64(piece.rows);
    out_.u64(piece.source_stride);
    out_.u64(piece.stride);
    out_.u8(static_cast<std::uint8_t>(piece.source_dtype));
    out_.u8(static_cast<std::uint8_t>(piece.dest_dtype));
  }
  std::string take() {
    std::vector<std::byte> bytes = out_.take();
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
  }

 private:
  ByteWriter out_;
};

class Reader {
 public:
  Reader(Bytes bytes, const std::string& origin, const char* what = "the expanded plan") : in_(bytes, origin, what) {}

  // A count of elements each at least `min_bytes` long, checked against what is left.
  std::uint64_t count(std::uint64_t min_bytes, const char* what) {
    std::uint64_t n = in_.u64();
    if (n > in_.remaining() / min_bytes) {
      in_.fail(in_.position() - 8,
               fmt::format("{} {}: more than the plan's {} bytes left can hold", n, what, in_.remaining()));
    }
    return n;
  }
  std::string str(const char* what) { return std::string(in_.text(count(1, what))); }
  // A path: absolute (write_plan wrote it so) and without NUL bytes, which a
  // system call would cut it at.
  std::string path(const char* what) {
    std::size_t at = in_.position();
    std::string text = str(what);
    if (!text.starts_with('/') || text.find('\0') != std::string::npos) {
      in_.fail(at, fmt::format("{} '{}' is not an absolute path", what, printable(text)));
    }
    return text;
  }
  std::vector<std::string> paths(const char* what) {
    std::vector<std::string> out(count(kStrBytes, what));
    for (std::string& text : out) text = path(what);
    return out;
  }
  std::vector<std::byte> bytes(const char* what) {
    Bytes data = in_.take(count(1, what));
    return {data.begin(), data.end()};
  }
  bool flag(const char* what) {
    std::uint8_t value = in_.u8();
    if (value > 1) in_.fail(in_.position() - 1, fmt::format("{} is {}, not 0 or 1", what, value));
    return value == 1;
  }
  DType dtype() {
    std::uint8_t value = in_.u8();
    if (value >= kDTypes) in_.fail(in_.position() - 1, fmt::format("no dtype has the number {}", value));
    return static_cast<DType>(value);
  }

  PlanSource source() {
    PlanSource source;
    source.path = path("an input");
    source.size_bytes = in_.u64();
    source.mtime_ns = static_cast<std::int64_t>(in_.u64());
    source.device = in_.u64();
    source.inode = in_.u64();
    source.has_crcs = flag("has_crcs");
    source.ctime_ns = static_cast<std::int64_t>(in_.u64());
    source.records.resize(count(kCheckedRangeBytes, "source records"));
    for (CheckedRange& record : source.records) {
      record.offset = in_.u64();
      record.nbytes = in_.u64();
      record.crc32 = in_.u32();
    }
    return source;
  }
  PlannedFile file() {
    PlannedFile file;
    file.path = path("an output");
    std::uint8_t container = in_.u8();
    if (container > static_cast<std::uint8_t>(Container::Archives)) {
      in_.fail(in_.position() - 1, fmt::format("no container has the number {}", container));
    }
    file.container = static_cast<Container>(container);
    if (flag("packed")) {
      file.packed_file_size = in_.u64();
      file.packed_record_bytes = in_.u64();
      file.packed = bytes("packed records");
      if (!file.is_packed()) in_.fail(in_.position(), "a packed file without records");
      return file;
    }
    records(file);
    return file;
  }
  // The records of `file` (its container read), and nothing after them when `whole`.
  void records(PlannedFile& file, bool whole = false) {
    if (file.container == Container::Archives) {
      file.archives.resize(count(8, "archives"));
      for (std::uint64_t& first : file.archives) first = in_.u64();
    }
    file.records.resize(count(kRecordBytes, "records"));
    for (PlannedRecord& record : file.records) {
      record.name = str("record name bytes");
      record.nbytes = in_.u64();
      record.inline_zstd = flag("inline_zstd");
      record.inline_bytes = bytes("inline bytes");
      record.copies.resize(count(kPieceBytes, "copies"));
      for (Piece& piece : record.copies) piece = this->piece();
    }
    if (whole && !in_.at_end()) in_.fail_here(fmt::format("{} bytes after the records", in_.remaining()));
  }
  Piece piece() {
    Piece piece;
    piece.source = in_.u32();
    piece.source_offset = in_.u64();
    piece.offset = in_.u64();
    piece.nbytes = in_.u64();
    piece.rows = in_.u64();
    piece.source_stride = in_.u64();
    piece.stride = in_.u64();
    piece.source_dtype = dtype();
    piece.dest_dtype = dtype();
    return piece;
  }
  Plan plan() {
    Plan plan;
    plan.sources.resize(count(kSourceBytes, "sources"));
    for (PlanSource& source : plan.sources) source = this->source();
    plan.files.resize(count(kFileBytes, "output files"));
    for (PlannedFile& file : plan.files) file = this->file();
    plan.directories = paths("a folder");
    plan.stale_files = paths("a stale file");
    plan.read_only = paths("a file read");
    if (!in_.at_end()) in_.fail_here(fmt::format("{} bytes after the plan", in_.remaining()));
    return plan;
  }

 private:
  ByteReader in_;
};

}  // namespace

void pack(PlannedFile& file) {
  if (file.is_packed()) return;
  Writer writer;
  writer.records(file);
  std::string encoded = writer.take();
  std::string compressed = zstd_compress(encoded, Location{file.path, "", std::nullopt});
  file.packed_file_size = layout_file(file).file_size;
  file.packed_record_bytes = 0;
  for (const PlannedRecord& record : file.records) file.packed_record_bytes += record.nbytes;
  const auto* begin = reinterpret_cast<const std::byte*>(compressed.data());
  file.packed.assign(begin, begin + compressed.size());
  // (moved out: `= {}` would keep the capacity, 60 KB a reshard output)
  std::vector<PlannedRecord>().swap(file.records);
  std::vector<std::uint64_t>().swap(file.archives);
}

PlannedFile unpack(const PlannedFile& file, const std::string& origin) {
  check_invariant(file.is_packed(), "unpack of a file that is not packed");
  Location where{origin, file.path, std::nullopt};
  std::string encoded = zstd_decompress(file.packed, where, kMaxPlanBytes, "a plan");
  PlannedFile out;
  out.path = file.path;
  out.container = file.container;
  Reader(Bytes(reinterpret_cast<const std::byte*>(encoded.data()), encoded.size()), origin, "packed records")
      .records(out, /*whole=*/true);
  std::uint64_t record_bytes = 0;
  for (const PlannedRecord& record : out.records) record_bytes += record.nbytes;
  if (record_bytes != file.packed_record_bytes || layout_file(out).file_size != file.packed_file_size) {
    throw Error(where,
                fmt::format("not a valid plan: packed records of {} bytes in a file of {}, not {} in {}", record_bytes,
                            layout_file(out).file_size, file.packed_record_bytes, file.packed_file_size));
  }
  return out;
}

std::vector<std::byte> serialize_plan(const Plan& plan) {
  Writer body;
  body.plan(plan);
  std::string expanded = body.take();
  std::string compressed = zstd_compress(expanded, Location{"a plan", "", std::nullopt});
  ByteWriter out;
  out.text(kMagic);
  out.u32(kPlanFileVersion);
  out.u32(crc32(Bytes(reinterpret_cast<const std::byte*>(expanded.data()), expanded.size())));
  out.text(compressed);
  return out.take();
}

Plan parse_plan(Bytes bytes, const std::string& origin) {
  ByteReader header(bytes, origin, "");
  if (bytes.size() < kHeaderBytes || header.text(kMagic.size()) != kMagic) {
    throw Error(Location{origin, "", 0}, "not a plan written by ckpt-tool (no CKPTPLAN header)");
  }
  std::uint32_t version = header.u32();
  if (version != kPlanFileVersion) {
    throw Error(Location{origin, "", kMagic.size()},
                fmt::format("a plan of format version {}; this ckpt-tool reads version {} (plan again with it)",
                            version, kPlanFileVersion));
  }
  std::uint32_t recorded = header.u32();
  std::string expanded = zstd_decompress(header.rest(), Location{origin, "", kHeaderBytes}, kMaxPlanBytes, "a plan");
  Bytes body(reinterpret_cast<const std::byte*>(expanded.data()), expanded.size());
  if (std::uint32_t crc = crc32(body); crc != recorded) {
    throw Error(ErrorKind::CorruptData, Location{origin, "", kHeaderBytes},
                fmt::format("CRC-32 of the plan is 0x{:08x}, its header says 0x{:08x}: the plan file is damaged "
                            "(save the plan again)",
                            crc, recorded));
  }
  Plan plan = Reader(body, origin).plan();
  validate_untrusted(plan, origin);
  // A compressed inline record is expanded when its file is written: its frame
  // must expand to its size, within the bound of a whole plan.
  std::uint64_t expanded_inline = 0;
  for (const PlannedFile& planned : plan.files) {
    std::optional<PlannedFile> holder;
    const PlannedFile& file = unpacked(planned, holder, origin);
    for (const PlannedRecord& record : file.records) {
      if (!record.inline_zstd) continue;
      Location where{origin, file.path + ": " + record.name, std::nullopt};
      std::string bytes = zstd_decompress(record.inline_bytes, where, kMaxPlanBytes - expanded_inline, "a plan");
      if (bytes.size() != record.nbytes) {
        throw Error(where, fmt::format("not a valid plan: compressed inline bytes expand to {} bytes, not {}",
                                       bytes.size(), record.nbytes));
      }
      expanded_inline += bytes.size();
    }
  }
  return plan;
}

void make_paths_absolute(Plan& plan) {
  auto absolute = [](std::string& p) { p = std::filesystem::absolute(p).lexically_normal().string(); };
  for (PlanSource& source : plan.sources) absolute(source.path);
  for (PlannedFile& file : plan.files) absolute(file.path);
  for (auto* list : {&plan.directories, &plan.stale_files, &plan.read_only}) {
    for (std::string& p : *list) absolute(p);
  }
}

void write_plan(Plan plan, const std::string& path, bool overwrite) {
  make_paths_absolute(plan);
  std::vector<std::byte> bytes = serialize_plan(plan);
  std::vector<FileIdentity> inputs;
  for (const PlanSource& source : plan.sources) {
    if (auto identity = identity_of(source.path)) inputs.push_back(*identity);
  }
  check_output_targets({{path, bytes.size()}}, inputs, overwrite, {});
  OutputFile out(path, bytes.size(), overwrite);
  out.write_at(0, bytes);
  out.commit();
}

Plan read_plan(const std::string& path) {
  MappedFile file(path);
  return parse_plan(file.bytes(), path);
}

}  // namespace ckpt
