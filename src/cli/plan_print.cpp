#include "plan_print.hpp"

#include <fmt/format.h>
#include <fmt/ostream.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include <filesystem>
#include <map>

#include "ckpt/exec/job_exec.hpp"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/format/zip.hpp"
#include "ckpt/io/output_file.hpp"
#include "ckpt/plan/plan_file.hpp"
#include "command_line.hpp"
#include "inputs.hpp"
#include "usage.hpp"

namespace ckpt::cli {

namespace {

// "1 copy", "3 copies".
std::string copies_text(std::size_t count) {
  return fmt::format("{} {}", count, count == 1 ? "copy" : "copies");
}

std::string describe_piece(const Plan& plan, const Piece& piece) {
  std::string source =
      piece.source == Piece::kZeros ? "zeros"
      : piece.source == Piece::kSynthetic
          ? fmt::format("synthetic@0x{:x}", piece.source_offset)
          : fmt::format("{}@0x{:x}",
                        printable(std::filesystem::path(plan.sources[piece.source].path).filename().string()),
                        piece.source_offset);
  std::string rows =
      piece.rows > 1 ? fmt::format(" x {} rows (stride {} -> {})", piece.rows, piece.source_stride, piece.stride) : "";
  std::string convert =
      piece.converts() ? fmt::format(" {}->{}", dtype_info(piece.source_dtype).name, dtype_info(piece.dest_dtype).name)
                       : "";
  return fmt::format("{} -> +{} ({} B{}{})", source, piece.offset, piece.nbytes, rows, convert);
}

// A record's first three copies, one line each, and how many more.
void print_first_copies(const Plan& plan, const PlannedRecord& record, std::ostream& out) {
  for (std::size_t i = 0; i < record.copies.size() && i < 3; ++i) {
    fmt::print(out, "    {}\n", describe_piece(plan, record.copies[i]));
  }
  if (record.copies.size() > 3) fmt::print(out, "    ... {} more\n", record.copies.size() - 3);
}

}  // namespace

void print_plan(const Plan& plan, const std::vector<std::vector<NamedTensor>>& tensors, std::ostream& out) {
  std::uint64_t total_copy = 0;
  std::uint64_t total_size = 0;
  for (std::size_t k = 0; k < plan.files.size(); ++k) {
    std::optional<PlannedFile> holder;
    const PlannedFile& file = unpacked(plan.files[k], holder);
    std::map<std::string, const PlannedRecord*> by_name;
    for (const PlannedRecord& record : file.records) by_name[record.name] = &record;
    ZipLayout layout = layout_file(file);
    total_size += layout.file_size;
    fmt::print(out, "output {} ({} records, {})\n", printable(file.path), file.records.size(),
               human_bytes(layout.file_size));
    for (const PlannedRecord& record : file.records) total_copy += record.copies.empty() ? 0 : record.nbytes;
    // a plan read back (apply), or a file of several archives: its records, without the tensors they hold
    if (k >= tensors.size() || file.container == Container::Archives) {
      for (const PlannedRecord& record : file.records) {
        fmt::print(out, "  {} {} B {}\n", printable(record.name), record.nbytes,
                   record.copies.empty() ? std::string("inline") : "in " + copies_text(record.copies.size()));
        print_first_copies(plan, record, out);
      }
      continue;
    }
    std::string prefix = file.records.front().name.substr(0, file.records.front().name.find('/'));
    std::size_t storage = 0;
    for (const NamedTensor& tensor : tensors[k]) {
      if (tensor.alias_of) {
        fmt::print(out, "  {} = {} (tied, no bytes)\n", printable(tensor.name), printable(*tensor.alias_of));
        continue;
      }
      // A torch file's storages are <archive>/data/0, 1, ...; a safetensors file's records are named by tensor.
      const PlannedRecord* record =
          by_name.at(file.container == Container::Zip ? fmt::format("{}/data/{}", prefix, storage++) : tensor.name);
      fmt::print(out, "  {} {} [{}] {} B in {}\n", printable(tensor.name), dtype_info(tensor.dtype()).name,
                 fmt::join(tensor.source.shape, ", "), record->nbytes, copies_text(record->copies.size()));
      print_first_copies(plan, *record, out);
    }
  }
  fmt::print(out, "total: {} to copy from {} input file(s), {} to write in {} file(s)\n", human_bytes(total_copy),
             plan.sources.size(), human_bytes(total_size), plan.files.size());
}

namespace {

Job* g_job = nullptr;
bool g_job_told = false;

void print_rank_figures(const JobStats& job) {
  for (std::size_t r = 0; r < job.ranks.size(); ++r) {
    const RankFigures& rank = job.ranks[r];
    fmt::print(stderr,
               "stats: rank {} of {}: {} written ({} whole file(s), {} part(s) of shared files) in {:.3f} s, "
               "peak RSS {}\n",
               r, job.ranks.size(), human_bytes(rank.bytes_written), rank.files, rank.parts, rank.seconds,
               human_bytes(rank.peak_rss_bytes));
  }
}

void print_stats(const ExecStats& stats, std::size_t files, double plan_seconds) {
  auto rate = [&](double seconds) {
    return seconds > 0 ? static_cast<double>(stats.bytes_written) / seconds / 1e9 : 0.0;
  };
  fmt::print(stderr,
             "stats: read inputs and plan {:.3f} s; create outputs {:.3f} s; copy {:.3f} s ({:.2f} GB/s); "
             "input CRCs {:.3f} s ({} read again); headers, fsync, rename {:.3f} s; {} written, {} of {} "
             "file(s) with direct I/O\n",
             plan_seconds, stats.create_seconds, stats.copy_seconds, rate(stats.copy_seconds), stats.crc_seconds,
             human_bytes(stats.crc_reread_bytes), stats.commit_seconds, human_bytes(stats.bytes_written),
             stats.direct_files, files);
}

}  // namespace

void add_write_flags(CLI::App& app, WriteFlags& flags) {
  app.add_flag("--replicated-from-part-0", flags.replicated_from_part_0,
               "a tensor the Megatron rules call replicated that differs between model parts: take part 0's copy "
               "with a warning (default: fail)");
  add_model_parts_flag(app, flags.model_parts);
  CLI::Option* save = app.add_option("--save-plan", flags.save_plan,
                                     "write the plan to this file instead of the outputs (`ckpt-tool apply FILE` "
                                     "writes them later, refusing inputs changed meanwhile)")
                          ->check([](const std::string& path) { return path.empty() ? "the plan path is empty" : ""; });
  add_exec_flags(app, flags);
  save->excludes(app.get_option("--dry-run"));
}

void add_exec_flags(CLI::App& app, WriteFlags& flags) {
  app.add_flag("--dry-run", flags.dry_run, "print the plan; write nothing");
  app.add_option("--threads", flags.threads, "copy threads (default: all cores)")->check(thread_count());
  app.add_flag("-q,--quiet", flags.quiet, "no progress or summary on stderr");
  app.add_flag("-f,--force", flags.force, "overwrite existing outputs");
  app.add_flag("--stats", flags.stats, "print the time of each stage on stderr");
  app.add_flag("--buffered-io", flags.buffered_io,
               "write through the page cache (default: direct I/O, where the file system allows it)");
  // Kept for the scripts that state it: nothing to set.
  app.add_flag("--direct-io")
      ->description("direct I/O where the file system allows it (the default)")
      ->excludes(app.get_option("--buffered-io"));
  app.add_flag("--no-crc-check", flags.no_crc_check,
               "do not check the input bytes copied against their zip records' CRC-32 (checked by default)");
}

void print_notice(const std::string& text) {
  // A run killed while writing hundreds of outputs leaves hundreds of temporary
  // files: the first few removals are told, then that there are more.
  constexpr int kShown = 5;
  int& told = session().notices_told;
  if (told < kShown) fmt::print(stderr, "ckpt-tool: note: {}\n", text);
  if (told == kShown) fmt::print(stderr, "ckpt-tool: note: more of the same not shown\n");
  ++told;
}

ProgressFn progress_line(bool quiet) {
  if (session().progress) return session().progress;
  if (quiet || ::isatty(STDERR_FILENO) == 0) return {};
  auto start = std::chrono::steady_clock::now();
  return [start](std::uint64_t done, std::uint64_t total) {
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0.0;
    double eta = rate > 0 ? static_cast<double>(total - done) / rate : 0.0;
    fmt::print(stderr, "\r{:.1f} / {:.1f} MiB  {:.0f} MiB/s  ETA {:.0f} s   ", static_cast<double>(done) / 1048576.0,
               static_cast<double>(total) / 1048576.0, rate / 1048576.0, eta);
    if (done == total) fmt::print(stderr, "\n");
  };
}

void run_plan(Plan& plan, const std::vector<std::vector<NamedTensor>>& tensors, const WriteFlags& flags,
              std::chrono::steady_clock::time_point started) {
  for (const std::string& path : session().manifests_read) plan.read_only.push_back(path);
  if (flags.dry_run) {
    print_plan(plan, tensors, out());
    return;
  }
  if (!flags.save_plan.empty()) {
    validate(plan);
    const std::string saved = std::filesystem::absolute(flags.save_plan).lexically_normal().string();
    for (const PlannedFile& file : plan.files) {
      if (std::filesystem::absolute(file.path).lexically_normal().string() == saved) {
        throw Error(ErrorKind::Usage, Location{flags.save_plan, "", std::nullopt},
                    "--save-plan names one of the plan's outputs: the plan could never be applied");
      }
    }
    write_plan(plan, flags.save_plan, flags.force);
    if (!flags.quiet) {
      fmt::print(stderr, "wrote the plan of {} file(s), {}, to {}: `ckpt-tool apply {}` writes them\n",
                 plan.files.size(), human_bytes(plan.bytes_to_copy()), flags.save_plan, flags.save_plan);
    }
    return;
  }
  ExecOptions exec;
  exec.threads = flags.threads;
  exec.overwrite = flags.force;
  exec.progress = progress_line(flags.quiet);
  exec.convert = convert_elements;
  exec.direct_io = !flags.buffered_io;
  exec.check_crc = !flags.no_crc_check;
  exec.notice = print_notice;
  auto planned = std::chrono::steady_clock::now();
  ExecStats stats;
  if (Job* led = job_to_lead()) {  // lead_job's first word goes out whatever happens
    exec.progress = nullptr;       // its share only: the line would stop short
    JobStats job = lead_job(*led, plan, exec);
    stats = job.exec;
    if (flags.stats) print_rank_figures(job);
  } else {
    stats = execute(plan, exec);
  }
  for (const PlannedFile& file : plan.files) session().written.push_back(file.path);
  if (flags.stats) print_stats(stats, plan.files.size(), std::chrono::duration<double>(planned - started).count());
  if (!flags.quiet) {
    // The whole command's time: reading and planning 200,000 tensors can take
    // longer than writing them.
    double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    double planning = std::chrono::duration<double>(planned - started).count();
    fmt::print(
        stderr, "wrote {} file(s), {} in {:.2f} s (reading and planning {:.2f} s, writing {:.2f} s{}); {}\n",
        plan.files.size(), human_bytes(stats.bytes_written), total, planning, stats.seconds,
        stats.seconds < 1e-3 ? std::string()
                             : fmt::format(" at {}/s", human_bytes(static_cast<std::uint64_t>(
                                                           static_cast<double>(stats.bytes_written) / stats.seconds))),
        stats.crc_checked ? "inputs checked against their CRC-32" : "input CRC-32s NOT checked (--no-crc-check)");
  }
}

void lead(Job* job) {
  g_job = job;
}
Job* job_to_lead() {
  if (g_job != nullptr) g_job_told = true;
  return g_job;
}
bool job_told() {
  return g_job_told;
}

void note_phase(const WriteFlags& flags, std::string_view what) {
  if (flags.quiet || flags.dry_run || ::isatty(STDERR_FILENO) == 0) return;
  fmt::print(stderr, "\r{}...\033[K", what);  // overwritten by the next phase and the copy's progress line
}

void report_replicated(const std::vector<ReplicatedCheck>& checks, const std::vector<const MappedFile*>& files,
                       bool take_part_0) {
  std::vector<std::string> problems = compare_replicated(checks, files);
  if (problems.empty()) return;
  if (!take_part_0) {
    throw Error(ErrorKind::IncompleteSet,
                first_replicated_problem(problems) + "; --replicated-from-part-0 takes part 0's copy");
  }
  for (const std::string& problem : problems) {
    fmt::print(stderr, "ckpt-tool: warning: {}; part 0's copy taken\n", printable(problem));
  }
}

}  // namespace ckpt::cli
