#!/usr/bin/python3
"""Test data for PyTorch Distributed Checkpoint (DCP) directories, written by torch's REAL writer.

Needs a Python with torch (here /usr/bin/python3, torch 1.13 on Python 3.11).

    /usr/bin/python3 tests/e2e/dcp_sets.py --out DIR [--only NAME] [--seed N]
    /usr/bin/python3 tests/e2e/dcp_sets.py --check DIR [--only NAME]
    /usr/bin/python3 tests/e2e/dcp_sets.py --describe DIR [--only NAME]   (JSON on stdout)

As a module:

    write_set(out_dir, name, **options)     -> path of the DCP directory written
    expected_state_dict(name, **options)    -> flat key -> full tensor / object the generator started from
    reference_state_dict(dcp_dir)           -> flat key -> what torch's own reader consolidates
    nested_state_dict(flat, planner_data)   -> nesting as torch 2.x dcp_to_torch_save does
    read_metadata(dcp_dir)                  -> the `.metadata` object (1.13 or 2.x class paths)

Every real set is written by spawning 2-4 ranks (subprocesses, gloo on 127.0.0.1, a free port),
building ShardedTensors on every rank (sharded_tensor.empty + copy of each local shard out of a
deterministic full tensor) and calling
torch.distributed._shard.checkpoint.save_state_dict(sd, FileSystemWriter(dir, single_file_per_rank=...)).
The "v2_*" sets are copies of "mixed" whose `.metadata` is re-pickled under torch 2.x class paths.
See README-dcp.md next to this file.
"""

import argparse
import copy
import dataclasses
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import types
import uuid
import zlib
from pathlib import Path


# --------------------------------------------------------------------------------------------
# torch 1.13 on Python 3.11: sharded_tensor/metadata.py declares a dataclass field whose default
# is a (unhashable) TensorProperties instance, which 3.11's dataclasses rejects.  Retry such a
# field with a default_factory returning the same default object.
# --------------------------------------------------------------------------------------------
def _patch_dataclasses():
    if getattr(dataclasses, "_dcp_sets_patched", False):
        return
    orig = dataclasses._get_field

    def _get_field(cls, a_name, a_type, *rest):
        try:
            return orig(cls, a_name, a_type, *rest)
        except ValueError as e:
            if "mutable default" not in str(e):
                raise
            default = cls.__dict__.get(a_name, dataclasses.MISSING)
            if isinstance(default, dataclasses.Field):
                default = default.default
            setattr(cls, a_name, dataclasses.field(default_factory=lambda d=default: d))
            return orig(cls, a_name, a_type, *rest)

    dataclasses._get_field = _get_field
    dataclasses._dcp_sets_patched = True


_patch_dataclasses()

try:
    import torch  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit("dcp_sets.py needs torch: run it with /usr/bin/python3")
import torch.distributed as dist  # noqa: E402
from torch.distributed._shard import sharded_tensor  # noqa: E402
from torch.distributed._shard.metadata import ShardMetadata  # noqa: E402
from torch.distributed._shard.sharding_spec import (  # noqa: E402
    ChunkShardingSpec,
    EnumerableShardingSpec,
)
from torch.distributed._shard.sharded_tensor.metadata import (  # noqa: E402
    MEM_FORMAT_ENCODING,
    TensorProperties,
)
from torch.distributed._shard.checkpoint import (  # noqa: E402
    BytesStorageMetadata,
    ChunkStorageMetadata,
    FileSystemReader,
    FileSystemWriter,
    Metadata,
    TensorStorageMetadata,
    load_state_dict,
    save_state_dict,
)
from torch.distributed._shard.checkpoint.metadata import MetadataIndex  # noqa: E402
from torch.distributed._shard.checkpoint.filesystem import _StorageInfo  # noqa: E402

DEFAULT_SEED = 1234

# --------------------------------------------------------------------------------------------
# Set definitions
# --------------------------------------------------------------------------------------------
# An item is a dict:
#   {"key", "kind": "chunk",  "shape", "dtype", "dim", "placements": [ranks]}   ChunkShardingSpec
#   {"key", "kind": "boxes",  "shape", "dtype", "boxes": [(rank, offsets, sizes)]}  EnumerableShardingSpec
#   {"key", "kind": "plain",  "shape", "dtype", "view": None|"t"|"rows"|"cols"}  a torch.Tensor
#   {"key", "kind": "object", "value": python object}                          a bytes item
# "path": the 2.x planner_data path of the key (defaults to the dotted key split on ".").


def _chunk(key, shape, dtype, dim, placements, path=None):
    return {"key": key, "kind": "chunk", "shape": list(shape), "dtype": dtype, "dim": dim,
            "placements": list(placements), "path": path}


