#include "ckpt/exec.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "ckpt/crc32.hpp"
#include "ckpt/output_file.hpp"
#include "ckpt/synthetic.hpp"
#include "ckpt/zip.hpp"

namespace ckpt {

namespace {

// 8 MiB pieces: large enough that pwrite runs at memory speed (see
// ../shared/BUILD.md), small enough to balance threads and to bound the mapped
// pages each thread holds before releasing them.
constexpr std::uint64_t kPieceBytes = 8ull << 20;

// A piece is destination bytes [begin, end) of one record.
struct Piece {
  std::size_t record = 0;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::uint32_t crc32 = 0;
};

std::uint32_t crc32_of_zeros(std::uint64_t nbytes) {
  static const std::vector<std::byte> zeros(1 << 20);
  std::uint32_t crc = 0;
  while (nbytes > 0) {
    std::uint64_t n = std::min<std::uint64_t>(nbytes, zeros.size());
    crc = crc32_update(crc, Bytes(zeros.data(), n));
    nbytes -= n;
  }
  return crc;
}

class Progress {
 public:
  Progress(bool enabled, std::uint64_t total) : enabled_(enabled), total_(total), start_(Clock::now()) {}
  void add(std::uint64_t nbytes) {
    std::uint64_t done = done_.fetch_add(nbytes) + nbytes;
    if (!enabled_) return;
    auto now = Clock::now();
    std::lock_guard lock(mutex_);
    if (now - last_ < std::chrono::milliseconds(200) && done != total_) return;
    last_ = now;
    double seconds = std::chrono::duration<double>(now - start_).count();
    double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0.0;
    double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
    fmt::print(stderr, "\r{:.1f} / {:.1f} MiB  {:.0f} MiB/s  ETA {:.0f} s   ", static_cast<double>(done) / 1048576.0,
               static_cast<double>(total_) / 1048576.0, rate / 1048576.0, eta);
    if (done == total_) fmt::print(stderr, "\n");
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool enabled_;
  std::uint64_t total_;
  std::atomic<std::uint64_t> done_{0};
  Clock::time_point start_;
  Clock::time_point last_{};
  std::mutex mutex_;
};

class FileWriter {
 public:
  FileWriter(const Plan& plan, const PlannedFile& file, const ZipLayout& layout, const OutputFile& out,
             const ExecOptions& options)
      : plan_(plan), file_(file), layout_(layout), out_(out), options_(options) {
    for (const PlannedRecord& record : file.records) sequential_.push_back(record.sequential());
  }

  std::vector<Piece> cut_pieces() const {
    std::vector<Piece> pieces;
    for (std::size_t r = 0; r < file_.records.size(); ++r) {
      const PlannedRecord& record = file_.records[r];
      for (std::uint64_t begin = 0; begin < record.nbytes; begin += kPieceBytes) {
        pieces.push_back(Piece{r, begin, std::min(record.nbytes, begin + kPieceBytes), 0});
      }
    }
    return pieces;
  }

  void run_piece(Piece& piece, std::vector<std::byte>& buffer) const {
    const PlannedRecord& record = file_.records[piece.record];
    std::uint64_t base = layout_.records[piece.record].data_offset;
    std::uint64_t length = piece.end - piece.begin;
    if (record.copies.empty()) {
      Bytes data(record.inline_bytes.data() + piece.begin, length);
      out_.write_at(base + piece.begin, data);
      piece.crc32 = crc32(data);
      return;
    }
    if (sequential_[piece.record]) {
      // Plain ranges in order: find the first one that reaches this piece.
      auto it = std::upper_bound(record.copies.begin(), record.copies.end(), piece.begin,
                                 [](std::uint64_t offset, const CopyOp& op) { return offset < op.dest_offset + op.nbytes; });
      if (it != record.copies.end() && it->source != CopyOp::kSynthetic && it->dest_offset <= piece.begin &&
          it->dest_offset + it->nbytes >= piece.end) {
        write_range(*it, piece, base);  // the common case: one range, no buffer
        return;
      }
    }
    buffer.resize(length);
    gather(record, piece, buffer.data());
    Bytes data(buffer.data(), length);
    piece.crc32 = crc32(data);
    out_.write_at(base + piece.begin, data);
  }

 private:
  void write_range(const CopyOp& op, Piece& piece, std::uint64_t base) const {
    std::uint64_t length = piece.end - piece.begin;
    if (op.source == CopyOp::kZeros) {
      piece.crc32 = crc32_of_zeros(length);  // the preallocated file already reads as zeros
      return;
    }
    const MappedFile& source = *plan_.sources[op.source];
    std::uint64_t offset = op.source_offset + (piece.begin - op.dest_offset);
    Bytes data = source.bytes().subspan(offset, length);
    piece.crc32 = crc32(data);
    out_.write_at(base + piece.begin, data);
    source.release(offset, length);
  }

