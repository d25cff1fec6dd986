// _ckpt_tool, the native half of the Python module `ckpt_tool` (the other half,
// ckpt_tool/__init__.py, makes torch tensors). It links no LibTorch and no
// torch ABI: it reads any input set ckpt-tool reads as one state dict (the
// layouts' state_dict, the same checks as stitch) and hands out each tensor's
// bytes either as a buffer over the mapped file (a tensor that lies contiguous
// in one file, in its own dtype: zero copy; mapped copy-on-write, so that a
// tensor changed in place, as an optimizer step does, changes a page of the
// process's own, never the file, where a read-only page would fault) or by
// filling a buffer the caller made (a tensor glued from shards, cut from
// partitions or converted), through the executor's one reader of pieces, in
// parallel. The bytes handed out are checked against their zip records' CRC-32
// as stitch checks what it copies, each record once. It also runs the commands
// (stitch, reshard, inspect, diff) in process, as the command line parses them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "../cli/command_line.hpp"
#include "../cli/inputs.hpp"
#include "ckpt/exec/compare.hpp"
#include "ckpt/exec/gather.hpp"
#include "ckpt/exec/tensor_math.hpp"
#include "ckpt/format/checkpoint.hpp"
#include "ckpt/io/crc32.hpp"
#include "ckpt/io/parallel.hpp"
#include "ckpt/io/version.hpp"
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
  const std::vector<std::string> labels = path_labels(std::string_view(name).substr(first));
  std::string key;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) key += '.';
    key += labels[i];
  }
  return key;
}

// An input set read as one state dict, its files mapped.
struct Loaded {
  std::unique_ptr<PlanInputs> inputs;
  // The files' copy-on-write mappings, made on a view's first need (under the GIL).
  std::vector<std::unique_ptr<MappedFile>> writable;
  std::vector<NamedTensor> tensors;  // named by key_of
  // The files' zip records and CRC-32s (plan_source), and the records checked so far.
  std::vector<PlanSource> sources;
  std::set<std::pair<std::uint32_t, std::size_t>> checked;
  std::mutex check_mutex;
};