def _boxes(key, shape, dtype, boxes, path=None):
    return {"key": key, "kind": "boxes", "shape": list(shape), "dtype": dtype,
            "boxes": [(r, list(o), list(s)) for r, o, s in boxes], "path": path}


def _plain(key, shape, dtype, view=None, path=None):
    return {"key": key, "kind": "plain", "shape": list(shape), "dtype": dtype, "view": view,
            "path": path}


def _object(key, value, path=None):
    return {"key": key, "kind": "object", "value": value, "path": path}


def _set_rank_files_dim0(world):
    r = list(range(world))
    return [
        # 10 rows in 4 chunks over 2 ranks (placements 0,1,0,1): 3,3,3,1; two items per rank.
        _chunk("w_f32_10x4", (10, 4), "float32", 0, [0, 1, 0, 1]),
        # 3 rows in 4 chunks: split 1,1,1,0 -> ChunkShardingSpec drops the empty 4th chunk (no box).
        _chunk("w_f32_3x5_over4", (3, 5), "float32", 0, [0, 1, 0, 1]),
        # an explicitly EMPTY box (0 rows) on rank 1 via EnumerableShardingSpec.
        _boxes("w_f32_empty_box", (3, 4), "float32", [(0, (0, 0), (3, 4)), (1, (3, 0), (0, 4))]),
        _chunk("w_bf16_7x6", (7, 6), "bfloat16", 0, r),        # 4,3
        _chunk("w_f16_9x2", (9, 2), "float16", 0, r),          # 5,4
        _chunk("v_i64_11", (11,), "int64", 0, r),              # 6,5 (1-D)
        _chunk("w_f32_5x3x2", (5, 3, 2), "float32", 0, r),     # 3,2 (3-D)
    ]


def _set_item_files_dim1(world):
    r = list(range(world))
    return [
        _chunk("a_f32_4x10", (4, 10), "float32", 1, r),                 # 4,4,2
        _chunk("b_bf16_3x7", (3, 7), "bfloat16", 1, r),                # 3,3,1
        _chunk("c_i64_2x5", (2, 5), "int64", 1, r),                    # 2,2,1
        _chunk("d_f16_2x5x3", (2, 5, 3), "float16", 1, r),             # 2,2,1 on the middle dim
        _chunk("e_f32_3x2", (3, 2), "float32", 1, r),                  # 1,1,- (rank 2: no box)
        _chunk("f_f32_2x8_rev", (2, 8), "float32", 1, list(reversed(r))),  # rank 2 holds cols 0..2
        _plain("g_plain_f32_3x3", (3, 3), "float32"),
        _object("h_note", "item files: one .distcp per write item"),
    ]


def _set_mixed(world):
    r = list(range(world))
    return [
        _chunk("model.embed.weight", (10, 6), "float32", 0, r),                 # 3,3,3,1
        _chunk("model.layers.0.attn.weight", (5, 7), "bfloat16", 1, r,
               path=("model", "layers", 0, "attn", "weight")),                 # 2,2,2,1 cols
        _chunk("model.layers.1.attn.weight", (6, 5), "float16", 0, list(reversed(r)),
               path=("model", "layers", 1, "attn", "weight")),                 # rank 3 holds rows 0..1
        _chunk("model.buckets", (9,), "uint8", 0, r),
        _chunk("model.ids", (3, 9), "int32", 1, r),
        _chunk("model.fp64", (4, 4), "float64", 0, r),                          # 1,1,1,1
        _plain("model.norm.weight", (6,), "float32"),
        _plain("model.mask", (2, 3), "bool"),
        _plain("model.step_scale", (), "float32"),                             # 0-dim
        _plain("model.proj_t", (4, 6), "float32", view="t"),    # transposed view, not cloned
        _plain("model.rows_view", (3, 5), "bfloat16", view="rows"),  # row slice of a bigger tensor
        _plain("model.cols_view", (4, 2), "int64", view="cols"),     # column slice (non-contiguous)
        _chunk("optim.state.0.exp_avg", (10, 6), "float32", 0, r),
        _chunk("optim.state.0.exp_avg_sq", (10, 6), "float32", 0, r),
        _plain("optim.state.0.step", (), "float32"),
        _object("optim.param_groups.0.lr", 0.001, path=("optim", "param_groups", 0, "lr")),
        _object("optim.param_groups.0.params", [0, 1, 2],
                path=("optim", "param_groups", 0, "params")),
        _object("train.step", 1200),
        _object("train.run_name", "dcp-mixed"),
        _object("train.config", {"hidden": 6, "layers": 2, "betas": (0.9, 0.999),
                                 "act": "gelu", "nested": {"a": [1, 2.5, None]}}),
        _object("train.milestones", [100, 200, 300]),
        # a dict holding a tensor: 1.13 does not flatten nested containers, so this whole dict is
        # ONE bytes item (a torch.save archive that itself holds a tensor record).
        _object("extra_state", {"scale": "tensor", "count": 3}),
    ]


