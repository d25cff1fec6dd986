#include "ckpt/exec/job_exec.hpp"

#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <optional>

#include "ckpt/exec/source_check.hpp"
#include "ckpt/exec/verify.hpp"
#include "ckpt/io/byte_writer.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/plan/plan_file.hpp"

namespace ckpt {

namespace {

// Byte positions times rank counts: past 64 bits for the largest checkpoints.
__extension__ using Wide = unsigned __int128;

// Rank 0's first word: the job's plan, its end, or verify's files to check.
enum class Word : std::uint8_t { End = 0, Plan = 1, Verify = 2 };
// Rank 0's last word: every output in place, or the exit code.
enum class Outcome : std::uint8_t { Failed = 0, Committed = 1 };

std::vector<std::byte> end_word(int exit_code) {
  ByteWriter out;
  out.u8(static_cast<std::uint8_t>(Word::End));
  out.u32(static_cast<std::uint32_t>(exit_code));
  return out.take();
}

void put_str(ByteWriter& out, std::string_view text) {
  out.u64(text.size());
  out.text(text);
}
std::string get_str(ByteReader& in) {
  return std::string(in.text(in.u64()));
}
void put_bytes(ByteWriter& out, Bytes bytes) {
  put_str(out, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}
Bytes get_bytes(ByteReader& in) {
  return in.take(in.u64());
}

// An error as data, for the rank that reports it.
void put_error(ByteWriter& out, const Error& error) {
  out.u8(static_cast<std::uint8_t>(error.kind()));
  put_str(out, error.where().file);
  put_str(out, error.where().member);
  out.u8(error.where().byte_offset ? 1 : 0);
  out.u64(error.where().byte_offset.value_or(0));
  put_str(out, error.message());
}
Error get_error(ByteReader& in) {
  auto kind = static_cast<ErrorKind>(std::min<std::uint8_t>(in.u8(), static_cast<std::uint8_t>(ErrorKind::Internal)));
  Location where;
  where.file = get_str(in);
  where.member = get_str(in);
  bool has_offset = in.u8() != 0;
  std::uint64_t offset = in.u64();
  if (has_offset) where.byte_offset = offset;
  std::string message = get_str(in);
  return Error(kind, std::move(where), std::move(message));
}

// The error of rank `rank`, said by rank 0: its line, the rank first.
Error of_rank(const Error& error, int rank, int ranks) {
  return Error(error.kind(), Location{}, fmt::format("rank {} of {}: {}", rank, ranks, error.what()));
}

// What went wrong, as an Error to send: a bug (InternalError) or a failed
// allocation fails the job like any error, instead of leaving the other ranks
// waiting for a report that never comes.
Error as_error(const std::exception& e) {
  if (const auto* error = dynamic_cast<const Error*>(&e)) return *error;
  if (dynamic_cast<const InternalError*>(&e) != nullptr) {
    return Error(ErrorKind::Internal, std::string("internal error: ") + e.what());
  }
  return Error(ErrorKind::Io, e.what());
}

// An error already said of a rank, on its way out of lead_job.
struct RankError {
  Error error;
};

int exit_code_of(ErrorKind kind) {
  return info_of(kind).exit_code;
}

std::uint64_t peak_rss_bytes() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<std::uint64_t>(usage.ru_maxrss) * 1024;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The options rank 0 runs with, as bytes; the callbacks stay each rank's.
void put_options(ByteWriter& out, const ExecOptions& options) {
  out.u32(options.threads);
  out.u8(options.overwrite ? 1 : 0);
  out.u8(options.direct_io ? 1 : 0);
  out.u8(options.check_crc ? 1 : 0);
}
ExecOptions get_options(ByteReader& in, const ExecOptions& local) {
  ExecOptions options = local;
  options.threads = in.u32();
  options.overwrite = in.u8() != 0;
  options.direct_io = in.u8() != 0;
  options.check_crc = in.u8() != 0;
  options.progress = nullptr;  // rank 0 reports for the job
  return options;
}

// A rank's share, written and durable: its whole files staged, its parts of
// shared files written. What it made stays until the outcome is known.
struct Share {
  Staged staged;                                      // its whole files
  std::vector<std::unique_ptr<OutputFile>> attached;  // the shared temporaries it wrote parts of (not rank 0's)
  std::vector<std::pair<std::size_t, std::vector<std::byte>>> reports;  // (file, part report)
  RankFigures figures;
};

// Writes rank `rank`'s share of `plan`. `shared_outputs` (rank 0) are the
// shared files' temporaries it created; other ranks open them by name.
Share write_share(const Plan& plan, const JobSplit& split, int rank, const std::vector<std::string>& shared_temps,
                  const std::vector<OutputFile*>& shared_outputs, const std::vector<const MappedFile*>& sources,
                  const ExecOptions& options, SourceCrcCheck* check) {
  auto start = std::chrono::steady_clock::now();
  Share share;
  const auto r = static_cast<std::size_t>(rank);
  share.staged = stage_files(plan, split.whole[r], sources, options, check);
  share.figures.files = split.whole[r].size();
  share.figures.bytes_written = share.staged.stats.bytes_written;
  for (const FilePart& part : split.parts[r]) {
    std::size_t index = static_cast<std::size_t>(std::lower_bound(split.shared.begin(), split.shared.end(), part.file) -
                                                 split.shared.begin());
    OutputFile* out = nullptr;
    if (!shared_outputs.empty()) {
      out = shared_outputs[index];
    } else {
      share.attached.push_back(OutputFile::attach(plan.files[part.file].path, shared_temps.at(index),
                                                  planned_file_size(plan.files[part.file])));
      out = share.attached.back().get();
    }
    std::vector<std::byte> report;
    share.figures.bytes_written += write_part(plan, part, *out, sources, options, check, report);
    if (shared_outputs.empty()) out->finish();  // this part durable
    share.reports.emplace_back(part.file, std::move(report));
    ++share.figures.parts;
  }
  share.figures.direct_files = share.staged.stats.direct_files;  // (a shared file is counted by rank 0)
  share.figures.seconds = seconds_since(start);
  share.figures.peak_rss_bytes = peak_rss_bytes();
  return share;
}

// A rank's report to rank 0: u8 ok; then the error, or: CRC notes, parts
// (u64 count, each u64 file + report), whole files' temporaries (u64 count,
// each u64 file + name), figures.
std::vector<std::byte> report_of(const Share& share, const JobSplit& split, int rank, const SourceCrcCheck* check) {
  ByteWriter out;
  out.u8(1);
  put_bytes(out, check != nullptr ? check->notes() : std::vector<std::byte>{});
  out.u64(share.reports.size());
  for (const auto& [file, report] : share.reports) {
    out.u64(file);
    put_bytes(out, report);
  }
  const std::vector<std::size_t>& whole = split.whole[static_cast<std::size_t>(rank)];
  out.u64(whole.size());
  for (std::size_t i = 0; i < whole.size(); ++i) {
    out.u64(whole[i]);
    put_str(out, std::filesystem::absolute(share.staged.outputs[i]->temp_path()).string());
  }
  out.u64(share.figures.bytes_written);
  out.u64(share.figures.files);
  out.u64(share.figures.parts);
  out.u64(share.figures.peak_rss_bytes);
  out.u64(share.figures.direct_files);
  out.u64(std::bit_cast<std::uint64_t>(share.figures.seconds));
  return out.take();
}

std::vector<std::byte> failure_report(const Error& error) {
  ByteWriter out;
  out.u8(0);
  put_error(out, error);
  return out.take();
}

std::vector<std::byte> outcome_word(Outcome outcome, int exit_code) {
  ByteWriter out;
  out.u8(static_cast<std::uint8_t>(outcome));
  out.u32(static_cast<std::uint32_t>(exit_code));
  return out.take();
}

}  // namespace

JobSplit split_job(const std::vector<std::uint64_t>& file_sizes, int ranks) {
  const auto n = static_cast<std::size_t>(std::max(ranks, 1));
  JobSplit split;
  split.whole.resize(n);
  split.parts.resize(n);
  split.bytes.assign(n, 0);
  Wide total = 0;
  for (std::uint64_t size : file_sizes) total += size;
  // The rank whose share holds byte `at` of the files laid end to end.
  auto rank_of = [&](Wide at) -> std::size_t {
    if (total == 0) return 0;
    return static_cast<std::size_t>(std::min<Wide>(n - 1, at * n / total));
  };
  Wide start = 0;
  for (std::size_t k = 0; k < file_sizes.size(); ++k) {
    const std::uint64_t size = file_sizes[k];
    const std::uint64_t units = unit_count(size);
    auto unit_rank = [&](std::uint64_t u) { return rank_of(start + static_cast<Wide>(u) * kUnitBytes); };
    const std::size_t first = rank_of(start);
    const std::size_t last = units == 0 ? first : unit_rank(units - 1);
    if (first == last) {
      split.whole[first].push_back(k);
      split.bytes[first] += size;
    } else {
      split.shared.push_back(k);
      for (std::uint64_t u = 0; u < units;) {
        std::size_t r = unit_rank(u);
        std::uint64_t end = u + 1;
        while (end < units && unit_rank(end) == r) ++end;
        split.parts[r].push_back(FilePart{k, u, end});
        split.bytes[r] += std::min<std::uint64_t>(end * kUnitBytes, size) - u * kUnitBytes;
        u = end;
      }
    }
    start += size;
  }
  return split;
}

std::optional<Error> agree_on_command(Job& job, const std::vector<std::string>& args) {
  ByteWriter out;
  out.u64(args.size());
  for (const std::string& arg : args) put_str(out, arg);
  std::vector<std::vector<std::byte>> all = job.gather(out.take());
  ByteWriter verdict;
  if (job.rank() == 0) {
    auto shown = [](Bytes encoded) {  // the arguments as a shell would take them back
      ByteReader in(encoded, "", "a command line");
      std::string text;
      for (std::uint64_t i = 0, n = in.u64(); i < n; ++i) {
        std::string arg = printable(get_str(in));
        bool quote = arg.empty() || arg.find_first_of(" \t'\"") != std::string::npos;
        if (i > 0) text.push_back(' ');
        if (quote) text.push_back('\'');
        text.append(arg);
        if (quote) text.push_back('\'');
      }
      return text;
    };
    auto other = std::find_if(all.begin() + 1, all.end(), [&](const auto& bytes) { return bytes != all[0]; });
    if (other == all.end()) {
      verdict.u8(1);
    } else {
      verdict.u8(0);
      put_str(verdict, fmt::format("rank {} of {}: started as `{}`, rank 0 as `{}`: every rank of a job runs one "
                                   "command line",
                                   other - all.begin(), job.size(), shown(*other), shown(all[0])));
    }
  }
  std::vector<std::byte> said = job.broadcast(verdict.take());
  ByteReader in(said, "", "rank 0's verdict");
  if (in.u8() == 1) return std::nullopt;
  return Error(ErrorKind::Usage, get_str(in));
}

void end_job(Job& job, int exit_code) {
  job.broadcast(end_word(exit_code));
}

namespace {

// The files of `paths` (indices) each rank checks: split_job's cut by bytes,
// a file across shares going to the rank of its first byte.
std::vector<std::size_t> files_of_rank(const std::vector<std::string>& paths, int ranks, int rank) {
  std::vector<std::uint64_t> sizes;
  for (const std::string& path : paths) {
    std::error_code ec;
    std::uint64_t size = std::filesystem::file_size(path, ec);
    sizes.push_back(ec ? 0 : size);  // (its check says why)
  }
  JobSplit split = split_job(sizes, ranks);
  std::vector<bool> mine(paths.size(), false);
  for (std::size_t k : split.whole[static_cast<std::size_t>(rank)]) mine[k] = true;
  for (const FilePart& part : split.parts[static_cast<std::size_t>(rank)]) mine[part.file] = part.first_unit == 0;
  std::vector<std::size_t> out;
  for (std::size_t k = 0; k < paths.size(); ++k) {
    if (mine[k]) out.push_back(k);
  }
  return out;
}

std::vector<std::byte> verify_report_bytes(const VerifyReport& report) {
  ByteWriter out;
  out.u64(report.records);
  out.u64(report.bytes);
  out.u64(report.problems.size());
  for (const std::string& problem : report.problems) put_str(out, problem);
  out.u64(report.unread.size());
  for (std::size_t index : report.unread) out.u64(index);
  return out.take();
}

}  // namespace

VerifyReport lead_crc_check(Job& job, const std::vector<std::string>& paths, unsigned threads) {
  ByteWriter out;
  out.u8(static_cast<std::uint8_t>(Word::Verify));
  out.u32(threads);
  out.u64(paths.size());
  for (const std::string& path : paths) put_str(out, std::filesystem::absolute(path).lexically_normal().string());
  job.broadcast(out.take());
  VerifyReport joined = check_crcs_of(paths, files_of_rank(paths, job.size(), 0), threads);
  std::vector<std::vector<std::byte>> reports = job.gather(verify_report_bytes(joined));
  for (std::size_t r = 1; r < reports.size(); ++r) {
    ByteReader in(reports[r], "", "a rank's CRC report");
    joined.records += in.u64();
    joined.bytes += in.u64();
    for (std::uint64_t i = 0, n = in.u64(); i < n; ++i) joined.problems.push_back(get_str(in));
    for (std::uint64_t i = 0, n = in.u64(); i < n; ++i) joined.unread.push_back(in.u64());
  }
  return joined;
}

JobStats lead_job(Job& job, const Plan& plan, const ExecOptions& options) {
  auto start = std::chrono::steady_clock::now();
  const int ranks = job.size();
  JobSplit split;
  std::vector<std::unique_ptr<OutputFile>> shared;  // created here, written by several ranks
  std::optional<MadeDirectories> made;
  std::vector<std::unique_ptr<MappedFile>> mapped;
  std::vector<const MappedFile*> sources;
  std::vector<std::byte> word;
  try {
    validate(plan);
    made.emplace(prepare(plan, options));
    std::vector<std::uint64_t> sizes;
    for (const PlannedFile& file : plan.files) sizes.push_back(planned_file_size(file));
    split = split_job(sizes, ranks);
    for (std::size_t k : split.shared) {
      shared.push_back(std::make_unique<OutputFile>(plan.files[k].path, sizes[k], options.overwrite));
    }
    mapped = map_sources(plan);
    for (const auto& file : mapped) sources.push_back(file.get());
    ByteWriter out;
    out.u8(static_cast<std::uint8_t>(Word::Plan));
    put_options(out, options);
    out.u64(shared.size());
    // (absolute: a rank may run in another working directory)
    for (const auto& file : shared) put_str(out, std::filesystem::absolute(file->temp_path()).string());
    Plan sent = plan;           // (packed: a few KB a file)
    make_paths_absolute(sent);  // the ranks share the file system, not the working directory
    put_bytes(out, serialize_plan(sent));
    word = out.take();
  } catch (const std::exception& e) {
    end_job(job, exit_code_of(as_error(e).kind()));
    throw;
  }
  job.broadcast(std::move(word));

  // This rank's share, its inputs noted for the one check of the job. From
  // here to the gather nothing may leave without a report: the others wait.
  std::optional<SourceCrcCheck> check;
  std::optional<Share> share;
  std::vector<std::byte> own;
  try {
    std::vector<std::size_t> all(plan.files.size());
    for (std::size_t k = 0; k < all.size(); ++k) all[k] = k;
    if (options.check_crc) check.emplace(plan, all, sources);
    std::vector<OutputFile*> shared_outputs;
    for (const auto& file : shared) shared_outputs.push_back(file.get());
    share.emplace(write_share(plan, split, 0, {}, shared_outputs, sources, options, check ? &*check : nullptr));
    own = report_of(*share, split, 0, nullptr);  // (its notes are in `check` already)
  } catch (const std::exception& e) {
    own = failure_report(as_error(e));
  }
  std::vector<std::vector<std::byte>> reports = job.gather(own);

  JobStats stats;
  // Every rank removes what it made; the folders made for the outputs go
  // last, once empty: after the others said their temporaries are gone.
  auto fail = [&](const Error& error) -> Error {
    job.broadcast(outcome_word(Outcome::Failed, exit_code_of(error.kind())));
    share.reset();
    shared.clear();
    job.gather({});
    return error;
  };
  // The first failure in rank order is the job's.
  for (int r = 0; r < ranks; ++r) {
    ByteReader in(reports[static_cast<std::size_t>(r)], "", "a rank's report");
    if (in.u8() == 0) throw fail(of_rank(get_error(in), r, ranks));
  }
  try {
    // Rank 0 renames every output, in the plan's order (the keystone last).
    std::vector<std::unique_ptr<OutputFile>> ordered(plan.files.size());
    std::vector<std::vector<Bytes>> part_reports(split.shared.size());
    stats.ranks.resize(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) {
      ByteReader in(reports[static_cast<std::size_t>(r)], "", "a rank's report");
      in.u8();
      Bytes notes = get_bytes(in);
      if (check && r != 0) check->add_notes(notes, r);
      for (std::uint64_t i = 0, n = in.u64(); i < n; ++i) {
        std::uint64_t file = in.u64();
        auto at = std::lower_bound(split.shared.begin(), split.shared.end(), file);
        check_invariant(at != split.shared.end() && *at == file, "a part of a file that is not shared");
        part_reports[static_cast<std::size_t>(at - split.shared.begin())].push_back(get_bytes(in));
      }
      for (std::uint64_t i = 0, n = in.u64(); i < n; ++i) {
        std::uint64_t file = in.u64();
        std::string temp = get_str(in);
        check_invariant(file < ordered.size(), "a whole file past the plan");
        ordered[file] =
            OutputFile::adopt(plan.files[file].path, temp, planned_file_size(plan.files[file]), options.overwrite);
      }
      RankFigures& figures = stats.ranks[static_cast<std::size_t>(r)];
      figures.bytes_written = in.u64();
      figures.files = in.u64();
      figures.parts = in.u64();
      figures.peak_rss_bytes = in.u64();
      figures.direct_files = in.u64();
      stats.exec.direct_files += figures.direct_files;
      figures.seconds = std::bit_cast<double>(in.u64());
      stats.exec.copy_seconds = std::max(stats.exec.copy_seconds, figures.seconds);  // the ranks at once
    }
    // Rank 0's own whole files are its staged outputs.
    for (std::size_t i = 0; i < split.whole[0].size(); ++i)
      ordered[split.whole[0][i]] = std::move(share->staged.outputs[i]);
    try {
      finish_check(check ? &*check : nullptr, options, stats.exec);
    } catch (const Error& error) {  // said of the rank that read the bytes
      throw RankError{of_rank(error, check->failed_reader(), ranks)};
    }
    auto t_commit = std::chrono::steady_clock::now();
    for (std::size_t s = 0; s < split.shared.size(); ++s) {
      finish_shared(plan, split.shared[s], *shared[s], sources, options, part_reports[s]);
      if (shared[s]->direct_io()) ++stats.exec.direct_files;
      ordered[split.shared[s]] = std::move(shared[s]);
    }
    Staged all_outputs;
    all_outputs.outputs = std::move(ordered);
    commit(plan, all_outputs, options);
    made->keep();
    stats.exec.commit_seconds = seconds_since(t_commit);
    for (const RankFigures& figures : stats.ranks) stats.exec.bytes_written += figures.bytes_written;
  } catch (const RankError& failed) {
    throw fail(failed.error);
  } catch (const std::exception& e) {
    throw fail(of_rank(as_error(e), 0, ranks));
  }
  job.broadcast(outcome_word(Outcome::Committed, 0));
  stats.exec.seconds = seconds_since(start);
  return stats;
}

namespace {

// A rank's share of verify's CRC pass; its report to rank 0 (the counts, the
// problems, the files it could not read). Verify's exit code is rank 0's.
int follow_crc_check(Job& job, ByteReader& in) {
  unsigned threads = in.u32();
  std::vector<std::string> paths(in.u64());
  for (std::string& path : paths) path = get_str(in);
  job.gather(verify_report_bytes(check_crcs_of(paths, files_of_rank(paths, job.size(), job.rank()), threads)));
  return 0;
}

}  // namespace

int follow_job(Job& job, const ExecOptions& local) {
  std::vector<std::byte> word = job.broadcast({});
  ByteReader in(word, "", "rank 0's word");
  const auto kind = static_cast<Word>(in.u8());
  if (kind == Word::End) return static_cast<int>(in.u32());
  if (kind == Word::Verify) return follow_crc_check(job, in);
  ExecOptions options = get_options(in, local);
  std::vector<std::string> shared_temps(in.u64());
  for (std::string& temp : shared_temps) temp = get_str(in);
  Bytes plan_bytes = get_bytes(in);

  std::optional<Share> share;
  std::vector<std::byte> report;
  try {
    Plan plan = parse_plan(plan_bytes, "the plan of rank 0");
    std::vector<std::unique_ptr<MappedFile>> mapped = map_sources(plan);
    std::vector<const MappedFile*> sources;
    for (const auto& file : mapped) sources.push_back(file.get());
    std::optional<SourceCrcCheck> check;
    if (options.check_crc) check.emplace(plan, std::vector<std::size_t>{}, sources);
    std::vector<std::uint64_t> sizes;
    for (const PlannedFile& file : plan.files) sizes.push_back(planned_file_size(file));
    JobSplit split = split_job(sizes, job.size());
    share.emplace(write_share(plan, split, job.rank(), shared_temps, {}, sources, options, check ? &*check : nullptr));
    report = report_of(*share, split, job.rank(), check ? &*check : nullptr);
  } catch (const std::exception& e) {
    share.reset();  // its temporaries removed before rank 0 hears of the failure
    report = failure_report(as_error(e));
  }
  job.gather(report);
  std::vector<std::byte> outcome = job.broadcast({});
  ByteReader result(outcome, "", "rank 0's outcome");
  if (static_cast<Outcome>(result.u8()) == Outcome::Committed) {
    if (share) {
      for (auto& out : share->staged.outputs) out->release();
    }
    return 0;
  }
  share.reset();  // its temporaries removed, then said so
  job.gather({});
  return static_cast<int>(result.u32());
}

}  // namespace ckpt