  // Fills `dest` (the piece's bytes) from every copy that reaches the piece.
  void gather(const PlannedRecord& record, const Piece& piece, std::byte* dest) const {
    for (const CopyOp& op : record.copies) {
      if (op.dest_end() <= piece.begin || op.dest_offset >= piece.end) continue;
      std::uint64_t touched_begin = UINT64_MAX;
      std::uint64_t touched_end = 0;
      std::uint64_t first_row = 0;
      if (op.rows > 1 && piece.begin > op.dest_offset) {
        first_row = (piece.begin - op.dest_offset) / op.dest_stride;
      }
      for (std::uint64_t r = first_row; r < op.rows; ++r) {
        std::uint64_t row_dest = op.dest_offset + r * op.dest_stride;
        if (row_dest >= piece.end) break;
        std::uint64_t from = std::max(row_dest, piece.begin);
        std::uint64_t to = std::min(row_dest + op.nbytes, piece.end);
        if (from >= to) continue;
        copy_part(op, r, from - row_dest, to - from, dest + (from - piece.begin));
        std::uint64_t row_source = op.source_offset + r * op.source_stride;
        touched_begin = std::min(touched_begin, row_source);
        touched_end = std::max(touched_end, row_source + op.source_nbytes());
      }
      // Drop the pages this piece has consumed from our mapping (they stay in
      // the page cache): the resident set stays bounded whatever the input size.
      if (op.mapped() && touched_end > touched_begin) {
        plan_.sources[op.source]->release(touched_begin, touched_end - touched_begin);
      }
    }
  }

  // Destination bytes [skip, skip + count) of row `row` of `op`.
  void copy_part(const CopyOp& op, std::uint64_t row, std::uint64_t skip, std::uint64_t count, std::byte* dest) const {
    if (op.source == CopyOp::kZeros) {
      std::memset(dest, 0, count);
      return;
    }
    std::uint64_t row_source = op.source_offset + row * op.source_stride;
    if (op.source == CopyOp::kSynthetic) {
      synthesize(op.dest_dtype, row_source + skip, count, dest);
      return;
    }
    const MappedFile& source = *plan_.sources[op.source];
    if (!op.converts()) {
      std::memcpy(dest, source.bytes().data() + row_source + skip, count);
      return;
    }
    std::uint64_t out_size = dtype_info(op.dest_dtype).itemsize;
    std::uint64_t in_size = dtype_info(op.source_dtype).itemsize;
    if (!options_.convert) throw Error("plan converts dtypes but no converter was given (a bug)");
    options_.convert(op.source_dtype, op.dest_dtype, source.bytes().data() + row_source + skip / out_size * in_size,
                     dest, count / out_size);
  }

  const Plan& plan_;
  const PlannedFile& file_;
  const ZipLayout& layout_;
  const OutputFile& out_;
  const ExecOptions& options_;
  std::vector<bool> sequential_;
};

void run_pieces(std::vector<Piece>& pieces, const FileWriter& writer, unsigned threads, Progress& progress) {
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    std::vector<std::byte> buffer;
    while (true) {
      std::size_t i = next.fetch_add(1);
      if (i >= pieces.size()) return;
      try {
        writer.run_piece(pieces[i], buffer);
        progress.add(pieces[i].end - pieces[i].begin);
      } catch (...) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next.store(pieces.size());
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

ExecStats execute(const Plan& plan, const ExecOptions& options) {
  validate(plan);
  auto start = std::chrono::steady_clock::now();
  unsigned threads = options.threads != 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  Progress progress(options.progress, plan.bytes_to_copy());
  ExecStats stats;
  for (const PlannedFile& file : plan.files) {
    std::vector<ZipEntrySpec> specs;
    for (const PlannedRecord& record : file.records) specs.push_back({record.name, record.nbytes});
    ZipLayout layout = layout_zip(specs);
    OutputFile out(file.path, layout.file_size, options.overwrite);
    FileWriter writer(plan, file, layout, out, options);
    std::vector<Piece> pieces = writer.cut_pieces();
    run_pieces(pieces, writer, threads, progress);

    // Pieces are in destination order within each record: fold their CRCs.
    std::vector<std::uint32_t> crcs(file.records.size(), 0);
    for (const Piece& piece : pieces) {
      crcs[piece.record] = crc32_concat(crcs[piece.record], piece.crc32, piece.end - piece.begin);
    }
    for (std::size_t r = 0; r < layout.records.size(); ++r) {
      layout.records[r].crc32 = crcs[r];
      std::vector<std::byte> header = render_local_header(layout.records[r]);
      out.write_at(layout.records[r].header_offset, header);
    }
    std::vector<std::byte> directory = render_central_directory(layout);
    out.write_at(layout.central_directory_offset, directory);
    out.commit();
    stats.bytes_written += layout.file_size;
  }
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

void read_source_bytes(const TensorSource& source, const std::vector<const MappedFile*>& files, std::uint64_t begin,
                       std::uint64_t count, std::byte* out) {
  if (begin + count > source.nbytes()) throw Error("read past the end of a tensor (a bug)");
  TensorSource window = source.slice(begin, count, {static_cast<std::int64_t>(count / dtype_info(source.dtype).itemsize)});
  for (const SourcePiece& piece : window.pieces) {
    for (std::uint64_t r = 0; r < piece.rows; ++r) {
      std::byte* dest = out + piece.offset + r * piece.stride;
      if (piece.file == SourcePiece::kZeroFile) {
        std::memset(dest, 0, piece.nbytes);
      } else {
        std::memcpy(dest, files.at(piece.file)->bytes().data() + piece.source_offset + r * piece.source_stride,
                    piece.nbytes);
      }
    }
  }
}

}  // namespace ckpt