def _set_blocks_2d(world):
    assert world == 4
    return [
        # regular 2x2 grid
        _boxes("grid_f32_6x8", (6, 8), "float32", [
            (0, (0, 0), (3, 4)), (1, (0, 4), (3, 4)), (2, (3, 0), (3, 4)), (3, (3, 4), (3, 4))]),
        # uneven 2x2 grid
        _boxes("grid_bf16_5x7", (5, 7), "bfloat16", [
            (0, (0, 0), (3, 4)), (1, (0, 4), (3, 3)), (2, (3, 0), (2, 4)), (3, (3, 4), (2, 3))]),
        # not a grid: a full-width top band, two bottom blocks, rank 3 holds two boxes, rank 0 one
        _boxes("tiles_i64_5x6", (5, 6), "int64", [
            (0, (0, 0), (2, 6)), (1, (2, 0), (3, 2)), (3, (2, 2), (3, 3)), (3, (2, 5), (3, 1))]),
        # 3-D blocks split on dims 0 and 2
        _boxes("cube_f16_4x3x6", (4, 3, 6), "float16", [
            (0, (0, 0, 0), (2, 3, 3)), (1, (0, 0, 3), (2, 3, 3)),
            (2, (2, 0, 0), (2, 3, 3)), (3, (2, 0, 3), (2, 3, 3))]),
        _plain("bias", (8,), "float32"),
    ]


# name -> (world, single_file_per_rank, item builder)
REAL_SETS = {
    "rank_files_dim0": (2, True, _set_rank_files_dim0),
    "item_files_dim1": (3, False, _set_item_files_dim1),
    "mixed": (4, True, _set_mixed),
    "blocks_2d": (4, True, _set_blocks_2d),
}

# name -> (source set, options of the 2.x re-pickling)
V2_SETS = {
    # torch >= 2.6 style: planner_data, storage_data, storage_meta, version="1.0.0";
    # enum member pickled by value, _MEM_FORMAT_ENCODING(0), as Python <= 3.10 and >= 3.12 do
    "v2_metadata": ("mixed", {"fields": "2.6", "tp_strides": False, "enum_by_name": False}),
    # torch 2.0 .. 2.3 style: planner_data, storage_data only; enum member pickled by name,
    # getattr(_MEM_FORMAT_ENCODING, 'TORCH_CONTIGUOUS_FORMAT'), as Python 3.11 does
    "v2_0_metadata": ("mixed", {"fields": "2.0", "tp_strides": False, "enum_by_name": True}),
    # TensorProperties state as a 6-tuple (..., strides); seen in a fork's metadata.py only
    "v2_metadata_strides": ("mixed", {"fields": "2.6", "tp_strides": True, "enum_by_name": False}),
}

SET_NAMES = list(REAL_SETS) + list(V2_SETS)


def set_items(name):
    if name in V2_SETS:
        name = V2_SETS[name][0]
    world, _single, build = REAL_SETS[name]
    return build(world)


# --------------------------------------------------------------------------------------------
# Deterministic values
# --------------------------------------------------------------------------------------------
def _dtype(name):
    return getattr(torch, name)


def _gen(key, shape, dtype_name, seed):
    """Deterministic full tensor for key (contiguous)."""
    g = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(key.encode())) & 0x7FFFFFFF)
    shape = tuple(shape)
    if dtype_name in ("float32", "float64", "float16", "bfloat16"):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        return t.to(_dtype(dtype_name))
    if dtype_name == "bool":
        return torch.randint(0, 2, shape, generator=g, dtype=torch.int64).to(torch.bool)
    if dtype_name == "uint8":
        return torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    if dtype_name == "int32":
        return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    if dtype_name == "int64":
        return torch.randint(-2**62, 2**62, shape, generator=g, dtype=torch.int64)
    raise ValueError(dtype_name)


def _plain_value(item, seed):
    shape, dt, view = item["shape"], item["dtype"], item.get("view")
    if view is None:
        return _gen(item["key"], shape, dt, seed)
    if view == "t":      # transpose of a contiguous (cols, rows) tensor: storage numel == numel
        return _gen(item["key"], (shape[1], shape[0]), dt, seed).t()
    if view == "rows":   # rows 2.. of a bigger tensor: storage larger than the view
        return _gen(item["key"], (shape[0] + 3, shape[1]), dt, seed)[2:2 + shape[0]]
    if view == "cols":   # columns 1.. of a wider tensor
        return _gen(item["key"], (shape[0], shape[1] + 3), dt, seed)[:, 1:1 + shape[1]]
    raise ValueError(view)


