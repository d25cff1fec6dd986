#!/usr/bin/python3
"""Seed corpora for the fuzz targets, from fixture checkpoints and a few made here.

    /usr/bin/python3 tests/fuzz/make_seeds.py --out build-fuzz/seeds [--ckpt-tool build/ckpt-tool] DIR...

Every *.pt under the DIRs becomes a seed of fuzz_zip and fuzz_checkpoint, and its
data.pkl member (read with zipfile) a seed of fuzz_pickle. With --ckpt-tool, the
manifest of each folder holding *.pt files (`ckpt-tool manifest`, as .json and as
.json.zst) becomes a seed of fuzz_manifest, and so do a few small manifests
written here (no files, no roles, a tied tensor, FSDP metadata). Torch writes only part of
what the readers accept, so small pickles of every protocol (sets, bytearrays, big
ints, recursive containers, NEWOBJ_EX, ...) and zips that Python's zipfile writes
(ZIP64 extras, a comment, data descriptors) are added. Nothing here unpickles
anything. Output is deterministic (no set of strings, no timestamps); seeds are
named by content hash.
"""

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import subprocess
import tempfile
import sys
import zipfile
from argparse import Namespace


class WithKwargs:
    """An instance pickled with NEWOBJ_EX (protocol 4+)."""

    def __init__(self, a, *, b=2):
        self.a, self.b = a, b

    def __getnewargs_ex__(self):
        return (self.a,), {"b": self.b}


class Reduced:
    """An instance pickled with REDUCE and a BUILD state of (dict, slots)."""

    def __init__(self, x):
        self.x = x

    def __reduce__(self):
        return (Reduced, (self.x,), ({"x": self.x}, {"slot": 1}))


def sample_objects():
    recursive_list = []
    recursive_list.append(recursive_list)
    recursive_dict = {}
    recursive_dict["self"] = recursive_dict
    tuple_through_list = []
    tuple_through_list.append((tuple_through_list, 1))
    shared = [1, 2]
    return [
        None, True, False, 0, 255, 65535, -1, 2**31, -(2**31) - 1, 2**63 - 1, 2**64, -(2**100), 2**2100,
        1.5, float("nan"), float("inf"), "", "x" * 300, "\u00e9\u4e2d", b"", b"\x00\xff" * 200,
        bytearray(b"abc"), (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), [], list(range(1500)),
        {i: str(i) for i in range(1100)}, {1, 2, 3}, frozenset({4, 5}), set(),
        recursive_list, recursive_dict, tuple_through_list, [shared, shared],
        collections.OrderedDict([("a", 1), ("b", [2, 3])]),
        Namespace(lr=0.1, model_parallel_size=2, arch="x"),
        {"cfg": {"model": {"model_parallel_size": 2}}, "model": collections.OrderedDict(w=[1.0])},
        WithKwargs(1, b=3), Reduced([1, 2]),
    ]


def sample_pickles():
    for obj in sample_objects():
        for protocol in (2, 3, 4, 5):
            try:
                yield pickle.dumps(obj, protocol=protocol)
            except (pickle.PicklingError, TypeError, ValueError):
                pass  # e.g. bytearray has no protocol-2 form without a global


def sample_zips():
    def build(members, comment=b"", force_zip64=False):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            archive.comment = comment
            for name, data in members:
                with archive.open(zipfile.ZipInfo(name), "w", force_zip64=force_zip64) as out:
                    out.write(data)
        return buffer.getvalue()

    data_pkl = pickle.dumps({"a": 1}, protocol=2)
    members = [("archive/data.pkl", data_pkl), ("archive/byteorder", b"little"), ("archive/version", b"3\n")]
    yield build([])
    yield build(members)
    yield build(members, comment=b"a comment")
    yield build(members, force_zip64=True)
    # Written to a stream that cannot seek, zipfile adds a data descriptor to each record.
    unseekable = io.BytesIO()

    class NoSeek(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            return unseekable.write(b)

    with zipfile.ZipFile(NoSeek(), "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data)
    yield unseekable.getvalue()


def fixture_manifests(ckpt_tool, dirs):
    """The manifest of every folder holding *.pt files, as .json and .json.zst."""
    folders = []
    for root in dirs:
        for folder, _, names in sorted(os.walk(root)):
            if any(name.endswith(".pt") for name in names):
                folders.append(folder)
    with tempfile.TemporaryDirectory() as scratch:
        for i, folder in enumerate(folders):
            inputs = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".pt"))
            for suffix in (".json", ".json.zst"):
                out = os.path.join(scratch, f"{i}{suffix}")
                subprocess.run([ckpt_tool, "manifest", *inputs, "-o", out], check=True)
                with open(out, "rb") as f:
                    yield f.read(), suffix


