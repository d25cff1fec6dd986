#include "ckpt/tensor_source.hpp"

#include <fmt/format.h>

namespace ckpt {

std::uint64_t TensorSource::numel() const {
  std::uint64_t count = 1;
  for (std::int64_t d : shape) count *= static_cast<std::uint64_t>(d);
  return count;
}

TensorSource TensorSource::slice(std::uint64_t begin, std::uint64_t count, std::vector<std::int64_t> new_shape) const {
  TensorSource out;
  out.dtype = dtype;
  out.shape = std::move(new_shape);
  if (out.nbytes() != count) throw Error(fmt::format("slice of {} bytes given a shape of {} bytes (a bug)", count, out.nbytes()));
  std::uint64_t position = 0;
  std::uint64_t end = begin + count;
  for (const ByteSegment& segment : segments) {
    std::uint64_t seg_begin = position;
    std::uint64_t seg_end = position + segment.nbytes;
    position = seg_end;
    if (seg_end <= begin || seg_begin >= end) continue;
    std::uint64_t from = std::max(begin, seg_begin);
    std::uint64_t to = std::min(end, seg_end);
    ByteSegment piece = segment;
    if (piece.file != ByteSegment::kZeroFile) piece.byte_offset += from - seg_begin;
    piece.nbytes = to - from;
    out.segments.push_back(piece);
  }
  if (position < end) throw Error("slice past the end of a tensor (a bug)");
  return out;
}

TensorSource concat(const std::vector<TensorSource>& parts, std::vector<std::int64_t> shape) {
  TensorSource out;
  out.shape = std::move(shape);
  if (!parts.empty()) out.dtype = parts.front().dtype;
  std::uint64_t total = 0;
  for (const TensorSource& part : parts) {
    if (part.dtype != out.dtype) throw Error("concatenating tensors of different dtypes (a bug)");
    for (const ByteSegment& segment : part.segments) {
      ByteSegment* last = out.segments.empty() ? nullptr : &out.segments.back();
      if (last != nullptr && last->file == segment.file &&
          (segment.file == ByteSegment::kZeroFile || last->byte_offset + last->nbytes == segment.byte_offset)) {
        last->nbytes += segment.nbytes;  // contiguous in the same file: one range
      } else {
        out.segments.push_back(segment);
      }
      total += segment.nbytes;
    }
  }
  if (total != out.nbytes()) throw Error("concatenation does not match its shape (a bug)");
  return out;
}

TensorSource source_of(const ManifestTensor& tensor, std::uint32_t file) {
  TensorSource out;
  out.dtype = tensor.dtype;
  out.shape = tensor.shape;
  std::uint64_t itemsize = dtype_info(tensor.dtype).itemsize;
  std::uint64_t numel = tensor.numel();
  if (numel == 0) return out;
  // Dimensions at the end that are laid out contiguously form one run.
  std::size_t dims = tensor.shape.size();
  std::size_t inner = dims;
  std::int64_t expected_stride = 1;
  std::uint64_t run_elements = 1;
  while (inner > 0) {
    std::size_t d = inner - 1;
    if (tensor.shape[d] != 1 && tensor.stride[d] != expected_stride) break;
    expected_stride *= tensor.shape[d];
    run_elements *= static_cast<std::uint64_t>(tensor.shape[d]);
    --inner;
  }
  std::uint64_t base = tensor.file_byte_offset;  // element (0, ..., 0)
  if (inner == 0) {
    out.segments.push_back({file, base, numel * itemsize});
    return out;
  }
  std::vector<std::int64_t> index(inner, 0);
  while (true) {
    std::uint64_t element = 0;
    for (std::size_t d = 0; d < inner; ++d) element += static_cast<std::uint64_t>(index[d] * tensor.stride[d]);
    ByteSegment segment{file, base + element * itemsize, run_elements * itemsize};
    ByteSegment* last = out.segments.empty() ? nullptr : &out.segments.back();
    if (last != nullptr && last->byte_offset + last->nbytes == segment.byte_offset) {
      last->nbytes += segment.nbytes;
    } else {
      out.segments.push_back(segment);
    }
    std::size_t d = inner;
    while (d > 0) {
      --d;
      if (++index[d] < tensor.shape[d]) break;
      index[d] = 0;
      if (d == 0) return out;
    }
  }
}

TensorSource zeros_source(DType dtype, std::vector<std::int64_t> shape) {
  TensorSource out;
  out.dtype = dtype;
  out.shape = std::move(shape);
  if (out.nbytes() > 0) out.segments.push_back({ByteSegment::kZeroFile, 0, out.nbytes()});
  return out;
}

}  // namespace ckpt

namespace ckpt {

std::uint64_t OutputTensor::numel() const {
  std::uint64_t count = 1;
  for (std::int64_t d : shape) count *= static_cast<std::uint64_t>(d);
  return count;
}

OutputTensor as_output(const NamedTensor& tensor) {
  OutputTensor out;
  out.name = tensor.name;
  out.dtype = tensor.source.dtype;
  out.shape = tensor.source.shape;
  out.alias_of = tensor.alias_of;
  if (!tensor.alias_of) out.parts.push_back(tensor.source);
  return out;
}

}  // namespace ckpt