def _object_value(item, seed):
    v = item["value"]
    if item["key"] == "extra_state":
        v = dict(v)
        v["scale"] = _gen("extra_state.scale", (3,), "float32", seed)
    return copy.deepcopy(v)


def expected_state_dict(name, seed=DEFAULT_SEED, **_options):
    """Flat key -> the full value the generator started from (tensors may be views)."""
    out = {}
    for it in set_items(name):
        if it["kind"] in ("chunk", "boxes"):
            out[it["key"]] = _gen(it["key"], it["shape"], it["dtype"], seed)
        elif it["kind"] == "plain":
            out[it["key"]] = _plain_value(it, seed)
        else:
            out[it["key"]] = _object_value(it, seed)
    return out


def planner_data_for(name):
    """Flat key -> path tuple (str elements: dict keys, int elements: list indices)."""
    pd = {}
    for it in set_items(name):
        path = it.get("path") or tuple(it["key"].split("."))
        assert ".".join(str(p) for p in path) == it["key"], it["key"]
        pd[it["key"]] = tuple(path)
    return pd


# --------------------------------------------------------------------------------------------
# Writing (one subprocess per rank)
# --------------------------------------------------------------------------------------------
def _sharding_spec(item):
    if item["kind"] == "chunk":
        return ChunkShardingSpec(dim=item["dim"],
                                 placements=[f"rank:{r}/cpu" for r in item["placements"]])
    return EnumerableShardingSpec([
        ShardMetadata(shard_offsets=list(o), shard_sizes=list(s), placement=f"rank:{r}/cpu")
        for r, o, s in item["boxes"]])


def _rank_state_dict(name, seed):
    sd = {}
    full = expected_state_dict(name, seed=seed)
    for it in set_items(name):
        key = it["key"]
        if it["kind"] in ("chunk", "boxes"):
            st = sharded_tensor.empty(_sharding_spec(it), *it["shape"], dtype=_dtype(it["dtype"]))
            for shard in st.local_shards():
                src = full[key]
                for d, (o, s) in enumerate(zip(shard.metadata.shard_offsets,
                                               shard.metadata.shard_sizes)):
                    src = src.narrow(d, o, s)
                shard.tensor.copy_(src)
            sd[key] = st
        else:
            sd[key] = full[key]
    return sd


