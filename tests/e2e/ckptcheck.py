#!/usr/bin/python3
"""Checks for ckpt-tool's end-to-end tests, judged by PyTorch itself.

Run it with Debian's /usr/bin/python3 (python3-torch 1.13, python3-omegaconf).

Importable:
    register_fake_modules()   make `metaseq.data.document_to_sequence.LockingArray`
                              importable, so training files that hold one load
    load(path)                torch.load(path, map_location="cpu") after registering
    assert_same(a, b)         deep, bit-exact equality; raises AssertionError naming
                              the first differing path

Command line (exit 0 when the check passes, 1 when it fails, 2 on usage errors):
    ckptcheck.py same A.pt B.pt          load both and assert_same
    ckptcheck.py testzip FILE...         zipfile's CRC check on every entry
                 [--aligned]             also: every entry STORED, data 64-byte aligned
    ckptcheck.py offsets MANIFEST.json   every tensor's file_byte_offset and
                                         record_crc32 in a ckpt-tool manifest agree
                                         with Python's zipfile and with torch.load

What `same` compares (see assert_same):
  * tensors: exact type (Tensor vs Parameter), dtype, shape, requires_grad and the
    values bit for bit (NaN payloads, -0.0, bf16/fp16 included); strides, storage
    offsets and storage sharing between unrelated tensors are NOT compared, but
    aliasing is: two paths holding the same view (tied weights) on one side must hold
    the same view on the other side, and vice versa;
  * dicts: exact type (dict vs OrderedDict), key order, values; an OrderedDict's
    `_metadata` attribute (state_dict module versions) as if it were a further entry;
  * lists/tuples: type, length, items; torch.Size as a tuple of ints of its own type;
  * argparse.Namespace: vars(), key order included;
  * OmegaConf DictConfig/ListConfig: type and OmegaConf.to_container(resolve=False);
  * LockingArray (or any object with __getstate__ and no __dict__ compare): class and
    state;
  * scalars: exact type (bool vs int vs float) and value, NaN equal to NaN.
"""

import argparse
import copyreg
import json
import math
import os
import struct
import sys
import types
import zipfile
from collections import OrderedDict

import torch

try:
    from omegaconf import DictConfig, ListConfig, OmegaConf
except ImportError:  # omegaconf is only needed for files that contain configs
    DictConfig = ListConfig = OmegaConf = None


# --------------------------------------------------------------------------------------
# Fake metaseq module: the one class that metaseq training files need beyond torch,
# argparse and omegaconf.

FAKE_MODULE = "metaseq.data.document_to_sequence"


class LockingArray:
    """Stand-in for metaseq's `metaseq.data.document_to_sequence.LockingArray`.

    Pickles as NEWOBJ (no arguments) followed by BUILD with a `(bytes, int)` tuple
    state, the shape metaseq's class has in real checkpoints.
    """

    def __init__(self, data=b"", num_workers=1):
        self.data = bytes(data)
        self.num_workers = int(num_workers)

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (type(self),), self.__getstate__())

    def __getstate__(self):
        return (self.data, self.num_workers)

    def __setstate__(self, state):
        data, num_workers = state
        self.data = data
        self.num_workers = num_workers

    def __eq__(self, other):
        return type(other) is type(self) and self.__getstate__() == other.__getstate__()

    def __repr__(self):
        return f"LockingArray(<{len(self.data)} bytes>, num_workers={self.num_workers})"


LockingArray.__module__ = FAKE_MODULE
LockingArray.__qualname__ = "LockingArray"


def register_fake_modules():
    """Register `metaseq`, `metaseq.data`, `metaseq.data.document_to_sequence` in
    sys.modules (unless a module of that name with a LockingArray is already there)
    and return the LockingArray class pickle will resolve."""
    existing = sys.modules.get(FAKE_MODULE)
    if existing is not None and hasattr(existing, "LockingArray"):
        return existing.LockingArray
    parent = None
    parts = FAKE_MODULE.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        module = sys.modules.get(name)
        if module is None:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so submodule imports resolve
            sys.modules[name] = module
        if parent is not None:
            setattr(parent, parts[depth - 1], module)
        parent = module
    parent.LockingArray = LockingArray
    return LockingArray


