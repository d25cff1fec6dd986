"""ckpt_tool: load any checkpoint ckpt-tool reads as torch tensors, without torch.load.

    import ckpt_tool
    state_dict = ckpt_tool.load("checkpoints/")           # metaseq shards, a torch file,
                                                          # safetensors, DCP, DeepSpeed, a manifest
    state_dict = ckpt_tool.load(paths, filter=r"layers\\.0\\.", dtype=torch.bfloat16)

No pickle is executed. A tensor whose bytes lie contiguous in one file, in its own
dtype, is a view of the mapped file: its pages are read when used, and a change made
to it in place (an optimizer step) goes to memory of the process's own, never to the
file. Like torch.load(mmap=True), such a tensor reads the file as it is now: do not
rewrite or truncate a file whose tensors are in use (a truncated file's pages fault
with SIGBUS), or load with mmap=False. A tensor glued from shards, cut from flat
partitions or converted is read into a new tensor. Every tensor's bytes are checked against their zip records' CRC-32, as stitch
checks what it copies (each record once, read whole when its first tensor is
asked for: load() so reads every byte of the file once, outside the mapping;
check_crc=False skips it, and a view's pages are then read only when used).

The commands run in this process, with their flags as keyword arguments
(max_shard_size="2GB" for --max-shard-size 2GB, force=True for --force):

    ckpt_tool.stitch("checkpoints/", "model.safetensors", dtype="bf16", progress=print)
    ckpt_tool.reshard("checkpoints/", "out/part-{m}-shard{d}.pt", mp=2, dp=4)
    info = ckpt_tool.inspect("checkpoints/")        # the dict of `inspect --json`
    result = ckpt_tool.diff("a.pt", "b.pt")         # result.equal, result.differing, ...
    problems = ckpt_tool.verify("checkpoints/")     # [] when sound
    index = ckpt_tool.manifest("checkpoints/")      # the manifest as a dict

Errors raise ckpt_tool.Error (UsageError, BadInputError, IncompleteSetError,
CorruptDataError, IoError, NoSpaceError; InternalError for a bug) with the line
ckpt-tool prints;
arguments of the wrong kind raise TypeError or ValueError.
"""
import atexit
import collections.abc
import json
import numbers
import os
import re
import threading
import weakref

import torch

from ._ckpt_tool import (BadInputError, CorruptDataError, Error, IncompleteSetError, InternalError, IoError,
                         NoSpaceError, Reader, UsageError, flags_of, run, shutdown)

atexit.register(shutdown)  # (no call may still be out without the GIL when the interpreter ends)

__all__ = ["load", "open", "stitch", "reshard", "inspect", "diff", "verify", "manifest", "DiffResult", "Error",
           "UsageError", "BadInputError", "IncompleteSetError", "CorruptDataError", "IoError", "NoSpaceError",
           "InternalError"]

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "complex64": torch.complex64, "complex128": torch.complex128,
}


def _numel(shape):
    n = 1
    for extent in shape:
        n *= extent
    return n


def _tensor(reader, i, dtype_name, shape, mmap):
    dtype = _DTYPES[dtype_name]
    numel = _numel(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    view = reader.view(i) if mmap else None
    if view is not None:  # (a copy-on-write mapping: writable, the file never written)
        return torch.frombuffer(view, dtype=dtype, count=numel).view(shape)
    data = bytearray(numel * torch.empty((), dtype=dtype).element_size())
    reader.read_into(i, data)
    return torch.frombuffer(data, dtype=dtype, count=numel).view(shape)


class StateDict(collections.abc.Mapping):
    """An input set's state dict read on access (ckpt_tool.open): keys and shapes
    come from the files' metadata; a tensor's bytes are read (or mapped) when it is
    looked up. The Mapping keeps no tensor alive: one looked up again while the
    caller still holds it is the same object (a tie too); once dropped, its memory
    is freed and a later lookup reads it again, so a script walking a large model
    layer by layer holds only the layers it keeps."""

    def __init__(self, paths, dtype=None, mmap=True, tag="", check_crc=True):
        self._paths = paths
        self._reader = Reader(paths, tag)
        self._entries = self._reader.entries()
        self._index = {key: i for i, (key, _, _, _) in enumerate(self._entries)}
        self._dtype, self._mmap, self._check = dtype, mmap, check_crc
        self._made = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._making = {}  # index -> the lock of its first lookup (threads asking at once make it once)

    def _at(self, i):
        made = self._made.get(i)
        if made is not None:
            return made
        with self._lock:
            making = self._making.setdefault(i, threading.Lock())
        with making:
            made = self._made.get(i)
            if made is None:
                made = self._make(i)
                self._made[i] = made
        return made

    def _make(self, i):
        key, dtype_name, shape, tied = self._entries[i]
        if tied is not None:
            return self._at(self._index[tied])
        if self._check:
            self._reader.check(i)
        made = _tensor(self._reader, i, dtype_name, shape, self._mmap)
        if self._dtype is not None and made.is_floating_point() and made.dtype != self._dtype:
            made = made.to(self._dtype)
        return made

    def __repr__(self):
        shown = [os.fsdecode(path) for path in self._paths[:3]]
        more = f" and {len(self._paths) - 3} more" if len(self._paths) > 3 else ""
        return f"<ckpt_tool.StateDict of {len(self)} tensors read from {', '.join(shown)}{more}>"

    def __getitem__(self, key):
        return self._at(self._index[key])

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)

    def shape(self, key):
        """The shape of `key`'s tensor, without reading it."""
        return torch.Size(self._entries[self._index[key]][2])

    def dtype(self, key):
        return _DTYPES[self._entries[self._index[key]][1]]

    def metadata(self):
        """The first file's objects (cfg, hyperparameters, ...), tensors as {"$tensor": i}."""
        return json.loads(self._reader.objects_json())