std::shared_ptr<Loaded> load(const std::vector<std::string>& paths, const std::string& tag) {
  auto out = std::make_shared<Loaded>();
  {
    cli::Session session;  // (what load_inputs notes, a manifest read, is this call's)
    cli::SessionScope scope(session);
    // As stitch opens its inputs: a manifest or the files, then the complete grid.
    out->inputs =
        std::make_unique<PlanInputs>(cli::open_inputs(cli::with_tag(paths, tag), std::nullopt, /*grid_first=*/true));
  }
  const Manifest& manifest = out->inputs->manifest();
  if (std::optional<std::string> mixed = mixed_layouts(manifest.files)) throw Error(*mixed);
  StateDict state = input_layout(manifest).state_dict(manifest, {.state_dict_only = true});
  for (std::size_t i = 0; i < out->inputs->files().size(); ++i) {
    out->sources.push_back(out->inputs->source(static_cast<int>(i)));
  }
  // Part 0's copy of a replicated tensor stands for the others only when they agree (as stitch checks).
  std::vector<std::string> differing = compare_replicated(state.checks, out->inputs->files());
  if (!differing.empty()) {
    throw Error(ErrorKind::IncompleteSet, first_replicated_problem(differing) + ": the set is not one model");
  }
  // A training checkpoint's file holds more than its model (the optimizer
  // state): the model's tensors are the state dict.
  const bool has_model = std::any_of(state.tensors.begin(), state.tensors.end(),
                                     [](const NamedTensor& t) { return t.name.starts_with(kModelPrefix); });
  std::map<std::string, std::string> keys;   // name -> key, for ties
  std::map<std::string, std::string> named;  // key -> name: two names joined into one key are refused
  for (NamedTensor& tensor : state.tensors) {
    if (has_model && !tensor.name.starts_with(kModelPrefix)) continue;
    const std::string key = key_of(tensor.name);
    if (auto [other, added] = named.emplace(key, tensor.name); !added) {
      std::string file;
      for (const Piece& piece : tensor.source.pieces) {
        if (piece.mapped()) file = out->inputs->files().at(piece.source)->path();
      }
      throw Error(ErrorKind::BadInput, Location{file, tensor.name, std::nullopt},
                  fmt::format("it and {} are both the state dict key '{}' (names joined by '.'): load would keep one "
                              "of them",
                              printable(other->second), printable(key)));
    }
    keys.emplace(tensor.name, key);
    tensor.name = key;
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

// The bytes read by one thread of read_into at a time.
constexpr std::uint64_t kWindowBytes = 8u << 20;

// The calls running without the GIL, and whether the interpreter is exiting.
// Python ends a daemon thread that takes the GIL back after its finalization
// began by unwinding its stack, which C++ frames turn into std::terminate: at
// exit (atexit: shutdown) no call may still be out, so shutdown stops the
// commands, waits for every call to take the GIL back, and refuses new ones.
std::atomic<int> g_busy{0};
std::atomic<bool> g_exiting{false};

// Held, with the GIL, around a call's time without it: made before its
// gil_scoped_release, ended after the GIL is back.
class Busy {
 public:
  Busy() {
    if (g_exiting.load()) throw Error(ErrorKind::Usage, "the Python interpreter is exiting");
    ++g_busy;
  }
  ~Busy() { --g_busy; }
  Busy(const Busy&) = delete;
  Busy& operator=(const Busy&) = delete;
};

// atexit: stop the commands running, wait for every call to return.
void shutdown() {
  g_exiting.store(true);
  py::gil_scoped_release unlocked;
  while (g_busy.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
}

class Reader {
 public:
  Reader(const std::vector<std::string>& paths, const std::string& tag) {
    Busy busy;
    py::gil_scoped_release unlocked;
    loaded_ = load(paths, tag);
  }

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
    if (info.ndim != 1 || info.strides[0] != info.itemsize) {
      throw Error(ErrorKind::Usage, tensor.name + ": read_into needs a contiguous one-dimensional buffer");
    }
    const std::uint64_t itemsize = dtype_info(tensor.dtype()).itemsize;
    const std::uint64_t nbytes = tensor.source.numel() * itemsize;
    if (static_cast<std::uint64_t>(info.size * info.itemsize) != nbytes) {
      throw Error(ErrorKind::Usage,
                  fmt::format("{}: a buffer of {} bytes for {} bytes", tensor.name, info.size * info.itemsize, nbytes));
    }
    auto* dest = static_cast<std::byte*>(info.ptr);
    Busy busy;
    py::gil_scoped_release unlocked;
    // In windows of whole elements, on every core: the pieces of a glued
    // tensor lie in different files, each window's in one or a few.
    const std::uint64_t source_itemsize = dtype_info(tensor.source.dtype).itemsize;
    const std::uint64_t numel = tensor.source.numel();
    const std::uint64_t window = std::max<std::uint64_t>(1, kWindowBytes / std::max(itemsize, source_itemsize));
    const auto& files = loaded_->inputs->files();
    const bool converts = tensor.dtype() != tensor.source.dtype;
    parallel_for((numel + window - 1) / window, resolve_threads(0), [&] {
      return [&, read = std::vector<std::byte>()](std::size_t w) mutable {
        const std::uint64_t first = w * window;
        const std::uint64_t count = std::min(window, numel - first);
        if (!converts) {
          read_source_bytes(tensor.source, files, first * itemsize, count * itemsize, dest + first * itemsize);
          return;
        }
        read.resize(count * source_itemsize);
        read_source_bytes(tensor.source, files, first * source_itemsize, read.size(), read.data());
        convert_elements(tensor.source.dtype, tensor.dtype(), read.data(), dest + first * itemsize, count);
      };
    });
  }

  // Checks the zip records tensor i's bytes lie in against their CRC-32 (each
  // record once per Reader; a safetensors or DCP file has none), read apart
  // from the mapping (pread: no page of the process's own). Returns the bytes read.
  std::uint64_t check(std::size_t i) const {
    const NamedTensor& tensor = at(i);
    Busy busy;
    py::gil_scoped_release unlocked;
    // One check at a time per Reader: a record is marked checked only once its
    // CRC matched, and a second thread waits for the first's verdict.
    std::lock_guard serial(loaded_->check_mutex);
    std::vector<std::pair<std::uint32_t, std::size_t>> records;
    for (const Piece& piece : tensor.source.pieces) {
      if (!piece.mapped() || piece.nbytes == 0) continue;
      const PlanSource& source = loaded_->sources.at(piece.source);
      if (!source.has_crcs) continue;
      const std::uint64_t end = piece.source_offset + (piece.rows - 1) * piece.source_stride + piece.source_nbytes();
      std::optional<std::size_t> record = record_index(source, piece.source_offset);
      if (!record || end > source.records[*record].end()) {
        throw Error(ErrorKind::CorruptData, Location{source.path, tensor.name, piece.source_offset},
                    "the tensor's bytes do not lie in one storage record of the file");
      }
      const std::pair<std::uint32_t, std::size_t> key{piece.source, *record};
      if (!loaded_->checked.contains(key) && std::find(records.begin(), records.end(), key) == records.end()) {
        records.push_back(key);
      }
    }
    std::atomic<std::uint64_t> read{0};
    std::vector<char> sound(records.size(), 0);
    std::exception_ptr failure;
    try {
      parallel_for(records.size(), resolve_threads(0), [&] {
        return [&, buffer = std::vector<std::byte>()](std::size_t r) mutable {
          const auto [file, index] = records[r];
          const CheckedRange& record = loaded_->sources[file].records[index];
          const MappedFile& mapped = *loaded_->inputs->files()[file];
          const std::uint32_t crc = crc32_update_from(0, mapped, record.offset, record.nbytes, buffer);
          read += record.nbytes;
          if (crc != record.crc32) {
            throw Error(ErrorKind::CorruptData, Location{mapped.path(), tensor.name, record.offset},
                        fmt::format("CRC-32 of the data is 0x{:08x}, the zip directory says 0x{:08x} (corrupted data)",
                                    crc, record.crc32));
          }
          sound[r] = 1;
        };
      });
    } catch (...) {
      failure = std::current_exception();
    }
    for (std::size_t r = 0; r < records.size(); ++r) {
      if (sound[r] != 0) loaded_->checked.insert(records[r]);
    }
    if (failure) std::rethrow_exception(failure);
    return read.load();
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

// A command's run in process: its exit code, its stdout text and the outputs it wrote.
using CommandResult = std::tuple<int, py::bytes, std::vector<py::bytes>>;

// Runs a command line (the command and its arguments) as ckpt-tool would, on a
// thread of its own. This thread waits for it without the GIL and, every 100
// ms, takes the GIL to look for signals (Ctrl-C) and to call `progress(done,
// total)` with the copy's latest figures. An exception either raises stops the
// copy at its next unit (no output is left) and is raised here once the command
// has returned; the copy threads never take the GIL.
CommandResult run(const std::vector<std::string>& args, const py::object& progress) {
  Busy busy;
  cli::Session session;
  std::ostringstream text;
  session.out = &text;
  std::atomic<std::uint64_t> done{0};
  std::atomic<std::uint64_t> total{0};
  std::atomic<bool> reported{false};
  std::atomic<bool> stop{false};
  session.progress = [&](std::uint64_t now_done, std::uint64_t now_total) {
    done.store(now_done);
    total.store(now_total);
    reported.store(true);
    if (stop.load()) throw Error(ErrorKind::Usage, "stopped by Python");
  };
  int code = 0;
  std::exception_ptr failure;
  bool finished = false;
  std::mutex mutex;
  std::condition_variable ended;
  std::thread command([&] {
    try {
      code = cli::run_in_process(args, session);
    } catch (...) {
      failure = std::current_exception();
    }
    std::lock_guard lock(mutex);
    finished = true;
    ended.notify_all();
  });
  std::optional<py::error_already_set> raised;
  for (bool last = false; !last;) {
    {
      py::gil_scoped_release unlocked;
      std::unique_lock lock(mutex);
      ended.wait_for(lock, std::chrono::milliseconds(100), [&] { return finished; });
      last = finished;
    }
    if (g_exiting.load()) stop.store(true);  // (no callback then)
    if (raised || g_exiting.load()) continue;
    try {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (reported.exchange(false) && !progress.is_none()) progress(done.load(), total.load());
    } catch (py::error_already_set& e) {
      raised.emplace(std::move(e));
      stop.store(true);
    }
  }
  command.join();
  if (raised && !failure && !session.written.empty()) {
    // The copy had ended: say so, a rerun would find the outputs.
    py::error_scope keep;  // (add_note runs Python)
    py::object value = raised->value();
    if (py::hasattr(value, "add_note")) {
      std::string note = "ckpt-tool: the command had finished; its outputs were written:";
      for (const std::string& path : session.written) note += " " + path;
      value.attr("add_note")(note);
    }
  }
  if (raised) throw std::move(*raised);
  if (failure) std::rethrow_exception(failure);
  std::vector<py::bytes> written;
  for (const std::string& path : session.written) written.emplace_back(path);
  return {code, py::bytes(text.str()), written};
}

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
  static py::exception<ckpt::Error> internal(m, "InternalError", base.ptr());
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
    } catch (const ckpt::InternalError& e) {
      internal(e.what());
    }
  });
  py::class_<MappedRange>(m, "MappedRange", py::buffer_protocol()).def_buffer([](MappedRange& range) {
    return py::buffer_info(range.data, 1, py::format_descriptor<std::uint8_t>::format(), 1,
                           {static_cast<py::ssize_t>(range.size)}, {py::ssize_t{1}}, /*readonly=*/false);
  });
  py::class_<Reader>(m, "Reader")
      .def(py::init<const std::vector<std::string>&, const std::string&>(), py::arg("paths"), py::arg("tag") = "")
      .def("entries", &Reader::entries)
      .def("view", &Reader::view)
      .def("read_into", &Reader::read_into)
      .def("check", &Reader::check)
      .def("objects_json", &Reader::objects_json)
      .def("__len__", &Reader::size);
  m.def("run", &run, py::arg("args"), py::arg("progress") = py::none());
  m.def("shutdown", &shutdown);
  m.def(
      "flags_of",
      [](const std::string& command) { return ckpt::cli::CommandLine(ckpt::kVersionString).flags_of(command); },
      py::arg("command"));
  // The LibTorch plugin (dtype conversion), where meson built and installs it.
  std::vector<std::string> plugin;
  std::string_view paths = CKPT_TORCH_PLUGIN_PATHS;
  for (std::size_t start = 0; start <= paths.size();) {
    const std::size_t colon = std::min(paths.find(':', start), paths.size());
    if (colon > start) plugin.emplace_back(paths.substr(start, colon - start));
    start = colon + 1;
  }
  ckpt::add_torch_plugin_paths(plugin);
}
