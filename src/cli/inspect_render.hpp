// What `inspect` prints of an input set: the text renderer for people and the
// JSON renderer for machines, over the same manifest and the same selection.
#pragma once

#include <iosfwd>
#include <regex>

#include <nlohmann/json.hpp>

#include "ckpt/manifest/manifest.hpp"

namespace ckpt::cli {

struct InspectRequest {
  bool tensors = false;                // list every tensor
  const std::regex* filter = nullptr;  // with `tensors`: only those whose path matches (null: all)
  bool wide = false;                   // the grid as a table of every shard's size, however many
};

// Grids with more shards per part than this are shown one line per part
// unless `wide` (a table row of OPT-175B's 124 shards takes 1,200 columns).
inline constexpr int kMaxTableShards = 8;

// The summary, the grid, the problems, the first file's objects as a tree and,
// when asked, a table of the tensors.
void print_inspect_text(const Manifest& manifest, const InspectRequest& request, std::ostream& out);

// The same, as one JSON document.
nlohmann::ordered_json inspect_json(const Manifest& manifest, const InspectRequest& request);

}  // namespace ckpt::cli
