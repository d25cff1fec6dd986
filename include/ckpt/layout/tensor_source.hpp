// A tensor to be written, described by where its bytes are: its row-major bytes
// as pieces of input files, never loaded.
//
// Its pieces (piece.hpp: sources are manifest file indices, no conversion)
// tile the tensor's row-major bytes (its logical bytes) exactly. Layout rules
// (FSDP flattening and unflattening, Megatron gluing and re-cutting) are pure
// functions from TensorSources to TensorSources; the planner turns each piece
// into a record's piece, converting when the output dtype differs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/format/torch_pickle.hpp"
#include "ckpt/layout/piece.hpp"

namespace ckpt {

struct TensorSource {
  DType dtype = DType::Float32;
  std::vector<std::int64_t> shape;
  std::vector<Piece> pieces;

  std::uint64_t numel() const;
  std::uint64_t nbytes() const { return numel() * dtype_info(dtype).itemsize; }
  // Logical bytes [begin, begin + count), as a tensor of `new_shape`.
  TensorSource slice(std::uint64_t begin, std::uint64_t count, std::vector<std::int64_t> new_shape) const;
  // Viewing the bytes as `rows` equal rows: bytes [begin, begin + count) of
  // every row, as a tensor of `new_shape` (Megatron's dim-1 re-cutting).
  TensorSource columns(std::uint64_t rows, std::uint64_t begin, std::uint64_t count,
                       std::vector<std::int64_t> new_shape) const;
};

// The parts' bytes one after the other (dim-0 concatenation, flattening).
TensorSource concat(const std::vector<TensorSource>& parts, std::vector<std::int64_t> shape);
// Row r of the result is row r of every part in turn, each part viewed as
// `rows` equal rows (dim-1 concatenation).
TensorSource interleave_rows(const std::vector<TensorSource>& parts, std::uint64_t rows,
                             std::vector<std::int64_t> shape);

// A tensor of `shape` that reads as zeros.
TensorSource zeros_source(DType dtype, std::vector<std::int64_t> shape);

// A shape as messages and inspect print it: "[4096, 1024]".
std::string shape_text(const std::vector<std::int64_t>& shape);

// What torch rebuilds at a state dict key besides the bytes: an nn.Parameter
// or the tensor itself, and its requires_grad. A layout rule gives a key the
// kind of the tensor it is cut or glued from (part 0's); a tensor it makes
// anew (a flat parameter) is a plain tensor.
struct TensorKind {
  TensorWrap wrap = TensorWrap::Tensor;
  bool requires_grad = false;
  bool operator==(const TensorKind&) const = default;
};

// A named tensor of a state dict: what layout rules make and cut, and what
// planners write. Written in dtype(): the source's, unless `convert_to` (--dtype)
// names another, which the copy converts to. `alias_of` names an earlier entry
// whose tensor this key shares (tied weights), in which case `source` is
// unused. (Constructors, so that {name, source, alias_of} leaves `kind` plain.)
struct NamedTensor {
  NamedTensor() = default;
  NamedTensor(std::string name_, TensorSource source_, std::optional<std::string> alias_of_ = std::nullopt,
              TensorKind kind_ = {})
      : name(std::move(name_)), source(std::move(source_)), alias_of(std::move(alias_of_)), kind(kind_) {}
  NamedTensor(std::string name_, DType written, TensorSource source_,
              std::optional<std::string> alias_of_ = std::nullopt, TensorKind kind_ = {})
      : name(std::move(name_)),
        source(std::move(source_)),
        alias_of(std::move(alias_of_)),
        kind(kind_),
        convert_to(written) {}

  DType dtype() const { return convert_to.value_or(source.dtype); }

  std::string name;
  TensorSource source;
  std::optional<std::string> alias_of;
  TensorKind kind;
  std::optional<DType> convert_to;
};

// `tie` (alias_of `target`) made a tensor of its own, a copy of `target`'s
// bytes, kind and written dtype: where the tensor it is tied to is not
// written beside it (left out, or a format that holds ties as copies).
void untie(NamedTensor& tie, const NamedTensor& target);

}  // namespace ckpt
