// _ckpt_tool, the native half of the Python module `ckpt_tool` (the other half,
// ckpt_tool/__init__.py, makes torch tensors). It links no LibTorch and no
// torch ABI: it reads any input set ckpt-tool reads as one state dict (the
// layouts' state_dict, the same checks as stitch) and hands out each tensor's
// bytes either as a buffer over the mapped file (a tensor that lies contiguous
// in one file, in its own dtype: zero copy; mapped copy-on-write, so that a
// tensor changed in place, as an optimizer step does, changes a page of the
// process's own, never the file, where a read-only page would fault) or by
// filling a buffer the caller made (a tensor glued from shards, cut from
// partitions or converted), through the executor's one reader of pieces.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ckpt/exec/compare.hpp"
#include "ckpt/exec/gather.hpp"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/manifest/describe.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/manifest/manifest_json.hpp"
#include "ckpt/plan/plan_inputs.hpp"

namespace py = pybind11;

namespace ckpt::python {

namespace {

// The state dict's key of a tensor the layouts name, "model/<escaped key>" (a
// training set's model, every state-dict layout) or one plain file's object
// path: the labels after "model/", or all of them, joined by '.' as torch's
// flatten_state_dict joins them ({"model": {"a": {"b": t}}} gives "a.b").
std::string key_of(const std::string& name) {
  const std::size_t first = name.starts_with(kModelPrefix) ? kModelPrefix.size() : 0;
  std::string key;
  std::size_t start = first;
  while (start <= name.size()) {
    const std::size_t slash = std::min(name.find('/', start), name.size());
    if (start != first) key += '.';
    key += unescape_label(std::string_view(name).substr(start, slash - start));
    start = slash + 1;
  }
  return key;
}

// An input set read as one state dict, its files mapped.
struct Loaded {
  std::unique_ptr<PlanInputs> inputs;
  // The files' copy-on-write mappings, made on a view's first need (under the GIL).
  std::vector<std::unique_ptr<MappedFile>> writable;
  std::vector<NamedTensor> tensors;  // named by key_of
  std::vector<std::string> names;    // the layouts' names, for messages
};

std::shared_ptr<Loaded> load(const std::vector<std::string>& paths) {
  Manifest manifest;
  if (paths.size() == 1 && looks_like_manifest(paths[0])) {
    manifest = read_checked_manifest(paths[0]);
  } else {
    manifest = build_manifest(expand_inputs(paths));
    std::vector<std::string> problems = index_problems(paths, manifest.files);
    if (!problems.empty()) throw Error(ErrorKind::IncompleteSet, problems.front());
  }
  if (std::optional<std::string> mixed = mixed_layouts(manifest.files)) throw Error(*mixed);
  auto out = std::make_shared<Loaded>();
  const InputLayout& layout = input_layout(manifest);
  StateDict state = layout.state_dict(manifest, {.state_dict_only = true});
  out->inputs = std::make_unique<PlanInputs>(std::move(manifest));
  // Part 0's copy of a replicated tensor stands for the others only when they agree (as stitch checks).
  std::vector<std::string> differing = compare_replicated(state.checks, out->inputs->files());
  if (!differing.empty()) {
    throw Error(ErrorKind::IncompleteSet, first_replicated_problem(differing) + ": the set is not one model");
  }
  // A training checkpoint's file holds more than its model (the optimizer
  // state): the model's tensors are the state dict.
  const bool has_model = std::any_of(state.tensors.begin(), state.tensors.end(),
                                     [](const NamedTensor& t) { return t.name.starts_with(kModelPrefix); });
  std::map<std::string, std::string> keys;  // name -> key, for ties
  for (NamedTensor& tensor : state.tensors) {
    if (has_model && !tensor.name.starts_with(kModelPrefix)) continue;
    out->names.push_back(tensor.name);
    keys.emplace(tensor.name, key_of(tensor.name));
    tensor.name = keys.at(tensor.name);
    out->tensors.push_back(std::move(tensor));
  }
  for (NamedTensor& tensor : out->tensors) {
    if (!tensor.alias_of) continue;
    auto key = keys.find(*tensor.alias_of);
    tensor.alias_of = key == keys.end() ? std::nullopt : std::optional<std::string>(key->second);
  }
  return out;
}

// Bytes of a copy-on-write mapping, kept mapped while Python holds them.
struct MappedRange {
  std::shared_ptr<const Loaded> owner;
  std::byte* data;
  std::size_t size;
};

class Reader {
 public:
  explicit Reader(const std::vector<std::string>& paths) : loaded_(load(paths)) {}

  // (key, dtype, shape, the key it is tied to or None), in the state dict's order.
  std::vector<std::tuple<std::string, std::string, std::vector<std::int64_t>, std::optional<std::string>>> entries()
      const {
    std::vector<std::tuple<std::string, std::string, std::vector<std::int64_t>, std::optional<std::string>>> out;
    for (const NamedTensor& tensor : loaded_->tensors) {
      out.emplace_back(tensor.name, std::string(dtype_info(tensor.dtype()).name), tensor.source.shape, tensor.alias_of);
    }
    return out;
  }

  // Tensor i's bytes where they lie contiguous in one file in its own dtype;
  // None otherwise (read_into then).
  std::optional<MappedRange> view(std::size_t i) const {
    const NamedTensor& tensor = at(i);
    const auto& pieces = tensor.source.pieces;
    if (tensor.convert_to && *tensor.convert_to != tensor.source.dtype) return std::nullopt;
    if (pieces.size() != 1 || !pieces[0].plain() || !pieces[0].mapped() || pieces[0].offset != 0 ||
        pieces[0].nbytes != tensor.source.nbytes()) {
      return std::nullopt;
    }
    return MappedRange{loaded_, writable(pieces[0].source) + pieces[0].source_offset, pieces[0].nbytes};
  }