def _paths(path_or_paths):
    """The paths as bytes (any file name, UTF-8 or not, reaches the reader as it is)."""
    one = (str, bytes, os.PathLike)
    if isinstance(path_or_paths, one):
        paths = [path_or_paths]
    else:
        try:
            paths = list(path_or_paths)
        except TypeError:
            raise TypeError(f"a path or a list of paths, not {type(path_or_paths).__name__}") from None
        for path in paths:
            if not isinstance(path, one):
                raise TypeError(f"a path is a str, bytes or os.PathLike, not {type(path).__name__}")
    encoded = [_no_nul(os.fsencode(path), "a path") for path in paths]
    if not encoded or any(not path for path in encoded):
        raise ValueError("no path given" if not encoded else "an empty path")
    return encoded


_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64, "half": torch.float16, "float": torch.float32, "double": torch.float64}


def _checked_dtype(dtype):
    """A floating torch.dtype, or its name as the command line gives it ("bf16")."""
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype converts floating tensors: a floating torch.dtype (torch.bfloat16, ...) or "
                        f"one of {', '.join(_DTYPE_NAMES)}, not {dtype!r}")
    return dtype


def _pattern(filter):
    if filter is None or hasattr(filter, "search"):
        return filter
    if not isinstance(filter, str):
        raise TypeError(f"filter is a regular expression (str or re.Pattern), not {type(filter).__name__}")
    try:
        return re.compile(filter)
    except re.error as e:
        raise ValueError(f"filter {filter!r}: {e}") from None


def _is_bool(value):
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # (numpy's too)


def _bool(value, name):
    """True or False; anything else is a TypeError, not a truth value."""
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{name} is True or False, not {value!r}")


def _tag(tag):
    if tag is None:
        return ""
    if not isinstance(tag, (str, bytes)):
        raise TypeError(f"tag is a str, not {type(tag).__name__}")
    return os.fsencode(tag)


def open(path_or_paths, *, dtype=None, mmap=True, tag=None, check_crc=True):  # noqa: A001 (the module's own name)
    """The input set's state dict as a Mapping whose tensors are read on access
    (and their records' CRC-32 checked then)."""
    return StateDict(_paths(path_or_paths), dtype=_checked_dtype(dtype), mmap=_bool(mmap, "mmap"), tag=_tag(tag),
                     check_crc=_bool(check_crc, "check_crc"))


def load(path_or_paths, *, filter=None, dtype=None, mmap=True, tag=None, check_crc=True):
    """The state dict of the input set (a path, or a list of paths: files, folders,
    globs, a manifest) as ckpt-tool's stitch reads it: {key: tensor} in the state
    dict's order, a tie one tensor under both keys.

    filter: a regular expression (re.search on the key): only the matching tensors
        are read. dtype: convert floating tensors to it. mmap: False copies every
        tensor into memory of its own. tag: a DeepSpeed step folder other than the
        one `latest` names. check_crc: False skips the CRC-32 check of the bytes."""
    pattern = _pattern(filter)
    state = open(path_or_paths, dtype=dtype, mmap=mmap, tag=tag, check_crc=check_crc)
    return {key: state[key] for key in state if pattern is None or pattern.search(key)}


_FLAGS = {}


def _flags(command, flags):
    """Keyword arguments as the command's flags: name_like_this=V is --name-like-this V;
    True is a flag alone, False and None leave it out (a flag on by default stays
    on: its opposite is a flag of its own, no_crc_check=True), a list repeats it.
    A name the command has not, True for a flag that takes a value or a value for
    one that takes none raise TypeError before anything runs."""
    if command not in _FLAGS:
        _FLAGS[command] = dict(flags_of(command))
    known = _FLAGS[command]
    out = []
    for name, value in flags.items():
        option = name.replace("_", "-")
        if option not in known:
            raise TypeError(f"{command}() got an unexpected keyword argument {name!r} (its flags: "
                            f"{', '.join(sorted(k.replace('-', '_') for k in known))})")
        flag = b"--" + option.encode()
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for one in values:
            if _is_bool(one):
                one = bool(one)
            if one is None or one is False:
                continue
            if not known[option]:
                if one is not True:
                    raise TypeError(f"{name} is a flag: True or False, not {one!r}")
                out.append(flag)
            elif one is True:
                raise TypeError(f"{name} takes a value (--{option} VALUE), not True")
            elif isinstance(one, torch.dtype):
                out.append(flag + b"=" + str(one).removeprefix("torch.").encode())
            elif isinstance(one, (str, bytes, os.PathLike)):
                out.append(flag + b"=" + _no_nul(os.fsencode(one), name))
            elif isinstance(one, numbers.Real):
                out.append(flag + b"=" + str(one).encode())
            else:
                raise TypeError(f"{name}: a str, path, number, bool or list of them, not {type(one).__name__}")
    return out