def small_manifests():
    """Hand-written manifests (version 3) for the corners fixtures do not reach."""
    def manifest(files, lists, fsdp=(), trees=({},)):
        return {"format": "ckpt-tool-manifest", "version": 3, "created_by": "make_seeds.py",
                "grid": {"mp": 0, "dp": 0, "cells": [], "problems": []}, "tensor_lists": lists,
                "fsdp": list(fsdp), "object_trees": list(trees), "files": files}

    def tensor(path, shape, **extra):
        numel = 1
        for d in shape:
            numel *= d
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * shape[i + 1]
        out = {"path": path, "dtype": "float32", "shape": shape, "stride": stride, "storage_key": "0",
               "storage_offset": 0, "nbytes": 4 * numel, "requires_grad": False}
        out.update(extra)
        return out

    def file(path, tensors, offsets, fsdp=None, objects=0):
        return {"path": path, "size_bytes": 4096, "mtime_ns": 0, "archive_name": "archive",
                "mp_part": None, "dp_shard": None, "pickle_protocol": 2, "top_level_keys": ["model"],
                "model_parallel_size": None, "tensors": tensors, "file_byte_offsets": offsets,
                "record_crc32s": [0] * len(offsets), "fsdp": fsdp, "objects": objects}

    yield manifest([], [])
    tied = [tensor("model/a", [2, 3]), tensor("model/b", [2, 3], alias_of="model/a")]
    yield manifest([file("/ckpt/model.pt", 0, [64, 64])], [tied],
                   trees=[{"model": {"a": {"$tensor": 0}, "b": {"$tensor": 0}}}])
    flat = {"state_key": "flat_param_0", "name": "flat_param_0", "names": ["w", "b"], "shapes": [[2, 2], [2]],
            "numels": [4, 2], "padding": 0}
    fsdp = {"param_metadata": [{"fsdp_path": "", "flat_params": [flat], "no_broadcast_optim_state": False,
                                "shared_param_info": []}], "buffer_names": []}
    shards = []
    for d in range(2):
        f = file(f"/ckpt/checkpoint_last-model_part-0-shard{d}.pt", 0, [64], fsdp=0)
        f["mp_part"], f["dp_shard"] = 0, d
        shards.append(f)
    yield manifest(shards, [[tensor("model/flat_param_0", [3])]], fsdp=[fsdp])


def sample_safetensors():
    """Small safetensors files written here from the specification: every dtype,
    empty and 0-d tensors, metadata, and a sharded set's index."""
    def encode(entries, metadata=None):
        header, data = {}, b""
        if metadata is not None:
            header["__metadata__"] = metadata
        for name, dtype, shape, payload in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
            data += payload
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((8 - (8 + len(text)) % 8) % 8)
        return len(text).to_bytes(8, "little") + text + data
    yield encode([("a", "F32", [2], bytes(8)), ("b.weight", "F16", [1, 3], bytes(6))], {"format": "pt"})
    yield encode([("x", "F64", [], bytes(8)), ("e", "I64", [0, 2], b""), ("m", "BOOL", [2], b"\x01\x00")])
    yield encode([(f"t{i}", d, [1], bytes(n)) for i, (d, n) in
                  enumerate([("I64", 8), ("I32", 4), ("BF16", 2), ("I16", 2), ("I8", 1), ("U8", 1)])])
    yield encode([])


def write_seed(folder, data, suffix):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, hashlib.sha1(data).hexdigest()[:16] + suffix)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
        return 1
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="seed folder: one subfolder per fuzz target")
    parser.add_argument("--ckpt-tool", help="the built ckpt-tool: writes the manifests of fuzz_manifest's seeds")
    parser.add_argument("dirs", nargs="+", help="folders searched for *.pt files")
    args = parser.parse_args()

    counts = collections.Counter()
    for root in args.dirs:
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                if not name.endswith(".pt"):
                    continue
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                counts["fuzz_zip"] += write_seed(os.path.join(args.out, "fuzz_zip"), data, ".pt")
                counts["fuzz_checkpoint"] += write_seed(os.path.join(args.out, "fuzz_checkpoint"), data, ".pt")
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    for member in archive.namelist():
                        if member.endswith("/data.pkl"):
                            counts["fuzz_pickle"] += write_seed(os.path.join(args.out, "fuzz_pickle"),
                                                                archive.read(member), ".pkl")
    for data in sample_pickles():
        counts["fuzz_pickle"] += write_seed(os.path.join(args.out, "fuzz_pickle"), data, ".pkl")
    for data in sample_zips():
        counts["fuzz_zip"] += write_seed(os.path.join(args.out, "fuzz_zip"), data, ".zip")
        counts["fuzz_checkpoint"] += write_seed(os.path.join(args.out, "fuzz_checkpoint"), data, ".zip")
    for data in sample_safetensors():
        counts["fuzz_safetensors"] += write_seed(os.path.join(args.out, "fuzz_safetensors"), data, ".safetensors")
    targets = ["fuzz_zip", "fuzz_pickle", "fuzz_checkpoint", "fuzz_safetensors"]
    if args.ckpt_tool:
        targets.append("fuzz_manifest")
        folder = os.path.join(args.out, "fuzz_manifest")
        for data, suffix in fixture_manifests(args.ckpt_tool, args.dirs):
            counts["fuzz_manifest"] += write_seed(folder, data, suffix)
        for data in small_manifests():
            counts["fuzz_manifest"] += write_seed(folder, json.dumps(data, indent=1).encode(), ".json")
    for target in targets:
        folder = os.path.join(args.out, target)
        total = len(os.listdir(folder)) if os.path.isdir(folder) else 0
        print(f"{target}: {total} seeds ({counts[target]} new) in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
