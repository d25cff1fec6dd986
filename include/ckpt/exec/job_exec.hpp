// One plan written by the ranks of a job (io/job.hpp): the bytes one process
// writes, all or nothing.
//
//   rank 0                                   ranks 1..N-1
//   <------- gather, then broadcast: every rank's argv the same? ---------->
//   plan (the command: its checks, once)     wait
//   validate, prepare, create the shared
//   files' temporaries  ---- broadcast: options, plan, temporary names ---->
//   write its share                          write its share (split_job): whole
//                                            files staged as one process stages
//                                            them, parts of shared files written
//                                            into their temporaries; all durable
//   <------- gather: ok or the error; input CRC notes, part reports, the
//            temporary names of its whole files, its figures --------------
//   every rank ok: check the inputs' CRCs
//   (once, all notes joined), finish the
//   shared files (headers, fsync), rename
//   every output (commit: keystone last,
//   taken back on failure)
//                  ---- broadcast: committed, or the exit code ---------->
//                                            committed: its temporaries are now
//                                            outputs; else it removes them
//
// verify sends its files instead of a plan: each rank checks the CRCs of its
// share (lead_crc_check), rank 0 the set. Commands without work for the
// others (inspect, dry runs, errors before) send the end (end_job).
//
// Which rank writes what changes no byte: a unit's bytes are the plan's, the
// headers are the same function of the CRCs. A failure on any rank is reported
// once, by rank 0, in one line naming the rank (`rank 2 of 4: shard3.pt: ...`),
// and every rank exits with its code; nothing is renamed unless every rank
// reported success. A rank killed meanwhile ends the job through the launcher;
// the temporaries it leaves are stale for the next run (output_file.hpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/exec/exec.hpp"
#include "ckpt/exec/verify.hpp"
#include "ckpt/io/job.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

struct JobSplit {
  std::vector<std::vector<std::size_t>> whole;  // [rank]: the files it writes alone
  std::vector<std::vector<FilePart>> parts;     // [rank]: its units of shared files
  std::vector<std::size_t> shared;              // the files several ranks write, ascending
  std::vector<std::uint64_t> bytes;             // [rank]: the file bytes it writes
  bool operator==(const JobSplit&) const = default;
};

// Output files of `file_sizes` bytes cut between `ranks` by bytes: laid end to
// end, cut into `ranks` equal shares at unit boundaries (kUnitBytes). A file
// inside one share is that rank's; a file across shares is written in parts,
// each rank its units. Each share is within a unit of the total / ranks.
JobSplit split_job(const std::vector<std::uint64_t>& file_sizes, int ranks);

// What a rank did, for --stats and the benchmark.
struct RankFigures {
  std::uint64_t bytes_written = 0;  // its whole files' bytes and its parts' record bytes
  std::size_t files = 0;            // whole files it wrote
  std::size_t parts = 0;            // parts of shared files it wrote
  std::uint64_t peak_rss_bytes = 0;
  std::size_t direct_files = 0;  // whole files written with direct I/O
  double seconds = 0.0;          // from the plan's arrival to its report
};
struct JobStats {
  ExecStats exec;                  // rank 0's, with the commit and the job's whole time
  std::vector<RankFigures> ranks;  // [rank]
};

// Every rank, first: the command lines (argv past the program) compared. An
// MPMD launch with other arguments on some rank would otherwise be led by
// rank 0's silently: on every rank, the Error naming the first such rank
// (Usage), or nothing when all agree.
std::optional<Error> agree_on_command(Job& job, const std::vector<std::string>& args);

// Rank 0, with the plan to write: the whole protocol above. Throws Error when
// any rank failed (the first in rank order, named) or the commit failed.
JobStats lead_job(Job& job, const Plan& plan, const ExecOptions& options);
// Rank 0, when the command ends without a plan to write (a dry run, another
// command, an error before): the other ranks end with `exit_code`.
void end_job(Job& job, int exit_code);
// Ranks 1..N-1: rank 0's word awaited, the share written; returns the job's
// exit code. `local` gives what is not sent (convert, notice); the rest of the
// options are rank 0's.
int follow_job(Job& job, const ExecOptions& local);

// Rank 0 of a job running verify: the CRC pass (check_crcs_of) of `paths`,
// split between the ranks by bytes, each file whole; every rank's report
// joined in file order.
VerifyReport lead_crc_check(Job& job, const std::vector<std::string>& paths, unsigned threads);

}  // namespace ckpt