def _no_nul(path, what):
    if b"\0" in path:
        raise ValueError(f"{what}: embedded null byte")
    return path


def _output(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"output is a path (str, bytes or os.PathLike), not {type(path).__name__}")
    return _no_nul(os.fsencode(path), "output")


def _run(command, flags, paths, progress):
    if progress is not None and not callable(progress):
        raise TypeError(f"progress is a callable (done_bytes, total_bytes), not {type(progress).__name__}")
    # (a path that starts with '-' after "--", where it is no flag)
    end = [b"--"] if any(path.startswith(b"-") for path in paths) else []
    return run([command.encode()] + flags + end + paths, progress)


def _write(command, inputs, output, progress, quiet, flags):
    flags = dict(flags, quiet=_bool(quiet, "quiet"), output=_output(output))
    code, text, written = _run(command, _flags(command, flags), _paths(inputs), progress)
    if flags.get("dry_run"):
        return text.decode("utf-8", "replace")
    if flags.get("save_plan"):
        return [os.fsdecode(flags["save_plan"])]
    return [os.fsdecode(path) for path in written]


def stitch(inputs, output, *, progress=None, quiet=True, **flags):
    """`ckpt-tool stitch INPUTS -o OUTPUT` with `flags` as its options. Returns the
    paths written (the plan's text with dry_run=True, the plan's path with save_plan=). progress(done_bytes,
    total_bytes) is called while copying, from this thread, every 100 ms at most.
    An exception it raises, or Ctrl-C's KeyboardInterrupt, stops the copy at its
    next unit, leaves no output, and is raised here once the command has stopped
    (reading and planning run to their end first; an interrupt after the copy
    ended is raised with the outputs written)."""
    return _write("stitch", inputs, output, progress, quiet, flags)


def reshard(inputs, output, *, progress=None, quiet=True, **flags):
    """`ckpt-tool reshard INPUTS -o OUTPUT` with `flags` as its options (mp=, dp=,
    ...); as stitch returns."""
    return _write("reshard", inputs, output, progress, quiet, flags)


def inspect(inputs, **flags):
    """`ckpt-tool inspect --json INPUTS` as a dict (tensors=True lists every tensor)."""
    code, text, _ = _run("inspect", _flags("inspect", dict(flags, json=True)), _paths(inputs), None)
    return json.loads(text)


class DiffResult:
    """What `ckpt-tool diff --json` reports: equal, only_in_a, only_in_b, differing
    (one dict per tensor: name, mismatch, count, max_abs, positions, ...), objects,
    notes, compared_tensors, compared_tensor_bytes, seconds; `as_dict()` all of it.
    Not a bool: ask for .equal."""

    hint = None  # (set when the names differ in a way --names hf-opt explains)
    model_only = False

    def __init__(self, report):
        self._report = report
        for key, value in report.items():
            setattr(self, key, value)

    def as_dict(self):
        return dict(self._report)

    def __bool__(self):
        raise TypeError("a DiffResult is not a bool: use .equal")

    def __repr__(self):
        return (f"DiffResult(equal={self.equal}, differing={len(self.differing)}, only_in_a={len(self.only_in_a)}, "
                f"only_in_b={len(self.only_in_b)})")


def diff(a, b, **flags):
    """`ckpt-tool diff A B` (atol=, rtol=, names="hf-opt", ...) as a DiffResult."""
    sides = _paths(a) + _paths(b)
    if len(sides) != 2:
        raise ValueError("diff compares one path with one path (a folder, a file, a manifest or a quoted glob)")
    code, text, _ = _run("diff", _flags("diff", dict(flags, json=True)), sides, None)
    return DiffResult(json.loads(text))


def verify(inputs, **flags):
    """`ckpt-tool verify INPUTS`: every problem found (CRCs, tensor ranges, FSDP and
    model-parallel metadata), one line each; an empty list when the set is sound."""
    code, text, _ = _run("verify", _flags("verify", dict(flags, quiet=True)), _paths(inputs), None)
    return text.decode("utf-8", "replace").splitlines()


def manifest(inputs, output=None, **flags):
    """`ckpt-tool manifest INPUTS`: the manifest as a dict, or written to `output`
    (.json, or .json.zst compressed) and its path returned."""
    if output is not None:
        flags = dict(flags, output=_output(output))
    code, text, _ = _run("manifest", _flags("manifest", flags), _paths(inputs), None)
    return os.fsdecode(flags["output"]) if output is not None else json.loads(text)