def _worker(name, set_dir, rank, world, port, seed, single_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        sd = _rank_state_dict(name, seed)
        save_state_dict(sd, FileSystemWriter(set_dir, single_file_per_rank=single_file))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(name, set_dir, world, seed, single_file, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1")
    last_err = None
    for _attempt in range(3):           # a port taken between probe and bind: retry
        port = _free_port()
        procs = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_worker", name, str(set_dir),
             str(r), str(world), str(port), str(seed), "1" if single_file else "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
        deadline = time.time() + timeout
        outs, failed = [], False
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
                out, _ = p.communicate()
                failed = True
            outs.append(out.decode(errors="replace"))
            failed |= p.returncode != 0
        if not failed:
            return
        last_err = "\n".join(f"--- rank {r} ---\n{o}" for r, o in enumerate(outs))
        if "Address already in use" not in last_err:
            break
        shutil.rmtree(set_dir, ignore_errors=True)
    raise RuntimeError(f"writing set {name} failed:\n{last_err}")


def write_set(out_dir, name, seed=DEFAULT_SEED, **options):
    """Write the named set under out_dir (replacing out_dir/name). Returns the set directory.

    options: single_file_per_rank (override the set's default), timeout (seconds, default 120).
    The rank count is fixed per set (REAL_SETS)."""
    out_dir = Path(out_dir)
    set_dir = out_dir / name
    if set_dir.exists():
        shutil.rmtree(set_dir)
    if name in V2_SETS:
        src_name, v2opts = V2_SETS[name]
        src_dir = out_dir / src_name
        if not (src_dir / ".metadata").exists():
            write_set(out_dir, src_name, seed=seed, **options)
        shutil.copytree(src_dir, set_dir)
        md = read_metadata(src_dir)
        data = repickle_v2(md, planner_data_for(name), set_name=name, seed=seed, **v2opts)
        tmp = set_dir / ".metadata.tmp"
        tmp.write_bytes(data)
        tmp.rename(set_dir / ".metadata")
        return set_dir
    world, single_file, _build = REAL_SETS[name]
    single_file = options.get("single_file_per_rank", single_file)
    _spawn(name, set_dir, world, seed, single_file, timeout=options.get("timeout", 120))
    if not (set_dir / ".metadata").exists():
        raise RuntimeError(f"set {name}: no .metadata written")
    return set_dir


# --------------------------------------------------------------------------------------------
# torch 2.x `.metadata`: stand-in classes pickled under the 2.x class paths
# --------------------------------------------------------------------------------------------
_V2_MD = "torch.distributed.checkpoint.metadata"
_V2_FS = "torch.distributed.checkpoint.filesystem"


def _standin(module, qualname, **attrs):
    cls = type(qualname, (), dict(attrs))
    cls.__module__ = module
    cls.__qualname__ = qualname
    return cls


def _tp_getstate(self):
    return self._state


_ENUM_NAMES = {0: "TORCH_CONTIGUOUS_FORMAT", 1: "TORCH_CHANNELS_LAST", 2: "TORCH_PRESERVE_FORMAT"}


def _enum_reduce(self):
    if self.by_name:                    # Python 3.11 Enum.__reduce_ex__
        return (getattr, (_V2.MEM_FORMAT_CLS, _ENUM_NAMES[self.value]))
    return (_V2.MEM_FORMAT_CLS, (self.value,))  # Python <= 3.10 and >= 3.12


class _V2:
    """Stand-ins; instances carry exactly the __dict__ (or state) torch 2.x pickles."""
    Metadata = _standin(_V2_MD, "Metadata")
    TensorStorageMetadata = _standin(_V2_MD, "TensorStorageMetadata")
    ChunkStorageMetadata = _standin(_V2_MD, "ChunkStorageMetadata")
    BytesStorageMetadata = _standin(_V2_MD, "BytesStorageMetadata")
    MetadataIndex = _standin(_V2_MD, "MetadataIndex")
    TensorProperties = _standin(_V2_MD, "TensorProperties", __getstate__=_tp_getstate)
    StorageMeta = _standin(_V2_MD, "StorageMeta")
    MEM_FORMAT_CLS = _standin(_V2_MD, "_MEM_FORMAT_ENCODING")
    MemFormatMember = type("_MemFormatMember", (), {"__reduce__": _enum_reduce})
    _StorageInfo = _standin(_V2_FS, "_StorageInfo")


def _new(cls, **fields):
    o = cls.__new__(cls)
    o.__dict__.update(fields)
    return o


def _fake_modules():
    """Context: make the 2.x module paths importable so pickle can name them."""
    class _Ctx:
        def __enter__(self):
            self.saved = {}
            mods = {
                "torch.distributed.checkpoint": types.ModuleType("torch.distributed.checkpoint"),
                _V2_MD: types.ModuleType(_V2_MD),
                _V2_FS: types.ModuleType(_V2_FS),
            }
            for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                      "BytesStorageMetadata", "MetadataIndex", "TensorProperties", "StorageMeta"):
                setattr(mods[_V2_MD], n, getattr(_V2, n))
            setattr(mods[_V2_MD], "_MEM_FORMAT_ENCODING", _V2.MEM_FORMAT_CLS)
            setattr(mods[_V2_FS], "_StorageInfo", _V2._StorageInfo)
            for n, m in mods.items():
                self.saved[n] = sys.modules.get(n)
                sys.modules[n] = m
            return self

        def __exit__(self, *exc):
            for n, m in self.saved.items():
                if m is None:
                    sys.modules.pop(n, None)
                else:
                    sys.modules[n] = m
            return False
    return _Ctx()


def _v2_index(ix):
    d = {"fqn": ix.fqn, "index": ix.index}       # __init__ order: fqn, index, then offset
    if ix.offset is not None:                    # offset left out of __dict__ when None
        d["offset"] = torch.Size(ix.offset)
    return _new(_V2.MetadataIndex, **d)


def _v2_props(p, strides, enum_by_name):
    enc = {torch.contiguous_format: 0, torch.channels_last: 1,
           torch.preserve_format: 2}[p.memory_format]
    member = _V2.MemFormatMember()
    member.value = enc
    member.by_name = enum_by_name
    state = (p.dtype, p.layout, p.requires_grad, member, p.pin_memory)
    if strides is not None:
        state = state + (strides,)
    o = _V2.TensorProperties.__new__(_V2.TensorProperties)
    o._state = state
    return o


def _contig_strides(size):
    st, acc = [], 1
    for s in reversed(list(size)):
        st.append(acc)
        acc *= s
    return tuple(reversed(st))


def repickle_v2(md, planner_data, set_name="v2", seed=DEFAULT_SEED, fields="2.6",
                tp_strides=False, enum_by_name=False, transforms=None):
    """Bytes of a torch 2.x style `.metadata` pickle carrying md's content; `transforms`
    (fqn -> descriptors) gives those items' _StorageInfo transform_descriptors, as newer
    torch writes for a compressed item."""
    sdm = {}
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            strides = _contig_strides(v.size) if tp_strides else None
            chunks = [_new(_V2.ChunkStorageMetadata, offsets=torch.Size(c.offsets),
                           sizes=torch.Size(c.sizes)) for c in v.chunks]
            sdm[k] = _new(_V2.TensorStorageMetadata, properties=_v2_props(v.properties, strides, enum_by_name),
                          size=torch.Size(v.size), chunks=chunks)
        else:
            sdm[k] = _new(_V2.BytesStorageMetadata)
    storage = {_v2_index(ix): _new(_V2._StorageInfo, relative_path=si.relative_path,
                                   offset=si.offset, length=si.length,
                                   **({"transform_descriptors": transforms[ix.fqn]}
                                      if transforms and ix.fqn in transforms else {}))
               for ix, si in md.storage_data.items()}
    pd = {k: tuple(planner_data.get(k, (k,))) for k in md.state_dict_metadata}
    f = {"state_dict_metadata": sdm, "planner_data": pd, "storage_data": storage}
    if fields == "2.6":
        sid = str(uuid.UUID(int=(zlib.crc32(set_name.encode()) << 64) | seed, version=4))
        f["storage_meta"] = _new(_V2.StorageMeta, checkpoint_id=Path(
            f"/checkpoints/{set_name}"), save_id=sid, load_id=None, modules=[])
        f["version"] = "1.0.0"
    elif fields != "2.0":
        raise ValueError(fields)
    obj = _new(_V2.Metadata, **f)
    with _fake_modules():
        return pickle.dumps(obj, protocol=4)


# --------------------------------------------------------------------------------------------
# Reading: torch 1.13's own reader
# --------------------------------------------------------------------------------------------
class StorageMeta:
    """Local stand-in for torch 2.x StorageMeta when reading a 2.x `.metadata` with torch 1.13."""


class _TensorPropertiesAny(TensorProperties):
    def __setstate__(self, state):
        if len(state) == 6:
            self.strides = state[5]
            state = state[:5]
        super().__setstate__(state)


_V2_MAP = {
    (_V2_MD, "Metadata"): Metadata,
    (_V2_MD, "TensorStorageMetadata"): TensorStorageMetadata,
    (_V2_MD, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_V2_MD, "BytesStorageMetadata"): BytesStorageMetadata,
    (_V2_MD, "MetadataIndex"): MetadataIndex,
    (_V2_MD, "TensorProperties"): _TensorPropertiesAny,
    (_V2_MD, "_MEM_FORMAT_ENCODING"): MEM_FORMAT_ENCODING,
    (_V2_MD, "StorageMeta"): StorageMeta,
    (_V2_FS, "_StorageInfo"): _StorageInfo,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _V2_MAP:
            return _V2_MAP[(module, name)]
        return super().find_class(module, name)


def read_metadata(dcp_dir):
    """The `.metadata` object; 2.x class paths are mapped onto torch 1.13's classes."""
    with open(Path(dcp_dir) / ".metadata", "rb") as f:
        return _Unpickler(f).load()


class _Reader(FileSystemReader):
    def read_metadata(self):
        return read_metadata(self.path)


def reference_state_dict(dcp_dir):
    """Flat key -> full tensor (global shape/dtype from the metadata, filled by torch 1.13's
    load_state_dict(..., FileSystemReader, no_dist=True)) or the loaded Python object."""
    md = read_metadata(dcp_dir)
    sd = {}
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            vol = 0
            for c in v.chunks:
                n = 1
                for s in c.sizes:
                    n *= s
                vol += n
            total = 1
            for s in v.size:
                total *= s
            if vol != total:
                raise ValueError(f"{k}: chunks cover {vol} of {total} elements")
            sd[k] = torch.zeros(tuple(v.size), dtype=v.properties.dtype)
        else:
            sd[k] = None
    load_state_dict(sd, _Reader(dcp_dir), no_dist=True)
    return sd


def nested_state_dict(flat, planner_data):
    """Nest flat keys by planner_data paths as torch 2.x's unflatten_state_dict/set_element do:
    str path elements make dicts, int elements make lists (padded with None)."""
    root = {}
    for key, value in flat.items():
        path = tuple(planner_data.get(key, (key,))) if planner_data else (key,)
        cur = root
        for i in range(1, len(path)):
            prev, nxt = path[i - 1], path[i]
            default = {} if type(nxt) == str else []
            if isinstance(cur, dict):
                cur = cur.setdefault(prev, default)
            else:
                while len(cur) <= prev:
                    cur.append(None)
                if cur[prev] is None:
                    cur[prev] = default
                cur = cur[prev]
        last = path[-1]
        if type(last) == int:
            while len(cur) <= last:
                cur.append(None)
        cur[last] = value
    return root


# --------------------------------------------------------------------------------------------
# Check / describe
# --------------------------------------------------------------------------------------------
def _same(a, b, where):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: tensor vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        # bitwise: compare the raw bytes (torch.equal would call -0.0 == 0.0 and NaN != NaN)
        fa, fb = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
        if a.dtype != torch.bool:
            fa, fb = fa.view(torch.uint8), fb.view(torch.uint8)
        return [] if torch.equal(fa, fb) else [f"{where}: values differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} vs {list(b)}"]
        return [e for k in a for e in _same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) != type(b) or len(a) != len(b):
            return [f"{where}: {a!r} vs {b!r}"]
        return [e for i, (x, y) in enumerate(zip(a, b)) for e in _same(x, y, f"{where}[{i}]")]
    return [] if (type(a) == type(b) and a == b) else [f"{where}: {a!r} vs {b!r}"]


def check_set(root, name, seed=DEFAULT_SEED):
    d = Path(root) / name
    exp = expected_state_dict(name, seed=seed)
    ref = reference_state_dict(d)
    errs = []
    if sorted(exp) != sorted(ref):
        errs.append(f"keys differ: {sorted(set(exp) ^ set(ref))}")
    for k in exp:
        if k in ref:
            errs += _same(exp[k], ref[k], k)
    md = read_metadata(d)
    pd = getattr(md, "planner_data", None)
    if name in V2_SETS:
        if pd != planner_data_for(name):
            errs.append("planner_data differs")
        nested = nested_state_dict(ref, pd)
        errs += _same(nested_state_dict(exp, planner_data_for(name)), nested, "<nested>")
    # every storage entry lies inside its file
    for ix, si in md.storage_data.items():
        size = (d / si.relative_path).stat().st_size
        if si.offset + si.length > size:
            errs.append(f"{ix.fqn}: storage range past end of {si.relative_path}")
    n_t = sum(isinstance(v, torch.Tensor) for v in exp.values())
    line = (f"{name}: {'OK' if not errs else 'MISMATCH'}  keys={len(exp)} tensors={n_t} "
            f"objects={len(exp) - n_t} files={len(list(d.glob('*.distcp')))}")
    return line, errs


def describe_set(root, name):
    d = Path(root) / name
    md = read_metadata(d)
    storage = {}
    for ix, si in md.storage_data.items():
        storage.setdefault(ix.fqn, []).append({
            "offset": list(ix.offset) if ix.offset is not None else None, "index": ix.index,
            "file": si.relative_path, "at": si.offset, "length": si.length})
    keys = {}
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            keys[k] = {"type": "tensor", "dtype": str(v.properties.dtype).replace("torch.", ""),
                       "size": list(v.size),
                       "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)}
                                  for c in v.chunks]}
        else:
            keys[k] = {"type": "bytes"}
        keys[k]["storage"] = storage.get(k, [])
    out = {"set": name, "metadata_class": f"{type(md).__module__}.{type(md).__name__}",
           "files": sorted(p.name for p in d.iterdir()), "keys": keys}
    if getattr(md, "planner_data", None) is not None:
        out["planner_data"] = {k: list(v) for k, v in md.planner_data.items()}
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

# ------------------------------------------------------------------ hostile .metadata
# Copies of a set's .metadata with one thing broken, each pickled by torch 1.13's
# own classes, and the words the reader's one-line error must hold.
def _hostile_cases():
    import copy

    def first_tensor(md):
        return next(k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata))

    def drop_storage(md):
        key = first_tensor(md)
        ix = next(ix for ix in md.storage_data if ix.fqn == key)
        del md.storage_data[ix]

    def sparse_layout(md):
        md.state_dict_metadata[first_tensor(md)].properties.layout = torch.sparse_coo

    def odd_dtype(md):
        md.state_dict_metadata[first_tensor(md)].properties.dtype = torch.qint8

    def short_box(md):
        chunk = md.state_dict_metadata[first_tensor(md)].chunks[0]
        chunk.offsets = torch.Size(list(chunk.offsets)[:1])

    def escaping_path(md):
        ix = next(iter(md.storage_data))
        md.storage_data[ix].relative_path = "../outside.distcp"

    def negative_length(md):
        ix = next(iter(md.storage_data))
        md.storage_data[ix].length = -5

    def not_metadata(md):
        return {"state_dict_metadata": md.state_dict_metadata}

    def odd_item(md):
        md.state_dict_metadata["odd"] = torch.Size([1, 2])

    def nul_in_path(md):
        ix = next(iter(md.storage_data))
        md.storage_data[ix].relative_path += "\x00junk"

    return {
        "no_storage_for_a_chunk": (drop_storage, "storage_data does not say where"),
        "sparse_layout": (sparse_layout, "a layout other than torch.strided"),
        "quantized_dtype": (odd_dtype, "is not a torch dtype ckpt-tool knows"),
        "box_of_wrong_rank": (short_box, "a box of 1 and 2 dimensions"),
        "path_outside_the_directory": (escaping_path, "is not a file name of the directory"),
        "negative_length": (negative_length, "_StorageInfo that is not"),
        "not_a_metadata": (not_metadata, "not a DCP Metadata pickle"),
        "item_of_another_class": (odd_item, "an item of class"),
        "nul_in_a_path": (nul_in_path, "is not a file name of the directory"),
    }


