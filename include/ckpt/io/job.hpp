// The processes of one job: ckpt-tool started N times by a launcher (`mpirun
// -np N`, Slurm's `srun`), each a rank, on nodes that share a file system.
//
// Only the few collective steps the distributed executor needs, on bytes:
// rank 0 broadcasts (the plan, the outcome) and gathers (each rank's report).
// Every rank makes the same calls in the same order, whether its own work
// failed or not: a failure travels as data in the next exchange, so that the
// job ends as one. A rank that dies (SIGKILL) ends the job through the
// launcher, which kills the others.
//
// Open MPI is the transport when the build found it (job_mpi.cpp); a build
// without it still runs alone, and refuses to run as one of N ranks (N copies
// of one command would write the same outputs at once).
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <vector>

#include "ckpt/io/byte_reader.hpp"

namespace ckpt {

class Job {
 public:
  virtual ~Job() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Rank 0's `bytes`, on every rank (what the others pass is ignored).
  virtual std::vector<std::byte> broadcast(std::vector<std::byte> bytes) = 0;
  // On rank 0, every rank's `bytes` in rank order; on the others, nothing.
  virtual std::vector<std::vector<std::byte>> gather(Bytes bytes) = 0;
};

// How many processes the launcher that started this one started in all, from
// its environment (Open MPI's OMPI_COMM_WORLD_SIZE, PMI's PMI_SIZE, Slurm's
// SLURM_STEP_NUM_TASKS); 1 when started alone.
int launched_ranks();
// This process's number among them (OMPI_COMM_WORLD_RANK, PMI_RANK,
// SLURM_PROCID); 0 when started alone.
int launched_rank();

// The job this process is a rank of, or nullptr when it runs alone (no
// launcher, or a launcher that started one process). Throws Error (Usage) when
// a launcher started several and this build has no MPI.
std::unique_ptr<Job> join_job();

// Whether this build can run as one rank of a job (it found MPI).
bool built_with_mpi();

}  // namespace ckpt
