// Integrity checks of checkpoint files, reporting every problem found.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/manifest/manifest.hpp"

namespace ckpt {

struct VerifyReport {
  std::uint64_t files = 0;
  std::uint64_t records = 0;
  std::uint64_t bytes = 0;            // record data whose CRC was recomputed
  std::vector<std::string> problems;  // one line each, naming file and record or tensor
  // check_crcs_of: the files (indices in its `paths`) that could not be read
  // as their layout to check (not a zip, truncated): each one problem already.
  std::vector<std::size_t> unread;
};

// Recomputes every record's CRC-32 against the zip directory (in parallel), opens
// each file as a checkpoint (every tensor's byte range inside its record), and
// checks the FSDP and model-parallel metadata of the set: grid complete, the same
// metadata on every shard, padding by the chunk rule, numels adding up, shapes
// that glue across model parts. A file that cannot be parsed is one problem; the
// others are still checked. `model_parts`: as for detect_grid. Every index
// among `inputs` (the arguments `paths` came from) is checked against the
// files it names (index_problems).
// With `crc_pass`, the CRC pass is left out: the caller made it
// (check_crcs_of, split between the ranks of a job), and its counts and
// problems come first in the report; the files it could not read are counted
// and not read again (one problem each, as here).
VerifyReport verify_files(const std::vector<std::string>& paths, unsigned threads,
                          std::optional<std::int64_t> model_parts = std::nullopt,
                          const std::vector<std::string>& inputs = {}, const VerifyReport* crc_pass = nullptr);

// The CRC pass of verify_files alone, over paths[i] for each i of `indices`:
// every record of the files with checksums (the others are left out).
VerifyReport check_crcs_of(const std::vector<std::string>& paths, const std::vector<std::size_t>& indices,
                           unsigned threads);

}  // namespace ckpt