def write_hostile(set_dir, out_dir):
    """One `<case>.metadata` per case under out_dir, and expected.json: case -> words."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (edit, words) in _hostile_cases().items():
        md = read_metadata(set_dir)
        replaced = edit(md)
        with open(out / f"{name}.metadata", "wb") as f:
            pickle.dump(md if replaced is None else replaced, f, protocol=4)
        expected[name] = words
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def _load_worker(dcp_dir, rank, world, port):
    """One rank of load_sharded: every tensor of dim >= 1 as a ShardedTensor cut along
    dim 0 over `world` ranks, filled by torch 1.13's load_state_dict, then checked
    against the whole tensors torch's reader gives."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        md = read_metadata(dcp_dir)
        whole = reference_state_dict(dcp_dir)
        spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
        sd = {}
        for key, value in md.state_dict_metadata.items():
            if isinstance(value, TensorStorageMetadata) and len(value.size) >= 1:
                sd[key] = sharded_tensor.empty(spec, *value.size, dtype=value.properties.dtype)
            elif isinstance(value, TensorStorageMetadata):
                sd[key] = torch.zeros((), dtype=value.properties.dtype)
            else:
                sd[key] = None
        load_state_dict(sd, _Reader(dcp_dir))
        checked = 0
        for key, value in sd.items():
            if isinstance(value, sharded_tensor.ShardedTensor):
                for shard in value.local_shards():
                    want = whole[key]
                    for d, (o, n) in enumerate(zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)):
                        want = want.narrow(d, o, n)
                    errors = _same(shard.tensor, want, f"{key} rank {rank}")
                    if errors:
                        raise AssertionError(errors)
                    checked += 1
            else:
                errors = _same(value, whole[key], key)
                if errors:
                    raise AssertionError(errors)
        dist.barrier()
        print(f"rank {rank}: {checked} shard(s) equal")
    finally:
        dist.destroy_process_group()


