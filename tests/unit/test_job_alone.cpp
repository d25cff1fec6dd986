// Unit tests for a build without MPI (src/io/job_alone.cpp, linked here in
// place of job_mpi.cpp): alone it runs, under a launcher of several processes
// it refuses in one line.
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include "ckpt/io/error.hpp"
#include "ckpt/io/job.hpp"

namespace {

// Sets an environment variable for the scope, then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_.empty()) {
      ::unsetenv(name_);
    } else {
      ::setenv(name_, old_.c_str(), 1);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::string old_;
};

}  // namespace

TEST_SUITE("job") {
  TEST_CASE("launched_ranks: Open MPI's, PMI's or Slurm's count, 1 alone or when it is not a count") {
    ScopedEnv ompi("OMPI_COMM_WORLD_SIZE", nullptr);
    ScopedEnv pmi("PMI_SIZE", nullptr);
    ScopedEnv slurm("SLURM_STEP_NUM_TASKS", nullptr);
    CHECK(ckpt::launched_ranks() == 1);
    {
      ScopedEnv four("OMPI_COMM_WORLD_SIZE", "4");
      CHECK(ckpt::launched_ranks() == 4);
    }
    {
      ScopedEnv srun("SLURM_STEP_NUM_TASKS", "16");
      CHECK(ckpt::launched_ranks() == 16);
    }
    for (const char* junk : {"", "x", "3x", "-2", "0", "99999999999"}) {
      ScopedEnv bad("PMI_SIZE", junk);
      CHECK(ckpt::launched_ranks() == 1);
    }
  }

  TEST_CASE("launched_rank: this process's number, from the first launcher variable that holds one; 0 alone") {
    ScopedEnv ompi("OMPI_COMM_WORLD_RANK", nullptr);
    ScopedEnv pmi("PMI_RANK", nullptr);
    ScopedEnv slurm("SLURM_PROCID", nullptr);
    CHECK(ckpt::launched_rank() == 0);
    {
      ScopedEnv two("OMPI_COMM_WORLD_RANK", "2");
      CHECK(ckpt::launched_rank() == 2);
    }
    ScopedEnv junk("OMPI_COMM_WORLD_RANK", "x");
    ScopedEnv srun("SLURM_PROCID", "5");
    CHECK(ckpt::launched_rank() == 5);
  }

  TEST_CASE("without MPI: alone, or one process of a launcher, runs; several refuse in one line") {
    ScopedEnv ompi("OMPI_COMM_WORLD_SIZE", nullptr);
    ScopedEnv pmi("PMI_SIZE", nullptr);
    ScopedEnv slurm("SLURM_STEP_NUM_TASKS", nullptr);
    CHECK_FALSE(ckpt::built_with_mpi());
    CHECK(ckpt::join_job() == nullptr);
    {
      ScopedEnv one("OMPI_COMM_WORLD_SIZE", "1");
      CHECK(ckpt::join_job() == nullptr);
    }
    ScopedEnv three("OMPI_COMM_WORLD_SIZE", "3");
    try {
      ckpt::join_job();
      FAIL("a build without MPI ran as one of 3 processes");
    } catch (const ckpt::Error& e) {
      CHECK(e.kind() == ckpt::ErrorKind::Usage);
      std::string message = e.what();
      CHECK(message.find("one of 3 processes") != std::string::npos);
      CHECK(message.find("built without MPI") != std::string::npos);
      CHECK(message.find('\n') == std::string::npos);
    }
  }
}
