// What every build knows of a launcher: how many processes it started.
#include <cstdlib>
#include <string>

#include "ckpt/io/job.hpp"

namespace ckpt {

int launched_ranks() {
  // Open MPI's mpirun; MPICH/PMI and Slurm's srun --mpi=pmi2; an srun step.
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"}) {
    const char* text = std::getenv(name);
    if (text == nullptr) continue;
    char* end = nullptr;
    long value = std::strtol(text, &end, 10);
    if (end != text && *end == '\0' && value >= 1 && value < (1L << 24)) return static_cast<int>(value);
  }
  return 1;
}

}  // namespace ckpt