def load_sharded(dcp_dir, world, timeout=120):
    """Loads the DCP directory into `world` ranks with torch 1.13's own loader (gloo on
    127.0.0.1), each rank a shard of every tensor; raises unless every shard equals the
    whole tensor's slice."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    for _attempt in range(3):  # a port taken between probe and bind: retry
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_load", str(dcp_dir), str(r),
                                   str(world), str(port)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for r in range(world)]
        outs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, _ = p.communicate()
            outs.append(out.decode(errors="replace"))
        text = "\n".join(f"--- rank {r} ---\n{o}" for r, o in enumerate(outs))
        if all(p.returncode == 0 for p in procs):
            return text
        if "Address already in use" not in text:
            break
    raise RuntimeError(f"loading {dcp_dir} into {world} ranks failed:\n{text}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_worker":
        name, set_dir, rank, world, port, seed, single = argv[1:8]
        _worker(name, set_dir, int(rank), int(world), int(port), int(seed), single == "1")
        return 0
    if argv and argv[0] == "--_load":
        dcp_dir, rank, world, port = argv[1:5]
        _load_worker(dcp_dir, int(rank), int(world), int(port))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the sets under this directory")
    g.add_argument("--check", help="compare torch's reader with the generator's full tensors")
    g.add_argument("--describe", help="print a JSON description of the sets")
    g.add_argument("--hostile", nargs=2, metavar=("SET_DIR", "OUT"),
                   help="write broken copies of SET_DIR/.metadata, and expected.json, under OUT")
    ap.add_argument("--only", action="append", choices=SET_NAMES,
                    help="only this set (repeatable)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    a = ap.parse_args(argv)
    names = a.only or SET_NAMES
    if a.hostile:
        for name, words in write_hostile(*a.hostile).items():
            print(f"{name}: {words}")
        return 0
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        for n in names:
            t = time.time()
            d = write_set(a.out, n, seed=a.seed)
            size = sum(p.stat().st_size for p in d.iterdir())
            print(f"{n}: {d}  {len(list(d.iterdir()))} files  {size} bytes  "
                  f"{time.time() - t:.1f}s", flush=True)
        print(f"total {time.time() - t0:.1f}s")
        return 0
    if a.check:
        bad = 0
        for n in names:
            try:
                line, errs = check_set(a.check, n, seed=a.seed)
            except Exception as e:  # noqa: BLE001 - report and go on
                line, errs = f"{n}: ERROR {type(e).__name__}: {e}", ["error"]
            print(line)
            for e in errs[:20]:
                print("    " + e)
            bad += bool(errs)
        return 1 if bad else 0
    print(json.dumps([describe_set(a.describe, n) for n in names], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
