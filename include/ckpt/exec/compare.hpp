// Comparing two sets of tensors straight from the mapped bytes, in parallel, in
// bounded chunks: the one compare engine, of `ckpt-tool diff` and of the
// replicated-tensor check of stitch and reshard. Equal chunks are recognised
// with memcmp; only differing chunks, and tensors of different dtypes compared
// by value, are looked at element by element (element_compare.hpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/exec/element_compare.hpp"
#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/megatron.hpp"
#include "ckpt/layout/tensor_source.hpp"

namespace ckpt {

class SourceCrcCheck;

struct CompareOptions {
  Tolerance tolerance;  // none: exact (bit for bit)
  std::size_t max_positions = 20;
  unsigned threads = 0;  // 0: all cores
  // Told every input range read from side a's and side b's files (their CRCs
  // checked by the caller's finish()); none: not checked.
  SourceCrcCheck* check_a = nullptr;
  SourceCrcCheck* check_b = nullptr;
};

struct DiffPosition {
  std::vector<std::int64_t> index;  // per dimension
  ElementValue a;
  ElementValue b;
};

struct TensorDiff {
  std::string name;
  std::string mismatch;  // dtype or shape mismatch; then nothing else is filled
  // Said of a pair that is not a difference by itself: two float dtypes compared by value.
  std::string note;
  std::uint64_t numel = 0;
  std::uint64_t count = 0;  // differing elements
  ElementValue max_abs;     // see ElementComparison
  double max_rel = 0.0;
  std::vector<DiffPosition> positions;  // the first ones, in row-major order
  bool differs() const { return !mismatch.empty() || count > 0; }
};

struct DiffReport {
  std::vector<std::string> only_in_a;
  std::vector<std::string> only_in_b;
  std::vector<TensorDiff> differing;
  std::vector<TensorDiff> noted;            // equal, with a note (dtypes compared by value)
  std::uint64_t compared = 0;               // tensors compared element by element
  std::uint64_t compared_tensor_bytes = 0;  // numel x element size of a's compared tensors
  bool equal() const { return only_in_a.empty() && only_in_b.empty() && differing.empty(); }
};

// `files_a[i]` are the files the pieces of `a` name (likewise b).
DiffReport diff_tensors(const std::vector<NamedTensor>& a, const std::vector<const MappedFile*>& files_a,
                        const std::vector<NamedTensor>& b, const std::vector<const MappedFile*>& files_b,
                        const CompareOptions& options);

// Replicated tensors (layer norms, row-parallel biases) should be identical in
// every model part; metaseq's scripts only log a difference. Compares every
// part of every check with its part 0 (diff_tensors, exact) before anything is
// written: one message per part that differs, with the largest difference.
std::vector<std::string> compare_replicated(const std::vector<ReplicatedCheck>& checks,
                                            const std::vector<const MappedFile*>& files);
// compare_replicated's first problem, and how many more there are: one line.
std::string first_replicated_problem(const std::vector<std::string>& problems);

}  // namespace ckpt
