#!/usr/bin/python3
"""A strict safetensors reader for ckpt-tool's tests, written from the format's
specification (Debian has no Python `safetensors`): only struct, json and
torch.frombuffer. Every rule is checked; a violation raises AssertionError naming
the file and the rule.

The format, as checked here:
  * 8 bytes: N, the header length, a little-endian u64;
  * N bytes: the header, a UTF-8 JSON object starting at byte 8 with `{`, padded
    with spaces (0x20) after its closing `}` so that 8 + N is a multiple of 8;
  * the data: every byte after the header belongs to exactly one tensor.
The header maps each tensor name to exactly {"dtype", "shape", "data_offsets"}:
dtype one of DTYPES, shape a list of ints >= 0, data_offsets [begin, end] relative
to the byte after the header with end - begin == numel * element size. The optional
"__metadata__" entry is a map of str to str. Taken in header order, the entries'
data is contiguous from offset 0 (no gap, no overlap) and the last one ends at the
end of the file; each tensor begins at a multiple of its element size (what
ckpt-tool guarantees: it writes the data sorted by element size, largest first).
Duplicate names, NaN/Infinity literals and anything else in the JSON are refused.

A sharded set (Hugging Face transformers' layout) is `model.safetensors.index.json`,
{"metadata": {"total_size": N}, "weight_map": {tensor name: file name}}, beside the
files model-00001-of-0000N.safetensors ... (5-digit numbers, all of 1..N present,
each holding at least one tensor); the index names every tensor of the shard files
and nothing else, each in the file that holds it, each in one file only; total_size
is the sum of the tensor bytes (numel * element size).

Importable:
    read(path)              -> ([(name, tensor)] in header order, metadata or None)
    header(path)            -> [entry dicts] in header order (name, dtype, shape, begin, end)
    read_sharded(folder)    -> ShardedSet (tensors in shard then header order, files, index)
    read_hf_folder(folder)  -> ShardedSet of model.safetensors or of the index's shards
    encode(tensors, ...)    bytes of a correct file (tests and the self-test)
    assemble(header, data)  bytes of a file with an arbitrary header (hostile files)
Command line:
    safetensors_check.py                 the reader's self-test
    safetensors_check.py PATH...         check files / folders, list their tensors
"""
import json
import os
import re
import struct
import sys
from collections import OrderedDict

import torch

# name -> (torch dtype used for reading, element size). torch 1.13 has no unsigned
# 16/32/64-bit or float8 types: those are read as the signed integer (or uint8) of the
# same size, bit for bit.
DTYPES = OrderedDict([
    ("F64", (torch.float64, 8)), ("F32", (torch.float32, 4)), ("F16", (torch.float16, 2)),
    ("BF16", (torch.bfloat16, 2)), ("I64", (torch.int64, 8)), ("I32", (torch.int32, 4)),
    ("I16", (torch.int16, 2)), ("I8", (torch.int8, 1)), ("U8", (torch.uint8, 1)),
    ("BOOL", (torch.bool, 1)),
    ("U16", (getattr(torch, "uint16", torch.int16), 2)), ("U32", (getattr(torch, "uint32", torch.int32), 4)),
    ("U64", (getattr(torch, "uint64", torch.int64), 8)),
    ("F8_E4M3", (getattr(torch, "float8_e4m3fn", torch.uint8), 1)),
    ("F8_E5M2", (getattr(torch, "float8_e5m2", torch.uint8), 1)),
])
# What ckpt-tool writes.
WRITTEN_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
NAME_OF_TORCH_DTYPE = {DTYPES[n][0]: n for n in WRITTEN_DTYPES}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def shard_name(i, n, stem="model"):
    """transformers' name of shard i (1-based) of n."""
    return f"{stem}-{i:05d}-of-{n:05d}.safetensors"


def dtype_name(dtype):
    """The safetensors name of a torch dtype (what ckpt-tool must write for it)."""
    return NAME_OF_TORCH_DTYPE[dtype]


def _fail(where, message):
    raise AssertionError(f"{where}: {message}")


