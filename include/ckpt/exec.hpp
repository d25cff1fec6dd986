// The one executor: runs a validated Plan.
//
// Per output file: lay out the zip (every offset is known), create the temporary
// file at its final size, copy every range from the mapped inputs with pwrite on
// a pool of threads while computing each piece's CRC-32, combine the CRCs per
// record in order, write the local headers and the central directory, fsync,
// rename. It makes no decisions: the same plan gives the same bytes for any
// thread count.
#pragma once

#include <cstdint>

#include "ckpt/plan.hpp"

namespace ckpt {

struct ExecOptions {
  unsigned threads = 0;    // 0: all cores
  bool overwrite = false;  // --force
  bool progress = false;   // progress line on stderr
};

struct ExecStats {
  std::uint64_t bytes_written = 0;
  double seconds = 0.0;
};

ExecStats execute(const Plan& plan, const ExecOptions& options);

}  // namespace ckpt
