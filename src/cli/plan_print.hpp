// --dry-run: a plan for people.
#pragma once

#include <chrono>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/exec/compare.hpp"
#include "ckpt/exec/exec.hpp"
#include "ckpt/io/job.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/plan/plan.hpp"

namespace CLI {
class App;
}

namespace ckpt::cli {

// `tensors[k]` is output file k's state dict, whose storages are the records
// <archive>/data/0, 1, ... in order (aliases have none); in a safetensors file,
// the records named by the tensors.
void print_plan(const Plan& plan, const std::vector<std::vector<NamedTensor>>& tensors, std::ostream& out);

// The flags of every command that writes checkpoints, and running its plan.
struct WriteFlags {
  bool replicated_from_part_0 = false;  // a replicated tensor that differs: part 0's copy, not an error
  bool dry_run = false;
  unsigned threads = 0;
  bool quiet = false;
  bool force = false;
  bool stats = false;
  bool buffered_io = false;
  bool no_crc_check = false;
  std::optional<std::int64_t> model_parts;  // --model-parts
  std::string save_plan;                    // --save-plan FILE: the plan written there, not the outputs
};
void add_write_flags(CLI::App& app, WriteFlags& flags);
// The flags of running a plan only (apply): --dry-run, --threads, --quiet,
// --force, --stats, --buffered-io, --no-crc-check.
void add_exec_flags(CLI::App& app, WriteFlags& flags);

// Prints what the executor cleaned up on the way, as `ckpt-tool: note: ...`.
void print_notice(const std::string& text);

// The progress line on stderr ("12.0 / 40.0 MiB  900 MiB/s  ETA 0 s"); none when
// `quiet` or stderr is not a terminal. A session's own progress replaces it.
ProgressFn progress_line(bool quiet);

// The job this process leads as rank 0 of several (mpirun, srun): run_plan
// writes its plan over every rank (lead_job). `told()`: the other ranks have
// had rank 0's first word, a plan or the end (main tells them the end otherwise).
void lead(Job* job);
// The job, for a command that sends the other ranks work of its own (verify):
// null when alone; the job counts as told from then on.
Job* job_to_lead();
bool job_told();

// Executes `plan` (or prints it with --dry-run, or writes it to --save-plan),
// then --stats and the summary line. `started` is when the command began
// reading its inputs. The manifests read are added to the plan's read_only.
void run_plan(Plan& plan, const std::vector<std::vector<NamedTensor>>& tensors, const WriteFlags& flags,
              std::chrono::steady_clock::time_point started);

// On a terminal (and without --quiet), one line saying what the command is
// doing, overwritten by the next: reading and planning can take seconds.
void note_phase(const WriteFlags& flags, std::string_view what);

// Compares the replicated tensors (compare_replicated) and prints each
// difference as a warning when `take_part_0`, else throws one error naming
// the first (the tensor, the part, the first differing position, the largest
// difference).
void report_replicated(const std::vector<ReplicatedCheck>& checks, const std::vector<const MappedFile*>& files,
                       bool take_part_0);

}  // namespace ckpt::cli
