// The job over Open MPI: MPI_COMM_WORLD, used from the main thread only
// (MPI_THREAD_FUNNELED). Messages go in pieces of at most 1 GiB: MPI counts
// are ints.
#define OMPI_SKIP_MPICXX 1  // the C API only: MPI's C++ bindings (deprecated) do not build with -Werror
#define MPICH_SKIP_MPICXX 1
#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "ckpt/io/error.hpp"
#include "ckpt/io/job.hpp"

namespace ckpt {

namespace {

constexpr std::uint64_t kPieceBytes = 1ull << 30;

void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw Error(ErrorKind::Io, fmt::format("{}: {}", call, std::string(text, static_cast<std::size_t>(length))));
}

class MpiJob final : public Job {
 public:
  MpiJob() {
    int provided = 0;
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
  }
  ~MpiJob() override { MPI_Finalize(); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  std::vector<std::byte> broadcast(std::vector<std::byte> bytes) override {
    std::uint64_t nbytes = bytes.size();
    check(MPI_Bcast(&nbytes, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD), "MPI_Bcast");
    bytes.resize(nbytes);
    for (std::uint64_t at = 0; at < nbytes; at += kPieceBytes) {
      int count = static_cast<int>(std::min(kPieceBytes, nbytes - at));
      check(MPI_Bcast(bytes.data() + at, count, MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast");
    }
    return bytes;
  }

  std::vector<std::vector<std::byte>> gather(Bytes bytes) override {
    std::uint64_t nbytes = bytes.size();
    std::vector<std::uint64_t> sizes(rank_ == 0 ? static_cast<std::size_t>(size_) : 0);
    check(MPI_Gather(&nbytes, 1, MPI_UINT64_T, sizes.data(), 1, MPI_UINT64_T, 0, MPI_COMM_WORLD), "MPI_Gather");
    if (rank_ != 0) {
      for (std::uint64_t at = 0; at < nbytes; at += kPieceBytes) {
        int count = static_cast<int>(std::min(kPieceBytes, nbytes - at));
        check(MPI_Send(bytes.data() + at, count, MPI_BYTE, 0, 0, MPI_COMM_WORLD), "MPI_Send");
      }
      return {};
    }
    std::vector<std::vector<std::byte>> out(static_cast<std::size_t>(size_));
    out[0].assign(bytes.begin(), bytes.end());
    for (int from = 1; from < size_; ++from) {
      std::vector<std::byte>& into = out[static_cast<std::size_t>(from)];
      into.resize(sizes[static_cast<std::size_t>(from)]);
      for (std::uint64_t at = 0; at < into.size(); at += kPieceBytes) {
        int count = static_cast<int>(std::min<std::uint64_t>(kPieceBytes, into.size() - at));
        check(MPI_Recv(into.data() + at, count, MPI_BYTE, from, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv");
      }
    }
    return out;
  }

 private:
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

bool built_with_mpi() {
  return true;
}

std::unique_ptr<Job> join_job() {
  // Started alone (or as the one process of a launcher): no MPI_Init, which
  // costs time and, outside a launcher, may look for one.
  if (launched_ranks() <= 1) return nullptr;
  return std::make_unique<MpiJob>();
}

}  // namespace ckpt
