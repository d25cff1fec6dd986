// A build without MPI: runs alone, and says so when a launcher started several.
#include <fmt/format.h>

#include "ckpt/io/error.hpp"
#include "ckpt/io/job.hpp"

namespace ckpt {

bool built_with_mpi() {
  return false;
}

std::unique_ptr<Job> join_job() {
  int ranks = launched_ranks();
  if (ranks > 1) {
    throw Error(ErrorKind::Usage,
                fmt::format("started as one of {} processes (mpirun or srun), but this ckpt-tool was built without "
                            "MPI: the {} copies would write the same outputs at once. Run it alone, or build it "
                            "with Open MPI (apt-get install libopenmpi-dev openmpi-bin; meson setup --wipe)",
                            ranks, ranks));
  }
  return nullptr;
}

}  // namespace ckpt
