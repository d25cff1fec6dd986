// What every build knows of a launcher: how many processes it started, and
// which one this is.
#include "ckpt/io/job.hpp"

#include <cstdlib>
#include <initializer_list>
#include <optional>

namespace ckpt {

namespace {

// The first of `names` set to a number in [min, 2^24), or nothing.
std::optional<int> launcher_number(std::initializer_list<const char*> names, long min) {
  for (const char* name : names) {
    const char* text = std::getenv(name);
    if (text == nullptr) continue;
    char* end = nullptr;
    long value = std::strtol(text, &end, 10);
    if (end != text && *end == '\0' && value >= min && value < (1L << 24)) return static_cast<int>(value);
  }
  return std::nullopt;
}

}  // namespace

int launched_ranks() {
  // Open MPI's mpirun; MPICH/PMI and Slurm's srun --mpi=pmi2; an srun step.
  return launcher_number({"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"}, 1).value_or(1);
}

int launched_rank() {
  return launcher_number({"OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"}, 0).value_or(0);
}

}  // namespace ckpt