def load(path):
    """torch.load on CPU, with the fake metaseq module registered and, on PyTorch
    2.6+, weights_only=False (these files hold Namespace/DictConfig/LockingArray)."""
    register_fake_modules()
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:  # torch < 1.13 has no weights_only
        return torch.load(path, map_location="cpu")


# --------------------------------------------------------------------------------------
# Deep equality


def _tensor_bytes(t):
    t = t.detach()
    if t.is_quantized or t.is_sparse:
        raise AssertionError("quantized/sparse tensors are not supported")
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8)


def _fmt_values(t, limit=6):
    flat = t.detach().reshape(-1)[:limit]
    try:
        return str(flat.float().tolist())
    except Exception:  # complex and the like
        return str(flat.tolist())


class _Compare:
    def __init__(self):
        # (path, tensor) pairs in traversal order, one list per side, for the aliasing check
        self.tensors_a = []
        self.tensors_b = []

    def fail(self, path, message):
        raise AssertionError(f"{path or '<root>'}: {message}")

    def run(self, a, b, path):
        self.visit(a, b, path)
        self.check_aliasing()

    # ------------------------------------------------------------------
    def visit(self, a, b, path):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return self.tensor(a, b, path)
        if OmegaConf is not None and (isinstance(a, (DictConfig, ListConfig))
                                      or isinstance(b, (DictConfig, ListConfig))):
            return self.omegaconf(a, b, path)
        if type(a) is not type(b):
            self.fail(path, f"type differs: {_type_name(a)} vs {_type_name(b)}")
        if isinstance(a, torch.Size):
            if tuple(a) != tuple(b):
                self.fail(path, f"torch.Size differs: {tuple(a)} vs {tuple(b)}")
            return None
        if isinstance(a, dict):
            return self.mapping(a, b, path)
        if isinstance(a, (list, tuple)):
            if len(a) != len(b):
                self.fail(path, f"length differs: {len(a)} vs {len(b)}")
            for i, (x, y) in enumerate(zip(a, b)):
                self.visit(x, y, f"{path}[{i}]")
            return None
        if isinstance(a, float):
            if math.isnan(a) and math.isnan(b):
                return None
            if struct.pack("<d", a) != struct.pack("<d", b):
                self.fail(path, f"value differs: {a!r} vs {b!r}")
            return None
        if a is None or isinstance(a, (bool, int, str, bytes, bytearray, complex)):
            if a != b:
                self.fail(path, f"value differs: {_short(a)} vs {_short(b)}")
            return None
        if isinstance(a, (torch.dtype, torch.device)):
            if a != b:
                self.fail(path, f"value differs: {a} vs {b}")
            return None
        if isinstance(a, argparse.Namespace):
            return self.mapping(vars(a), vars(b), path + "{Namespace}")
        if isinstance(a, (set, frozenset)):
            if a != b:
                self.fail(path, f"set differs: {a!r} vs {b!r}")
            return None
        getstate = getattr(type(a), "__getstate__", None)
        if getstate is not None and getstate is not getattr(object, "__getstate__", None):
            return self.visit(a.__getstate__(), b.__getstate__(),
                              f"{path}{{{type(a).__name__} state}}")
        if hasattr(a, "__dict__"):
            return self.mapping(vars(a), vars(b), f"{path}{{{type(a).__name__}.__dict__}}")
        if a != b:
            self.fail(path, f"value differs: {_short(a)} vs {_short(b)}")
        return None

    def mapping(self, a, b, path):
        keys_a, keys_b = list(a.keys()), list(b.keys())
        if keys_a != keys_b:
            self.fail(path, _key_diff(keys_a, keys_b))
        for k in keys_a:
            self.visit(a[k], b[k], _join(path, k))
        # state_dict()'s OrderedDict carries module versions as object state
        has_a, has_b = hasattr(a, "_metadata"), hasattr(b, "_metadata")
        if has_a != has_b:
            self.fail(path + "._metadata",
                      "_metadata attribute present on " + ("first side only" if has_a
                                                           else "second side only"))
        if has_a:
            self.visit(a._metadata, b._metadata, path + "._metadata")
        extra_a = {k: v for k, v in vars(a).items() if k != "_metadata"} if hasattr(a, "__dict__") else {}
        extra_b = {k: v for k, v in vars(b).items() if k != "_metadata"} if hasattr(b, "__dict__") else {}
        if extra_a or extra_b:
            self.visit(extra_a, extra_b, path + "{attributes}")

    def omegaconf(self, a, b, path):
        if type(a) is not type(b):
            self.fail(path, f"type differs: {_type_name(a)} vs {_type_name(b)}")
        ca = OmegaConf.to_container(a, resolve=False)
        cb = OmegaConf.to_container(b, resolve=False)
        self.visit(ca, cb, path + "{" + type(a).__name__ + "}")

    def tensor(self, a, b, path):
        if type(a) is not type(b):
            self.fail(path, f"type differs: {_type_name(a)} vs {_type_name(b)}")
        if a.dtype != b.dtype:
            self.fail(path, f"dtype differs: {a.dtype} vs {b.dtype}")
        if tuple(a.shape) != tuple(b.shape):
            self.fail(path, f"shape differs: {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.requires_grad != b.requires_grad:
            self.fail(path, f"requires_grad differs: {a.requires_grad} vs {b.requires_grad}")
        ba, bb = _tensor_bytes(a), _tensor_bytes(b)
        if not torch.equal(ba, bb):
            # locate the first differing element for the message
            itemsize = a.element_size()
            diff = (ba != bb).nonzero()
            first = int(diff[0]) // itemsize if len(diff) else -1
            ea = a.detach().reshape(-1)[first:first + 1]
            eb = b.detach().reshape(-1)[first:first + 1]
            self.fail(path, f"values differ (dtype {a.dtype}, shape {tuple(a.shape)}): "
                            f"first at flat index {first}: {_fmt_values(ea)} vs "
                            f"{_fmt_values(eb)}; first values {_fmt_values(a)} vs "
                            f"{_fmt_values(b)}")
        self.tensors_a.append((path, a))
        self.tensors_b.append((path, b))

    def check_aliasing(self):
        """Two paths holding one view (tied weights) must do so on both sides."""
        groups_a = _alias_groups(self.tensors_a)
        groups_b = _alias_groups(self.tensors_b)
        if groups_a == groups_b:
            return
        for group in groups_a:
            if group not in groups_b:
                raise AssertionError(f"{group[0]}: tied to {', '.join(group[1:])} on the "
                                     f"first side but not on the second")
        for group in groups_b:
            if group not in groups_a:
                raise AssertionError(f"{group[0]}: tied to {', '.join(group[1:])} on the "
                                     f"second side but not on the first")


def _alias_groups(tensors):
    by_view = OrderedDict()
    for path, t in tensors:
        if t.numel() == 0:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        by_view.setdefault(key, []).append(path)
    return sorted(tuple(paths) for paths in by_view.values() if len(paths) > 1)


def _type_name(x):
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _short(x, limit=80):
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


def _join(path, key):
    return f"{path}[{key!r}]" if path or not isinstance(key, str) else key


def _key_diff(keys_a, keys_b):
    set_a, set_b = set(keys_a), set(keys_b)
    only_a = [k for k in keys_a if k not in set_b]
    only_b = [k for k in keys_b if k not in set_a]
    if only_a or only_b:
        return (f"keys differ: only in first {_short(only_a, 300)}, "
                f"only in second {_short(only_b, 300)}")
    for i, (x, y) in enumerate(zip(keys_a, keys_b)):
        if x != y:
            return f"key order differs at position {i}: {x!r} vs {y!r}"
    return "keys differ"


def assert_same(a, b, path=""):
    """Deep equality as described in the module docstring; raises AssertionError
    naming the first differing path."""
    _Compare().run(a, b, path)


# --------------------------------------------------------------------------------------
# Zip checks


def zip_problems(path, aligned=False):
    """Return a list of problems found in the zip file at `path` (empty if fine)."""
    problems = []
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
        if bad is not None:
            problems.append(f"{path}: {bad}: CRC-32 or header check failed")
        if aligned:
            with open(path, "rb") as f:
                for info in zf.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        problems.append(f"{path}: {info.filename}: not STORED "
                                        f"(method {info.compress_type})")
                    start = _data_start(f, info)
                    if start % 64:
                        problems.append(f"{path}: {info.filename}: data at {start}, "
                                        f"not a multiple of 64")
    return problems


def _data_start(f, info):
    """File offset of an entry's data, read from its local file header."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise AssertionError(f"{info.filename}: no local file header at "
                             f"{info.header_offset:#x}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


# --------------------------------------------------------------------------------------
# Manifest offsets

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    "complex64": torch.complex64, "complex128": torch.complex128,
}


def _resolve(obj, tensor_path):
    """Follow a manifest tensor path ("model/decoder.layers.0.flat_param_0",
    "last_optimizer_state/state/0/exp_avg") into a loaded checkpoint. A segment
    matches a string key first, then an int key / list index."""
    node = obj
    for seg in tensor_path.split("/"):
        if isinstance(node, argparse.Namespace):
            node = vars(node)
        if isinstance(node, dict):
            if seg in node:
                node = node[seg]
                continue
            try:
                if int(seg) in node:
                    node = node[int(seg)]
                    continue
            except ValueError:
                pass
            raise KeyError(seg)
        if isinstance(node, (list, tuple)):
            node = node[int(seg)]
            continue
        raise KeyError(seg)
    return node


def manifest_files(manifest):
    """The files of a version 4 manifest, each with its shared parts resolved:
    "tensors" as a list of tensor dicts, each with this file's file_byte_offset,
    record_crc32 and record_name, and "fsdp" and "objects" as values (what the
    manifest stores once and refers to by number)."""
    files = []
    for entry in manifest["files"]:
        entry = dict(entry)
        tensors = []
        for i, t in enumerate(manifest["tensor_lists"][entry["tensors"]]):
            t = dict(t)
            t["file_byte_offset"] = entry["file_byte_offsets"][i]
            t["record_crc32"] = entry["record_crc32s"][i]
            t["record_name"] = f"{entry['archive_name']}/data/{t['storage_key']}"
            tensors.append(t)
        entry["tensors"] = tensors
        entry["fsdp"] = None if entry["fsdp"] is None else manifest["fsdp"][entry["fsdp"]]
        entry["objects"] = manifest["object_trees"][entry["objects"]]
        files.append(entry)
    return files


def manifest_problems(manifest_path, resolve=True):
    """Check a ckpt-tool manifest against the files it describes. Returns a list of
    problems (empty if fine) and the number of tensors checked."""
    with open(manifest_path) as f:
        manifest = json.load(f)
    problems = []
    if manifest.get("format") != "ckpt-tool-manifest":
        problems.append(f"{manifest_path}: format is {manifest.get('format')!r}, "
                        f"expected 'ckpt-tool-manifest'")
    if manifest.get("version") != 4:
        problems.append(f"{manifest_path}: version is {manifest.get('version')!r}, expected 4")
        return problems, 0
    base = os.path.dirname(os.path.abspath(manifest_path))
    checked = 0
    for entry in manifest_files(manifest):
        rel = entry["path"]
        path = rel if os.path.isabs(rel) else os.path.join(base, rel)
        where = rel
        if not os.path.exists(path):
            problems.append(f"{where}: file not found ({path})")
            continue
        size = os.path.getsize(path)
        if "size_bytes" in entry and entry["size_bytes"] != size:
            problems.append(f"{where}: size_bytes {entry['size_bytes']} but the file has {size}")
        loaded = None
        if resolve:
            try:
                loaded = load(path)
            except Exception as e:  # report, keep checking offsets
                problems.append(f"{where}: torch.load failed: {e}")
        archive = entry.get("archive_name")
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            infos = {i.filename: i for i in zf.infolist()}
            if archive is not None:
                prefixes = {name.split("/", 1)[0] for name in infos}
                if prefixes != {archive}:
                    problems.append(f"{where}: archive_name {archive!r} but entries "
                                    f"live under {sorted(prefixes)}")
            for t in entry["tensors"]:
                checked += 1
                tp = f"{where}: {t.get('path')}"
                record = t["record_name"]
                info = infos.get(record)
                if info is None:
                    problems.append(f"{tp}: record {record!r} not in the zip")
                    continue
                dtype = _DTYPES.get(t["dtype"])
                if dtype is None:
                    problems.append(f"{tp}: unknown dtype {t['dtype']!r}")
                    continue
                itemsize = torch.empty((), dtype=dtype).element_size()
                data_start = _data_start(raw, info)
                want = data_start + t["storage_offset"] * itemsize
                if t["file_byte_offset"] != want:
                    problems.append(f"{tp}: file_byte_offset {t['file_byte_offset']} but "
                                    f"zip data starts at {data_start} + storage_offset "
                                    f"{t['storage_offset']} * {itemsize} = {want}")
                if t["record_crc32"] != info.CRC:
                    problems.append(f"{tp}: record_crc32 {t['record_crc32']} but zipfile "
                                    f"says {info.CRC}")
                shape, stride = t["shape"], t["stride"]
                numel = math.prod(shape)
                span = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
                allowed = (numel * itemsize, span * itemsize, info.file_size)
                if "nbytes" in t and t["nbytes"] not in allowed:
                    problems.append(f"{tp}: nbytes {t['nbytes']} is none of numel*itemsize "
                                    f"{allowed[0]}, the strided span {allowed[1]} or the "
                                    f"record size {allowed[2]}")
                end = want + span * itemsize
                if end > data_start + info.file_size:
                    problems.append(f"{tp}: tensor bytes end at {end}, past the record's "
                                    f"end {data_start + info.file_size}")
                if loaded is None:
                    continue
                try:
                    obj = _resolve(loaded, t["path"])
                except (KeyError, IndexError, ValueError) as e:
                    problems.append(f"{tp}: path does not resolve in torch.load's result "
                                    f"(segment {e})")
                    continue
                if not isinstance(obj, torch.Tensor):
                    problems.append(f"{tp}: torch.load gives a {_type_name(obj)}, not a tensor")
                    continue
                if obj.dtype != dtype or list(obj.shape) != list(shape) or \
                        list(obj.stride()) != list(stride) or \
                        obj.storage_offset() != t["storage_offset"]:
                    problems.append(f"{tp}: torch.load gives dtype {obj.dtype} shape "
                                    f"{list(obj.shape)} stride {list(obj.stride())} offset "
                                    f"{obj.storage_offset()}, manifest says {t['dtype']} "
                                    f"{shape} {stride} {t['storage_offset']}")
                    continue
                # the bytes at file_byte_offset are the tensor's storage bytes
                raw.seek(want)
                got = raw.read(span * itemsize)
                storage = obj.detach()
                expect = torch.as_strided(storage, (span,), (1,), obj.storage_offset()) \
                    if span else storage.reshape(-1)[:0]
                expect_bytes = bytes(_tensor_bytes(expect).numpy().tobytes())
                if got != expect_bytes:
                    problems.append(f"{tp}: bytes at file_byte_offset differ from the "
                                    f"tensor torch.load returns")
    return problems, checked


# --------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ckptcheck.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_same = sub.add_parser("same", help="A.pt and B.pt load to the same objects")
    p_same.add_argument("a")
    p_same.add_argument("b")
    p_zip = sub.add_parser("testzip", help="zipfile.testzip() finds no bad entry")
    p_zip.add_argument("files", nargs="+")
    p_zip.add_argument("--aligned", action="store_true",
                       help="also require STORED entries with 64-byte aligned data")
    p_off = sub.add_parser("offsets", help="manifest offsets and CRCs agree with zipfile")
    p_off.add_argument("manifest")
    p_off.add_argument("--no-load", action="store_true",
                       help="skip the torch.load cross-check of paths, shapes and bytes")
    args = parser.parse_args(argv)

    if args.command == "same":
        try:
            a, b = load(args.a), load(args.b)
        except Exception as e:  # unreadable input: a failed check, not a crash
            print(f"ckptcheck: cannot load: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        try:
            assert_same(a, b)
        except AssertionError as e:
            print(f"ckptcheck: {args.a} and {args.b} differ: {e}", file=sys.stderr)
            return 1
        print(f"ckptcheck: {args.a} and {args.b} are the same")
        return 0
    if args.command == "testzip":
        problems = []
        for p in args.files:
            try:
                problems += zip_problems(p, aligned=args.aligned)
            except (zipfile.BadZipFile, OSError, AssertionError) as e:
                problems.append(f"{p}: {e}")
        for msg in problems:
            print(f"ckptcheck: {msg}", file=sys.stderr)
        if problems:
            return 1
        print(f"ckptcheck: {len(args.files)} file(s) pass testzip")
        return 0
    if args.command == "offsets":
        try:
            problems, checked = manifest_problems(args.manifest, resolve=not args.no_load)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, AssertionError) as e:
            problems, checked = [f"{args.manifest}: {type(e).__name__}: {e}"], 0
        for msg in problems:
            print(f"ckptcheck: {msg}", file=sys.stderr)
        if problems:
            return 1
        print(f"ckptcheck: {checked} tensor(s) in {args.manifest} match")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