def _no_duplicates(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen.add(k)
    return OrderedDict(pairs)


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _json(text, where, what):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        _fail(where, f"{what} is not valid JSON: {e}")


def _is_int(x):
    return type(x) is int  # not bool, not float


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def parse(data, where="<bytes>", require_alignment=True):
    """Checks a whole file's bytes against every rule. Returns (entries, metadata,
    data_start): entries in header order as dicts {name, dtype, shape, begin, end}
    (begin/end relative to data_start), metadata the "__metadata__" map or None."""
    size = len(data)
    if size < 8:
        _fail(where, f"{size} bytes: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > size - 8:
        _fail(where, f"header length {n} past the end of the file ({size} bytes, {size - 8} after the length)")
    if n < 2:
        _fail(where, f"header length {n}: too short for a JSON object")
    if (8 + n) % 8:
        _fail(where, f"header length {n}: 8 + {n} is not a multiple of 8 (header not padded)")
    raw = bytes(data[8:8 + n])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(where, f"header is not UTF-8: {e}")
    body = text.rstrip(" ")
    if not text.startswith("{"):
        _fail(where, f"header does not start with '{{': {text[:20]!r}")
    if not body.endswith("}"):
        _fail(where, f"header is not a JSON object padded with spaces only: ends with {text[-20:]!r}")
    obj = _json(body, where, "header")
    if not isinstance(obj, dict):
        _fail(where, f"header is a {type(obj).__name__}, not a JSON object")
    metadata = None
    entries = []
    for name, value in obj.items():
        if name == "__metadata__":
            if not isinstance(value, dict):
                _fail(where, f"__metadata__ is a {type(value).__name__}, not an object")
            for k, v in value.items():
                if not isinstance(v, str):
                    _fail(where, f"__metadata__[{k!r}] is a {type(v).__name__}, not a string")
            metadata = dict(value)
            continue
        what = f"tensor {name!r}"
        if not isinstance(value, dict):
            _fail(where, f"{what}: entry is a {type(value).__name__}, not an object")
        if set(value) != {"dtype", "shape", "data_offsets"}:
            _fail(where, f"{what}: entry has fields {sorted(value)}, not dtype, shape, data_offsets")
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            _fail(where, f"{what}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            _fail(where, f"{what}: shape {shape!r} is not a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            _fail(where, f"{what}: data_offsets {offsets!r} is not a list of two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            _fail(where, f"{what}: data_offsets [{begin}, {end}] is not 0 <= begin <= end")
        itemsize = DTYPES[dtype][1]
        nbytes = numel(shape) * itemsize
        if end - begin != nbytes:
            _fail(where, f"{what}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape {shape} "
                         f"of {dtype} is {nbytes} bytes")
        if require_alignment and begin % itemsize:
            _fail(where, f"{what}: begins at data offset {begin}, not a multiple of its element size {itemsize}")
        entries.append({"name": name, "dtype": dtype, "shape": list(shape), "begin": begin, "end": end})
    data_start = 8 + n
    data_len = size - data_start
    expected = 0
    for e in entries:
        if e["begin"] < expected:
            _fail(where, f"tensor {e['name']!r}: data_offsets [{e['begin']}, {e['end']}] overlap the previous "
                         f"entry's data (which ends at {expected})")
        if e["begin"] > expected:
            _fail(where, f"tensor {e['name']!r}: data_offsets [{e['begin']}, {e['end']}] leave a gap after "
                         f"offset {expected}")
        if e["end"] > data_len:
            _fail(where, f"tensor {e['name']!r}: data_offsets [{e['begin']}, {e['end']}] past the end of the "
                         f"data ({data_len} bytes)")
        expected = e["end"]
    if expected != data_len:
        _fail(where, f"the tensors' data ends at offset {expected}, but {data_len} bytes follow the header")
    return entries, metadata, data_start


def _tensor(data, data_start, e):
    dtype, _ = DTYPES[e["dtype"]]
    if e["end"] == e["begin"]:
        return torch.empty(e["shape"], dtype=dtype)
    buf = bytearray(data[data_start + e["begin"]:data_start + e["end"]])
    return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read(path, require_alignment=True):
    """([(name, tensor)] in header order, metadata or None) of a checked file."""
    data = _read_bytes(path)
    entries, metadata, start = parse(data, path, require_alignment)
    return [(e["name"], _tensor(data, start, e)) for e in entries], metadata


def header(path):
    """The checked header's tensor entries in header order; each a dict with name,
    dtype, shape, begin, end (data offsets) and file_offset (of begin in the file)."""
    data = _read_bytes(path)
    entries, _, start = parse(data, path)
    for e in entries:
        e["file_offset"] = start + e["begin"]
    return entries


class ShardedSet:
    """A checked single file or sharded set.
    tensors:  OrderedDict name -> tensor, file by file (shard 1 first), header order within
    files:    OrderedDict file name -> [names] in header order
    metadata: OrderedDict file name -> the file's __metadata__ (or None)
    index:    the parsed index (None for a single file)"""

    def __init__(self):
        self.tensors = OrderedDict()
        self.files = OrderedDict()
        self.metadata = OrderedDict()
        self.index = None

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_sharded(folder, index_name=INDEX_NAME):
    """Checks `folder`/model.safetensors.index.json and every shard it names."""
    where = os.path.join(folder, index_name)
    with open(where, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(where, f"not UTF-8: {e}")
    index = _json(text, where, "the index")
    if not isinstance(index, dict) or set(index) != {"metadata", "weight_map"}:
        _fail(where, f"top level is not an object of exactly metadata and weight_map: "
                     f"{sorted(index) if isinstance(index, dict) else type(index).__name__}")
    meta, weight_map = index["metadata"], index["weight_map"]
    if not isinstance(meta, dict) or not _is_int(meta.get("total_size")) or meta["total_size"] < 0:
        _fail(where, f"metadata {meta!r} has no integer total_size")
    if not isinstance(weight_map, dict) or not weight_map:
        _fail(where, "weight_map is not a non-empty object")
    counts = set()
    for key, file_name in weight_map.items():
        if not isinstance(file_name, str):
            _fail(where, f"weight_map[{key!r}] is a {type(file_name).__name__}, not a file name")
        m = SHARD_RE.match(file_name)
        if not m:
            _fail(where, f"weight_map[{key!r}] = {file_name!r}: not model-NNNNN-of-NNNNN.safetensors")
        counts.add(int(m.group(2)))
    if len(counts) != 1:
        _fail(where, f"shard files of different counts: {sorted(counts)}")
    count = counts.pop()
    wanted = [shard_name(i, count) for i in range(1, count + 1)]
    listed = set(weight_map.values())
    for f in listed:
        if f not in wanted:
            _fail(where, f"{f}: shard number outside 1..{count}")
    for f in wanted:
        if f not in listed:
            _fail(where, f"{f}: no tensor of the index is in this shard (missing from weight_map)")
    strays = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and f not in wanted)
    if strays:
        _fail(where, f"safetensors files in the folder that the index does not name: {strays}")
    result = ShardedSet()
    result.index = index
    holder = {}
    for f in wanted:
        path = os.path.join(folder, f)
        if not os.path.isfile(path):
            _fail(where, f"{f}: named by the index but not in the folder")
        tensors, metadata = read(path)
        result.files[f] = [n for n, _ in tensors]
        result.metadata[f] = metadata
        for name, t in tensors:
            if name in holder:
                _fail(where, f"tensor {name!r} is in both {holder[name]} and {f}")
            holder[name] = f
            result.tensors[name] = t
            if name not in weight_map:
                _fail(where, f"tensor {name!r} of {f} is not in weight_map")
            if weight_map[name] != f:
                _fail(where, f"weight_map says {name!r} is in {weight_map[name]}, but {f} holds it")
    for key in weight_map:
        if key not in holder:
            _fail(where, f"weight_map names {key!r}, which no shard holds")
    if meta["total_size"] != result.nbytes():
        _fail(where, f"total_size {meta['total_size']}, but the shards' tensors hold {result.nbytes()} bytes")
    return result


def read_single(path):
    """A ShardedSet of one file."""
    result = ShardedSet()
    tensors, metadata = read(path)
    name = os.path.basename(path)
    result.files[name] = [n for n, _ in tensors]
    result.metadata[name] = metadata
    result.tensors.update(tensors)
    if len(result.tensors) != len(tensors):
        _fail(path, "duplicate tensor names")
    return result


def read_hf_folder(folder):
    """model.safetensors.index.json and its shards, or a single model.safetensors;
    never both, and no stray shard files beside a single file."""
    index = os.path.join(folder, INDEX_NAME)
    single = os.path.join(folder, SINGLE_NAME)
    if os.path.exists(index):
        if os.path.exists(single):
            _fail(folder, f"both {INDEX_NAME} and {SINGLE_NAME}")
        return read_sharded(folder)
    if not os.path.exists(single):
        _fail(folder, f"neither {INDEX_NAME} nor {SINGLE_NAME}")
    strays = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and f != SINGLE_NAME)
    if strays:
        _fail(folder, f"shard files beside a single {SINGLE_NAME}: {strays}")
    return read_single(single)


# --------------------------------------------------------------------------------------
# Writing (for the self-test and for crafting hostile files)


def tensor_bytes(t):
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(torch.uint8).numpy().tobytes()


def assemble(header_obj, data=b"", pad=True, header_length=None):
    """A file from a header (dict serialised as JSON, or str/bytes taken as they are)
    and data. pad: spaces after the header up to a multiple of 8; header_length: the
    u64 to write in place of the real length."""
    if isinstance(header_obj, (dict, list)):
        raw = json.dumps(header_obj, separators=(",", ":")).encode()
    elif isinstance(header_obj, str):
        raw = header_obj.encode()
    else:
        raw = bytes(header_obj)
    if pad:
        raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
    n = len(raw) if header_length is None else header_length
    return struct.pack("<Q", n) + raw + bytes(data)


def encode(tensors, metadata=None):
    """Bytes of a correct file holding `tensors` ([(name, tensor)] or a dict) in the
    given order (give them largest element size first for aligned offsets)."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    hdr = OrderedDict()
    if metadata is not None:
        hdr["__metadata__"] = dict(metadata)
    data = bytearray()
    for name, t in items:
        b = tensor_bytes(t)
        hdr[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                     "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    return assemble(hdr, bytes(data))


def write(path, tensors, metadata=None):
    with open(path, "wb") as f:
        f.write(encode(tensors, metadata))
    return path


def same_bits(a, b):
    """Same dtype, shape and bytes (NaN payloads, -0.0 included)."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and tensor_bytes(a) == tensor_bytes(b)


# --------------------------------------------------------------------------------------
# Self-test: correct files read back; each broken rule is refused with its message.


def _expect_refused(data, fragment, label):
    try:
        parse(data, label)
    except AssertionError as e:
        assert fragment in str(e), f"{label}: refused, but for another reason: {e}"
        return str(e)
    raise AssertionError(f"{label}: accepted a file that breaks a rule ({fragment})")


def hostile_files():
    """The crafted files of ckpt-tool's hostile-header tests: {label: (bytes, what the
    reader says)}; each breaks exactly one rule."""
    f4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    data16 = struct.pack("<4f", 1, 2, 3, 4)
    good = assemble({"a": f4}, data16)
    files = OrderedDict()
    files["a-length-past-end"] = (struct.pack("<Q", len(good)) + good[8:], "past the end of the file")
    files["a-length-huge"] = (struct.pack("<Q", 2 ** 64 - 8) + good[8:], "past the end of the file")
    files["b-overlap"] = (assemble({"a": f4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                                   data16 + data16[:8]), "overlap")
    files["c-unknown-dtype"] = (assemble({"a": dict(f4, dtype="X9")}, data16), "unknown dtype 'X9'")
    files["d-shape-vs-offsets"] = (assemble({"a": dict(f4, shape=[5])}, data16), "hold 16 bytes, but shape [5]")
    files["e-offsets-past-end"] = (assemble({"a": f4, "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
                                            data16 + data16[:4]), "past the end of the data")
    files["f-not-json"] = (assemble('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]', data16),
                           "header is not a JSON object")
    files["f-not-json-2"] = (assemble('{"a": [0, 16}', data16), "not valid JSON")
    files["g-gap"] = (assemble({"a": f4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]}},
                               data16 + b"\0" * 4 + data16), "gap")
    return files


def _unaligned(text):
    """`text` with spaces added so that 8 + its length is 1 more than a multiple of 8."""
    return text + " " * ((1 - (8 + len(text))) % 8)


def self_test():
    g = torch.Generator().manual_seed(5)
    tensors = [
        ("f64", torch.randn(3, generator=g, dtype=torch.float64)),
        ("i64", torch.tensor([2 ** 62, -1, 0])),
        ("scalar", torch.tensor(7)),
        ("f32", torch.tensor([float("nan"), -0.0, float("inf"), 1.5])),
        ("i32", torch.arange(6, dtype=torch.int32).reshape(2, 3)),
        ("empty", torch.zeros(0, 3)),
        ("f16", torch.randn(5, generator=g).half()),
        ("bf16", torch.randn(2, 2, generator=g).bfloat16()),
        ("i16", torch.tensor([-300, 300], dtype=torch.int16)),
        ("i8", torch.tensor([-5, 5, 0], dtype=torch.int8)),
        ("u8", torch.tensor([0, 255], dtype=torch.uint8)),
        ("bool", torch.tensor([True, False, True])),
    ]
    data = encode(tensors, {"format": "pt"})
    assert len(data[:8]) == 8 and (8 + struct.unpack("<Q", data[:8])[0]) % 8 == 0
    entries, metadata, start = parse(data, "good")
    assert metadata == {"format": "pt"} and [e["name"] for e in entries] == [n for n, _ in tensors]
    got = [(e["name"], _tensor(data, start, e)) for e in entries]
    for (n, a), (m, b) in zip(tensors, got):
        assert n == m and same_bits(a, b), (n, a, b)
    # no metadata, no tensors at all, unicode names: fine
    parse(encode([("é/名", torch.ones(2))]), "unicode")
    assert parse(encode([]), "empty")[0] == []
    # The 8-aligned padding, by hand: header '{}' is 2 bytes, padded with 6 spaces.
    assert encode([]) == struct.pack("<Q", 8) + b"{}" + b" " * 6

    for label, (bad, fragment) in hostile_files().items():
        _expect_refused(bad, fragment, label)

    f4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    d16 = b"\0" * 16
    one = OrderedDict(a=f4)
    more = [
        ("short", b"\0" * 5, "shorter than"),
        ("unpadded", assemble(_unaligned(json.dumps(one, separators=(",", ":"))), d16, pad=False),
         "not a multiple of 8"),
        ("newline-padding", assemble(json.dumps(one, separators=(",", ":")) + "\n" * 8, d16, pad=True),
         "padded with spaces only"),
        ("leading-space", assemble(" " + json.dumps(one, separators=(",", ":")), d16), "does not start with"),
        ("not-utf8", assemble(b'{"\xff": 1}', d16), "not UTF-8"),
        ("list", assemble([1, 2], d16), "does not start with"),
        ("duplicate", assemble('{"a":%s,"a":%s}' % (json.dumps(f4), json.dumps(f4)), d16), "duplicate key"),
        ("nan", assemble('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,16]}}', d16), "not JSON"),
        ("extra-field", assemble({"a": dict(f4, extra=1)}, d16), "not dtype, shape, data_offsets"),
        ("missing-field", assemble({"a": {"dtype": "F32", "shape": [4]}}, d16), "not dtype, shape, data_offsets"),
        ("negative-dim", assemble({"a": dict(f4, shape=[-4])}, d16), "not a list of integers >= 0"),
        ("bool-dim", assemble({"a": dict(f4, shape=[True])}, d16), "not a list of integers >= 0"),
        ("float-dim", assemble({"a": dict(f4, shape=[4.0])}, d16), "not a list of integers >= 0"),
        ("three-offsets", assemble({"a": dict(f4, data_offsets=[0, 16, 16])}, d16), "two integers"),
        ("reversed", assemble({"a": dict(f4, shape=[0], data_offsets=[16, 0])}, d16), "0 <= begin <= end"),
        ("metadata-int", assemble({"__metadata__": {"format": 1}, "a": f4}, d16), "not a string"),
        ("metadata-list", assemble({"__metadata__": ["pt"], "a": f4}, d16), "not an object"),
        ("entry-list", assemble({"a": [0, 16]}, d16), "not an object"),
        ("misaligned", assemble({"b": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},
                                 "a": {"dtype": "F32", "shape": [4], "data_offsets": [1, 17]}}, b"\0" * 17),
         "not a multiple of its element size"),
        ("trailing-bytes", assemble(one, d16 + b"\0"), "17 bytes follow the header"),
        ("not-from-zero", assemble({"a": dict(f4, data_offsets=[4, 20])}, b"\0" * 20), "gap"),
        ("out-of-order", assemble({"b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}, "a": f4},
                                  b"\0" * 32), "gap"),
        ("data-short", assemble(one, d16[:12]), "past the end of the data"),
    ]
    for label, bad, fragment in more:
        _expect_refused(bad, fragment, label)
    # a zero-size tensor may sit anywhere, and an 8-aligned start is needed for F64 only
    parse(assemble({"e": {"dtype": "F64", "shape": [0, 2], "data_offsets": [0, 0]}, "a": f4}, d16), "zero-size")

    _self_test_sharded()
    return True


def _self_test_sharded():
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix="safetensors-check-")
    try:
        def make(files, weight_map, total):
            for f in os.listdir(folder):
                os.remove(os.path.join(folder, f))
            for name, tensors in files.items():
                write(os.path.join(folder, name), tensors, {"format": "pt"})
            with open(os.path.join(folder, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)

        a, b, c = torch.ones(3), torch.zeros(2, dtype=torch.float16), torch.arange(4)
        s1, s2 = shard_name(1, 2), shard_name(2, 2)
        assert s1 == "model-00001-of-00002.safetensors"
        good_files = {s1: [("a", a), ("b", b)], s2: [("c", c)]}
        good_map = {"a": s1, "b": s1, "c": s2}
        make(good_files, good_map, 12 + 4 + 32)
        got = read_hf_folder(folder)
        assert list(got.tensors) == ["a", "b", "c"] and got.nbytes() == 48
        assert list(got.files) == [s1, s2] and same_bits(got.tensors["c"], c)
        bad = [
            ("total", good_files, good_map, 47, "total_size 47"),
            ("missing-key", good_files, {"a": s1, "c": s2}, 48, "'b' of model-00001-of-00002.safetensors is not in"),
            ("shard-not-listed", good_files, {"a": s1, "b": s1}, 48, "missing from weight_map"),
            ("extra-key", good_files, dict(good_map, d=s2), 48, "names 'd', which no shard holds"),
            ("wrong-file", good_files, {"a": s1, "b": s2, "c": s2}, 48, "weight_map says 'b'"),
            ("twice", {s1: [("a", a), ("b", b)], s2: [("c", c), ("a", a)]}, good_map, 60, "in both"),
            ("four-digits", {"model-0001-of-0002.safetensors": [("a", a)]},
             {"a": "model-0001-of-0002.safetensors"}, 12, "not model-NNNNN-of-NNNNN"),
            ("missing-shard", {s1: [("a", a)]}, {"a": s1, "c": s2}, 12, "not in the folder"),
            ("empty-shard", {s1: [("a", a)], s2: []}, {"a": s1}, 12, "missing from weight_map"),
        ]
        for label, files, weight_map, total, fragment in bad:
            make(files, weight_map, total)
            try:
                read_hf_folder(folder)
            except AssertionError as e:
                assert fragment in str(e), f"sharded {label}: refused for another reason: {e}"
                continue
            raise AssertionError(f"sharded {label}: accepted")
        make(good_files, good_map, 48)
        write(os.path.join(folder, SINGLE_NAME), [("a", a)])
        try:
            read_hf_folder(folder)
            raise AssertionError("index and model.safetensors together: accepted")
        except AssertionError as e:
            assert "both" in str(e), e
    finally:
        shutil.rmtree(folder)


def main(argv):
    if not argv:
        self_test()
        print("safetensors_check: self-test passed")
        return 0
    status = 0
    for path in argv:
        try:
            got = read_hf_folder(path) if os.path.isdir(path) else read_single(path)
        except AssertionError as e:
            print(f"safetensors_check: {e}", file=sys.stderr)
            status = 1
            continue
        for f, names in got.files.items():
            print(f"{f}: {len(names)} tensor(s), metadata {got.metadata[f]}")
            for n in names:
                t = got.tensors[n]
                print(f"  {n} {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
