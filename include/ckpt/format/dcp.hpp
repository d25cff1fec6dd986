// PyTorch Distributed Checkpoint (DCP): the `.metadata` file of a DCP
// directory, decoded as data (never executed).
//
// A DCP directory holds `.metadata` and data files (`__{rank}_{n}.distcp`).
// `.metadata` is a pickle of a `Metadata` object whose state holds:
//   state_dict_metadata  {flat key: TensorStorageMetadata | BytesStorageMetadata}
//     TensorStorageMetadata {properties: TensorProperties (dtype, layout, ...),
//                            size: torch.Size, chunks: [ChunkStorageMetadata
//                            {offsets: torch.Size, sizes: torch.Size}, ...]}
//   storage_data         {MetadataIndex {fqn, offset, index}: _StorageInfo
//                          {relative_path, offset, length}}
//   planner_data         {flat key: (path elements, str or int)} or None
//   (torch >= 2.6 adds storage_meta and version)
// Each chunk (a box of the tensor's global shape) and each bytes item is one
// `torch.save` archive at (offset, length) of a data file. The classes live in
// torch.distributed.checkpoint (torch 2.x) or torch.distributed._shard
// (torch 1.13): they are matched by class name inside torch.distributed, so a
// release that moves them reads the same. TensorProperties is pickled as a
// 5- or 6-tuple (dtype, layout, requires_grad, memory format, pin_memory[,
// strides]) or as a dict of those names. tests/e2e/README-dcp.md lists what
// real files were seen to hold.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "ckpt/format/dtype.hpp"
#include "ckpt/io/byte_reader.hpp"
#include "ckpt/io/error.hpp"

namespace ckpt {

// Where an item's `torch.save` archive is: bytes [offset, offset + length) of
// the data file `file` (a name relative to the directory).
struct DcpItemPlace {
  std::string file;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  bool operator==(const DcpItemPlace&) const = default;
};

struct DcpChunk {
  std::vector<std::int64_t> offsets;  // of the box in the tensor's global shape
  std::vector<std::int64_t> sizes;
  DcpItemPlace place;
  bool operator==(const DcpChunk&) const = default;
};

struct DcpTensor {
  std::string key;  // the flat key: "model.layers.0.attn.weight"
  DType dtype = DType::Float32;
  std::vector<std::int64_t> size;  // the global shape
  bool requires_grad = false;
  std::vector<DcpChunk> chunks;  // in the order .metadata lists them
  std::size_t position = 0;      // its index among state_dict_metadata's keys, tensors and objects alike
  bool operator==(const DcpTensor&) const = default;
};

struct DcpObject {  // a non-tensor item (BytesStorageMetadata): a torch.save'd object
  std::string key;
  DcpItemPlace place;
  std::size_t position = 0;  // as DcpTensor's
  bool operator==(const DcpObject&) const = default;
};

// A key's place in the nested state dict: dict keys (str) and list indices (int).
using DcpPathElement = std::variant<std::string, std::int64_t>;

struct DcpMetadata {
  std::string metadata_class;      // "torch.distributed.checkpoint.metadata.Metadata"
  std::vector<DcpTensor> tensors;  // in state_dict_metadata order
  std::vector<DcpObject> objects;  // likewise
  // Per key (tensors' and objects'), when .metadata has planner_data (torch >= 2.0);
  // empty otherwise.
  std::vector<std::pair<std::string, std::vector<DcpPathElement>>> planner_data;
  std::optional<std::string> version;  // torch >= 2.6: "1.0.0"
  bool operator==(const DcpMetadata&) const = default;
};

// Decodes the bytes of a `.metadata` file (`path` names it in errors). Throws
// Error naming the file and the key of anything that is not a DCP Metadata
// pickle of these classes: an unknown dtype, a layout other than strided, a
// chunk whose offsets or sizes do not match the tensor's rank, a chunk or item
// that storage_data does not place, a negative size, offset or length.
DcpMetadata read_dcp_metadata(Bytes bytes, const std::string& path);

// The `.metadata` file at `path`, read (not mapped: torch rewrites it in place,
// open('wb') truncating first, and a mapping of a file that shrinks faults)
// and decoded as read_dcp_metadata does.
DcpMetadata read_dcp_metadata_file(const std::string& path);

// The names of the data files `metadata` places items in, sorted, each once.
std::vector<std::string> dcp_data_files(const DcpMetadata& metadata);

// The bytes of a `.metadata` file holding `metadata` as torch 2.x pickles it
// (torch >= 2.6's fields: planner_data, storage_data, version; the
// torch.distributed.checkpoint class paths; TensorProperties as its 5-tuple
// state; a bytes item's MetadataIndex without offset). metadata_class is not
// read: the class is Metadata. read_dcp_metadata reads it back equal, but for
// the tensors' and objects' order (tensors first unless positions interleave
// them) and metadata_class.
std::vector<std::byte> encode_dcp_metadata(const DcpMetadata& metadata);

// A chunk as its item holds it: the torch.save archive at the chunk's place,
// one _rebuild_tensor_v2 over one storage record.
struct DcpTensorItem {
  DType dtype = DType::Float32;
  std::vector<std::int64_t> shape;           // the box's sizes
  std::vector<std::int64_t> stride;          // as written: a plain tensor is not always made contiguous
  std::int64_t storage_offset = 0;           // elements
  std::uint64_t storage_offset_in_file = 0;  // absolute: the storage record's first byte in the data file
  std::uint64_t storage_nbytes = 0;
  std::uint32_t record_crc32 = 0;  // of the storage record, from the archive's directory
};

// Reads chunk `chunk` of `tensor` from the bytes of its data file
// (`file_path`): the archive inside the item's range parsed and checked (the
// range inside the file, one tensor of the chunk's dtype and of the box's
// shape, its view inside its storage). Throws Error naming the file, the key
// and chunk, and the absolute byte offset.
DcpTensorItem read_dcp_tensor_item(Bytes file_bytes, const std::string& file_path, const DcpTensor& tensor,
                                   std::size_t chunk);

// The one way into an item: `read(item_bytes)` on the bytes of the item at
// `place` of a data file (`file_path`), first checked to lie inside the file
// (IncompleteSet otherwise) and to start as a zip does (BadInput otherwise). An Error `read` throws is located under
// `what` (the key, and the chunk) at offsets of the file, not of the item, unless it is located there already (its
// member is `what`).
void check_dcp_item_range(std::uint64_t file_size, const std::string& file_path, const std::string& what,
                          const DcpItemPlace& place);
void check_dcp_item_start(Bytes item, const std::string& file_path, const std::string& what, const DcpItemPlace& place);
Error dcp_item_error(const Error& error, const std::string& file_path, const std::string& what,
                     const DcpItemPlace& place);
template <typename Read>
auto read_dcp_item(Bytes file_bytes, const std::string& file_path, const std::string& what, const DcpItemPlace& place,
                   Read&& read) -> decltype(read(file_bytes)) {
  check_dcp_item_range(file_bytes.size(), file_path, what, place);
  check_dcp_item_start(file_bytes.subspan(place.offset, place.length), file_path, what, place);
  try {
    return read(file_bytes.subspan(place.offset, place.length));
  } catch (const Error& e) {
    throw dcp_item_error(e, file_path, what, place);
  }
}

}  // namespace ckpt
