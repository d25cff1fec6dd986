#include "ckpt/exec.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

#include "ckpt/crc32.hpp"
#include "ckpt/output_file.hpp"
#include "ckpt/zip.hpp"

namespace ckpt {

namespace {

// Pieces of at most 8 MiB: large enough that pwrite runs at memory speed (see
// ../shared/BUILD.md), small enough to balance threads and bound the mapped
// pages each thread holds before releasing them.
constexpr std::uint64_t kPieceBytes = 8ull << 20;

struct Piece {
  std::size_t record = 0;
  std::uint64_t dest_offset = 0;  // absolute, in the output file
  std::uint32_t source = CopyOp::kZeros;
  std::uint64_t source_offset = 0;
  std::uint64_t nbytes = 0;
  const std::byte* inline_data = nullptr;
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
    fmt::print(stderr, "\r{:.1f} / {:.1f} MiB  {:.0f} MiB/s  ETA {:.0f} s   ", done / 1048576.0,
               total_ / 1048576.0, rate / 1048576.0, eta);
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

void run_pieces(std::vector<Piece>& pieces, const Plan& plan, const OutputFile& out, unsigned threads,
                Progress& progress) {
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    while (true) {
      std::size_t i = next.fetch_add(1);
      if (i >= pieces.size()) return;
      Piece& piece = pieces[i];
      try {
        if (piece.inline_data != nullptr) {
          Bytes data(piece.inline_data, piece.nbytes);
          out.write_at(piece.dest_offset, data);
          piece.crc32 = crc32(data);
        } else if (piece.source == CopyOp::kZeros) {
          piece.crc32 = crc32_of_zeros(piece.nbytes);  // the preallocated file already reads as zeros
        } else {
          const MappedFile& source = *plan.sources[piece.source];
          Bytes data = source.bytes().subspan(piece.source_offset, piece.nbytes);
          piece.crc32 = crc32(data);
          out.write_at(piece.dest_offset, data);
          source.release(piece.source_offset, piece.nbytes);
        }
        progress.add(piece.nbytes);
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

    std::vector<Piece> pieces;
    for (std::size_t r = 0; r < file.records.size(); ++r) {
      const PlannedRecord& record = file.records[r];
      std::uint64_t base = layout.records[r].data_offset;
      if (record.copies.empty()) {
        if (record.nbytes > 0) pieces.push_back(Piece{r, base, CopyOp::kZeros, 0, record.nbytes, record.inline_bytes.data(), 0});
        continue;
      }
      for (const CopyOp& op : record.copies) {
        for (std::uint64_t done = 0; done < op.nbytes; done += kPieceBytes) {
          std::uint64_t n = std::min(kPieceBytes, op.nbytes - done);
          std::uint64_t source_offset = op.source == CopyOp::kZeros ? 0 : op.source_offset + done;
          pieces.push_back(Piece{r, base + op.dest_offset + done, op.source, source_offset, n, nullptr, 0});
        }
      }
    }
    run_pieces(pieces, plan, out, threads, progress);

    // Pieces are in destination order within each record: fold their CRCs.
    std::vector<std::uint32_t> crcs(file.records.size(), 0);
    for (const Piece& piece : pieces) crcs[piece.record] = crc32_concat(crcs[piece.record], piece.crc32, piece.nbytes);
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

}  // namespace ckpt