  // Tensor i's bytes, in its written dtype, into `out` (a writable buffer of
  // exactly that size).
  void read_into(std::size_t i, const py::buffer& out) const {
    const NamedTensor& tensor = at(i);
    py::buffer_info info = out.request(/*writable=*/true);
    const std::uint64_t nbytes = tensor.source.numel() * dtype_info(tensor.dtype()).itemsize;
    if (static_cast<std::uint64_t>(info.size * info.itemsize) != nbytes) {
      throw Error(ErrorKind::Usage,
                  fmt::format("{}: a buffer of {} bytes for {} bytes", tensor.name, info.size * info.itemsize, nbytes));
    }
    auto* dest = static_cast<std::byte*>(info.ptr);
    py::gil_scoped_release unlocked;
    if (tensor.dtype() == tensor.source.dtype) {
      read_source_bytes(tensor.source, loaded_->inputs->files(), 0, nbytes, dest, nullptr);
      return;
    }
    std::vector<std::byte> read(tensor.source.nbytes());
    read_source_bytes(tensor.source, loaded_->inputs->files(), 0, read.size(), read.data(), nullptr);
    convert_elements(tensor.source.dtype, tensor.dtype(), read.data(), dest, tensor.source.numel());
  }

  std::size_t size() const { return loaded_->tensors.size(); }

  // File `index` mapped copy-on-write: the same file as read (size, mtime and
  // identity), or an Error naming it.
  std::byte* writable(std::uint32_t index) const {
    auto& slots = loaded_->writable;
    if (slots.empty()) slots.resize(loaded_->inputs->files().size());
    std::unique_ptr<MappedFile>& slot = slots.at(index);
    if (!slot) {
      const MappedFile& read = *loaded_->inputs->files().at(index);
      auto mapped = std::make_unique<MappedFile>(read.path(), MappedFile::Access::CopyOnWrite);
      if (mapped->device() != read.device() || mapped->inode() != read.inode() || mapped->size() != read.size() ||
          mapped->mtime_ns() != read.mtime_ns()) {
        throw Error(ErrorKind::Io, Location{read.path(), "", std::nullopt}, "changed since it was read");
      }
      slot = std::move(mapped);
    }
    return slot->copy_on_write_data();
  }

  // The object tree of the set's first file (its cfg, its optimizer's
  // hyperparameters: everything but tensor bytes) as JSON text, tensors as
  // {"$tensor": i}, classes as {"$class": name}.
  std::string objects_json() const {
    const Manifest& manifest = loaded_->inputs->manifest();
    if (manifest.files.empty()) return "null";
    return manifest.files.front().objects->dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  }

 private:
  const NamedTensor& at(std::size_t i) const {
    if (i >= loaded_->tensors.size()) throw py::index_error("no tensor " + std::to_string(i));
    return loaded_->tensors[i];
  }
  std::shared_ptr<Loaded> loaded_;
};

}  // namespace

}  // namespace ckpt::python

PYBIND11_MODULE(_ckpt_tool, m) {
  using namespace ckpt::python;
  m.doc() = "ckpt-tool's native reader: state dicts of checkpoints as buffers over their mapped files";
  // One class per error kind, under ckpt_tool.Error, each with the one line ckpt-tool prints.
  static py::exception<ckpt::Error> base(m, "Error");
  static py::exception<ckpt::Error> usage(m, "UsageError", base.ptr());
  static py::exception<ckpt::Error> bad_input(m, "BadInputError", base.ptr());
  static py::exception<ckpt::Error> incomplete(m, "IncompleteSetError", base.ptr());
  static py::exception<ckpt::Error> corrupt(m, "CorruptDataError", base.ptr());
  static py::exception<ckpt::Error> io(m, "IoError", base.ptr());
  static py::exception<ckpt::Error> no_space(m, "NoSpaceError", base.ptr());
  py::register_exception_translator([](std::exception_ptr thrown) {
    try {
      if (thrown) std::rethrow_exception(thrown);
    } catch (const ckpt::Error& e) {
      switch (e.kind()) {
        case ckpt::ErrorKind::Usage: usage(e.what()); return;
        case ckpt::ErrorKind::IncompleteSet: incomplete(e.what()); return;
        case ckpt::ErrorKind::CorruptData: corrupt(e.what()); return;
        case ckpt::ErrorKind::Io: io(e.what()); return;
        case ckpt::ErrorKind::NoSpace: no_space(e.what()); return;
        default: bad_input(e.what()); return;
      }
    }
  });
  py::class_<MappedRange>(m, "MappedRange", py::buffer_protocol()).def_buffer([](MappedRange& range) {
    return py::buffer_info(range.data, 1, py::format_descriptor<std::uint8_t>::format(), 1,
                           {static_cast<py::ssize_t>(range.size)}, {py::ssize_t{1}}, /*readonly=*/false);
  });
  py::class_<Reader>(m, "Reader")
      .def(py::init<const std::vector<std::string>&>(), py::arg("paths"))
      .def("entries", &Reader::entries)
      .def("view", &Reader::view)
      .def("read_into", &Reader::read_into)
      .def("objects_json", &Reader::objects_json)
      .def("__len__", &Reader::size);
}
