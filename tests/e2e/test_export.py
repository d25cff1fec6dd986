#!/usr/bin/python3
"""Export formats of `ckpt-tool stitch`, judged by torch and by a safetensors reader
written from the format's specification (safetensors_check.py):

  --format safetensors   one file (or transformers-style shards with --max-shard-size)
                         holding the torch stitch's tensors byte for byte, a tie once,
                         data sorted by element size (stable);
  --format hf            a Hugging Face OPT folder: config.json and safetensors with
                         transformers' names, computed here from the torch stitch's keys;
  --weights-only         a torch file that torch.load(weights_only=True) reads;
and inspect / diff / verify on safetensors files and HF folders, hostile headers,
dry runs and outputs that already exist."""
import argparse
import functools
import hashlib
import inspect
import json
import os
import pickle
import types
import re
import shutil
import subprocess
import zipfile
from collections import OrderedDict

import torch

import harness
from harness import ckptcheck
import safetensors_check as st

try:
    from omegaconf import DictConfig, ListConfig, OmegaConf
except ImportError:  # the fixtures need omegaconf anyway
    DictConfig = ListConfig = OmegaConf = None

TIED_SRC = "decoder.embed_tokens.weight"
TIED_DST = "decoder.output_projection.weight"
TORCH_DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
DTYPE_FLAG = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------- helpers

def stitch(args, expect=0):
    return harness.run(["stitch", "--quiet"] + [str(a) for a in args], expect=expect)


def run_raw(args):
    """The tool's CompletedProcess, whatever its exit code."""
    return subprocess.run([harness.TOOL] + [str(a) for a in args], capture_output=True, text=True)


def refused(args):
    """A run that must fail (any non-zero exit, not a crash by signal); returns stderr."""
    proc = run_raw(args)
    assert proc.returncode > 0, f"{' '.join(map(str, args))}: exit {proc.returncode}, expected a refusal\n" \
                                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    return proc.stderr


def one_line_error(args, expect=1):
    _, stderr = harness.run(args, expect=expect)
    assert stderr.startswith("ckpt-tool: error: ") and stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    return stderr


def listing(folder):
    return sorted(os.listdir(folder))


@functools.lru_cache(maxsize=None)
def torch_stitch(inputs, flags=()):
    """The torch stitch of `inputs` (a path) with `flags`, loaded: what every export must
    match. One run per (inputs, flags) per script."""
    key = f"{os.path.basename(inputs.rstrip('/'))}-{hashlib.sha1(repr((inputs, flags)).encode()).hexdigest()[:10]}"
    out = os.path.join(harness.scratch("export-pt-" + key), "out.pt")
    stitch([inputs, "-o", out] + list(flags))
    return ckptcheck.load(out)


def assert_bits(got, want, name):
    """Same dtype and shape, torch.equal, and the same bytes (NaN payloads, -0.0)."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, torch stitch has {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)}, torch stitch has " \
                                                  f"{tuple(want.shape)}"
    if not (want.is_floating_point() and torch.isnan(want).any()):
        assert torch.equal(got, want), f"{name}: values differ from the torch stitch's"
    a = got.contiguous().reshape(-1)
    b = want.contiguous().reshape(-1)
    if a.dtype == torch.bool:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name}: bytes differ from the torch stitch's"


def without_ties(model):
    """[(name, tensor)] of a state dict in its order with each tie written once: a name
    that holds the same view as an earlier name is dropped. Empty tensors are never ties."""
    seen = set()
    kept = []
    for name, t in model.items():
        if t.numel():
            view = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if view in seen:
                continue
            seen.add(view)
        kept.append((name, t))
    return kept


def data_order(items):
    """The order of the data (and header) in a file: element size descending, stable."""
    return sorted(items, key=lambda item: -item[1].element_size())


def nbytes(t):
    return t.numel() * t.element_size()


def plan_shards(items, limit):
    """Shards filled in order; a new one is started when the next tensor would take the
    current one past `limit` bytes; a tensor larger than `limit` thus gets its own."""
    shards, size = [[]], 0
    for name, t in items:
        if shards[-1] and size + nbytes(t) > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes(t)
    return shards


def hf_name(key):
    """transformers' OPTForCausalLM name of a metaseq (stitched, qkv split) key, or None
    for a key HF drops; KeyError for a key with no mapping."""
    if key in ("decoder.version", TIED_DST):
        return None
    if key.startswith("decoder.layer_norm."):
        return "model.decoder.final_layer_norm." + key[len("decoder.layer_norm."):]
    renamed = {"decoder.project_in_dim.weight": "decoder.project_in.weight",
               "decoder.project_out_dim.weight": "decoder.project_out.weight"}
    if key in renamed:
        return "model." + renamed[key]
    if key in (TIED_SRC, "decoder.embed_positions.weight"):
        return "model." + key
    parts = key.split(".")
    layer_keys = {f"self_attn.{p}.{w}" for p in ("k_proj", "v_proj", "q_proj", "out_proj") for w in ("weight", "bias")}
    layer_keys |= {f"{m}.{w}" for m in ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
                   for w in ("weight", "bias")}
    if len(parts) > 3 and parts[:2] == ["decoder", "layers"] and parts[2].isdigit() and \
            ".".join(parts[3:]) in layer_keys:
        return "model." + key
    raise KeyError(key)


def hf_items(model):
    """[(hf name, tensor)] of a torch stitch's state dict, in its order."""
    out = []
    for key, t in model.items():
        name = hf_name(key)
        if name is not None:
            out.append((name, t))
    return out


def check_file(path, items):
    """`path` is a correct safetensors file holding exactly `items` ([(name, tensor)] in
    state-dict order) in data order, byte for byte, with {"format": "pt"} metadata."""
    tensors, metadata = st.read(path)
    assert metadata is not None and metadata.get("format") == "pt", f"{path}: __metadata__ {metadata}"
    want = data_order(items)
    assert [n for n, _ in tensors] == [n for n, _ in want], \
        f"{path}: header order {[n for n, _ in tensors]}, expected {[n for n, _ in want]}"
    for (name, got), (_, expected) in zip(tensors, want):
        assert_bits(got, expected, f"{path}: {name}")
    return tensors


def check_sharded(folder, items, limit, extra_files=()):
    """`folder` holds model-0000i-of-0000N.safetensors planned from `items` by
    plan_shards(limit), model.safetensors.index.json, and `extra_files` (config.json)."""
    shards = plan_shards(items, limit)
    assert len(shards) > 1, "the test's limit must make several shards"
    names = [st.shard_name(i + 1, len(shards)) for i in range(len(shards))]
    assert listing(folder) == sorted(names + [st.INDEX_NAME] + list(extra_files)), listing(folder)
    got = st.read_sharded(folder)
    assert list(got.files) == names
    for file_name, shard in zip(names, shards):
        check_file(os.path.join(folder, file_name), shard)
    assert got.index["metadata"]["total_size"] == sum(nbytes(t) for _, t in items)
    return got


def model_cfg(cfg):
    """The model section of a stitched cfg as a plain dict (OmegaConf or Namespace)."""
    if OmegaConf is not None and isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg.model)
    return dict(vars(cfg["model"]))


def expected_config(ckpt, model, dtype, overrides=None):
    """config.json's fields from the contract: the cfg's model section and the tensors."""
    m = model_cfg(ckpt["cfg"])
    emb, pos = model[TIED_SRC], model["decoder.embed_positions.weight"]
    want = {
        "model_type": "opt", "architectures": ["OPTForCausalLM"],
        "hidden_size": m.get("decoder_embed_dim"), "ffn_dim": m.get("decoder_ffn_embed_dim"),
        "num_hidden_layers": m.get("decoder_layers"), "num_attention_heads": m.get("decoder_attention_heads"),
        "vocab_size": emb.shape[0], "max_position_embeddings": pos.shape[0] - 2, "word_embed_proj_dim": emb.shape[1],
        "do_layer_norm_before": m.get("decoder_normalize_before", True),
        "activation_function": m.get("activation_fn"), "dropout": m.get("dropout"),
        "attention_dropout": m.get("attention_dropout"), "tie_word_embeddings": True,
        "torch_dtype": TORCH_DTYPE_NAME[dtype], "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
    }
    want.update(overrides or {})
    # the cfg agrees with the tensors in every fixture
    layers = {int(k.split(".")[2]) for k in model if k.startswith("decoder.layers.")}
    fc1 = model["decoder.layers.0.fc1.weight"]
    assert (want["hidden_size"], want["ffn_dim"], want["num_hidden_layers"]) == (fc1.shape[1], fc1.shape[0],
                                                                                len(layers))
    return want


def assert_config(path, want):
    with open(path) as f:
        got = json.load(f)
    assert isinstance(got, dict), got
    for key, value in want.items():
        assert key in got, f"{path}: no {key!r} (has {sorted(got)})"
        g = got[key]
        if isinstance(value, bool):
            ok = type(g) is bool and g == value
        elif isinstance(value, int):
            ok = type(g) is int and g == value
        elif isinstance(value, float):
            ok = type(g) in (int, float) and g == value
        else:
            ok = type(g) is type(value) and g == value
        assert ok, f"{path}: {key} is {g!r}, expected {value!r}"
    return got


def check_hf_folder(folder, model, want_config, limit=None):
    """An HF folder of the torch stitch's `model`: names by the table, bytes equal."""
    items = hf_items(model)
    if limit is None:
        assert listing(folder) == ["config.json", "model.safetensors"], listing(folder)
        check_file(os.path.join(folder, "model.safetensors"), items)
        got = st.read_hf_folder(folder)
    else:
        got = check_sharded(folder, items, limit, extra_files=["config.json"])
    assert list(got.tensors) == [n for n, _ in items]
    assert_config(os.path.join(folder, "config.json"), want_config)
    return got


def diff_report(a, b, *flags):
    """diff --json; exit 0 exactly when it says equal, 1 otherwise."""
    proc = run_raw(["diff", a, b, "--json"] + list(flags))
    assert proc.returncode in (0, 1), f"diff {a} {b}: exit {proc.returncode}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    assert (proc.returncode == 0) == report["equal"], (proc.returncode, report)
    return report


def flip_first_byte(path, name):
    """Changes the first byte of tensor `name`'s data (a mantissa bit in every float dtype)."""
    (entry,) = [e for e in st.header(path) if e["name"] == name]
    assert entry["end"] > entry["begin"]
    with open(path, "r+b") as f:
        f.seek(entry["file_offset"])
        b = f.read(1)
        f.seek(entry["file_offset"])
        f.write(bytes([b[0] ^ 0x40]))


def edited_singleton(case, work, cfg_edit=None, model_edit=None):
    """The case's expected consolidated checkpoint with its cfg / model edited, saved as
    a singleton input; returns (path, the edited checkpoint)."""
    ckpt = ckptcheck.load(os.path.join(harness.fixtures()[case], "expected", "consolidated.pt"))
    if cfg_edit:
        cfg_edit(ckpt["cfg"].model if OmegaConf is not None and isinstance(ckpt["cfg"], DictConfig)
                 else ckpt["cfg"]["model"])
    if model_edit:
        model_edit(ckpt["model"])
    path = os.path.join(work, "input.pt")
    torch.save(ckpt, path)
    return path, ckpt


def cfg_del(section, key):
    if isinstance(section, argparse.Namespace):
        delattr(section, key)
    else:
        section.pop(key)


def cfg_set(section, key, value):
    if isinstance(section, argparse.Namespace):
        setattr(section, key, value)
    else:
        section[key] = value


def plain(obj):
    """A cfg as plain containers: DictConfig -> OmegaConf.to_container, Namespace -> vars."""
    if OmegaConf is not None and isinstance(obj, (DictConfig, ListConfig)):
        return plain(OmegaConf.to_container(obj))
    if isinstance(obj, argparse.Namespace):
        return plain(vars(obj))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def load_weights_only(path):
    """torch.load(path, weights_only=True). torch 1.13's weights-only unpickler refuses
    every Python float (pickle's BINFLOAT, "Unsupported operand 71", pytorch#94670, fixed
    in torch 2.0), so a cfg of floats (dropout 0.1) cannot pass it there whatever the
    writer does. On that refusal alone the file is loaded again by torch 1.13's own
    unpickler with the one branch torch 2.0 added, BINFLOAT: every other rule (opcodes,
    allowed globals, what BUILD may touch) is torch's."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if f"Unsupported operand {pickle.BINFLOAT[0]}" not in str(e):
            raise AssertionError(f"{path}: torch.load(weights_only=True) refuses it: {e}") from None
    from torch import _weights_only_unpickler as wu
    source = inspect.getsource(wu)
    anchor = "            elif key[0] == BININT[0]:"
    assert source.count(anchor) == 1, "torch's weights-only unpickler changed: update this test"
    patched = source.replace(anchor, "            elif key[0] == 71:  # BINFLOAT, as torch 2.0 reads it\n"
                                     "                self.append(unpack('>d', read(8))[0])\n" + anchor)
    module = types.ModuleType("weights_only_with_binfloat")
    exec(compile(patched, wu.__file__, "exec"), module.__dict__)
    return torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)


def assert_plain_equal(got, want, path="cfg"):
    if isinstance(want, dict):
        assert type(got) in (dict, OrderedDict), f"{path}: {type(got).__name__}, not a plain dict"
        assert set(got) == set(want), f"{path}: keys {sorted(map(str, got))} != {sorted(map(str, want))}"
        for k in want:
            assert_plain_equal(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert type(got) in (list, tuple) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_plain_equal(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want) and (got == want or got != got and want != want), \
            f"{path}: {got!r} ({type(got).__name__}) != {want!r} ({type(want).__name__})"


# ----------------------------------------------------------------- the reader itself

def test_reader_self_check():
    # correct files read back bit for bit; each broken rule (hostile headers included) refused
    assert st.self_test()


# ----------------------------------------------------------------- --format safetensors

def test_safetensors_for_every_case():
    cases = harness.fixtures()
    assert len(cases) == 8, sorted(cases)
    for name, folder in cases.items():
        model = torch_stitch(folder)["model"]
        items = without_ties(model)
        assert [n for n in model if n not in dict(items)] == [TIED_DST], name  # the fixtures' one tie
        work = harness.scratch("export-st-" + name)
        out = os.path.join(work, "model.safetensors")
        stitch([folder, "--format", "safetensors", "-o", out])
        assert listing(work) == ["model.safetensors"], listing(work)
        check_file(out, items)


def test_safetensors_from_manifest_glob_and_singleton():
    folder = harness.fixtures()["mp2_dp8_fp16_ns_opt"]
    work = harness.scratch("export-st-inputs")
    by_dir = os.path.join(work, "dir.safetensors")
    stitch([folder, "--format", "safetensors", "-o", by_dir])
    check_file(by_dir, without_ties(torch_stitch(folder)["model"]))
    manifest = os.path.join(work, "m.json")
    harness.run(["manifest", folder, "-o", manifest])
    stitch([manifest, "--format", "safetensors", "-o", os.path.join(work, "manifest.safetensors")])
    stitch([os.path.join(folder, "*.pt"), "--format", "safetensors", "-o", os.path.join(work, "glob.safetensors")])
    stitch([os.path.join(folder, "expected", "consolidated.pt"), "--format", "safetensors",
            "-o", os.path.join(work, "single.safetensors")])
    want = open(by_dir, "rb").read()
    for other in ("manifest", "glob", "single"):
        assert open(os.path.join(work, other + ".safetensors"), "rb").read() == want, other


def test_safetensors_dtype_conversion():
    for name, flag in (("mp2_dp2_fp16_omega_opt", "bf16"), ("mp1_dp3_bf16_ns_opt", "fp16"),
                       ("mp2_dp3_fp32_ns_args", "bf16"), ("mp4_dp2_bf16_omega_opt", "fp32")):
        folder = harness.fixtures()[name]
        model = torch_stitch(folder, ("--dtype", flag))["model"]
        assert all(t.dtype == DTYPE_FLAG[flag] for t in model.values()), name  # decoder.version too
        out = os.path.join(harness.scratch(f"export-st-dtype-{name}"), "model.safetensors")
        stitch([folder, "--format", "safetensors", "--dtype", flag, "-o", out])
        check_file(out, without_ties(model))


def test_safetensors_dtypes_ties_and_data_order():
    # every written dtype, a 0-d tensor, empty tensors, NaN / -0.0, a tie whose alias comes
    # later, and two views of one storage (not a tie: both written)
    work = harness.scratch("export-st-mixed")
    base = torch.arange(8, dtype=torch.float32) - 3.5
    m = OrderedDict()
    m["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    m["view_lo"] = base[:4]
    m["f16"] = torch.tensor([1.5, -0.0, float("nan"), 65504.0]).half()
    m["emb"] = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    m["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
    m["view_hi"] = base[4:]
    m["head"] = m["emb"]
    m["flag"] = torch.tensor([True, False, True])
    m["u8"] = torch.tensor([0, 200, 255], dtype=torch.uint8)
    m["scalar"] = torch.tensor(2 ** 40 + 7)
    m["empty"] = torch.zeros(0, 3)
    m["bf16"] = torch.tensor([0.1, -2.0, float("inf")]).bfloat16()
    m["i32"] = torch.tensor([[1, -1], [2 ** 31 - 1, -2 ** 31]], dtype=torch.int32)
    m["empty_i16"] = torch.zeros(2, 0, dtype=torch.int16)
    m["steps"] = torch.tensor([5], dtype=torch.int64)
    src = os.path.join(work, "mixed.pt")
    torch.save({"model": m, "cfg": {"note": "not exported"}}, src)
    model = torch_stitch(src)["model"]
    items = without_ties(model)
    assert [n for n, _ in items] == [n for n in m if n != "head"]
    out = os.path.join(work, "mixed.safetensors")
    stitch([src, "--format", "safetensors", "-o", out])
    tensors = check_file(out, items)
    assert [n for n, _ in tensors] == ["emb", "scalar", "steps", "view_lo", "view_hi", "empty", "i32", "f16", "i16",
                                       "bf16", "empty_i16", "i8", "flag", "u8"]
    dtypes = {e["name"]: e["dtype"] for e in st.header(out)}
    assert dtypes == {"emb": "F64", "scalar": "I64", "steps": "I64", "view_lo": "F32", "view_hi": "F32", "i32": "I32",
                      "empty": "F32", "f16": "F16", "i16": "I16", "bf16": "BF16", "empty_i16": "I16", "i8": "I8",
                      "flag": "BOOL", "u8": "U8"}, dtypes
    assert {e["name"]: e["shape"] for e in st.header(out)}["scalar"] == []


# ----------------------------------------------------------------- --max-shard-size

def test_max_shard_size_shards_in_state_dict_order():
    # (case, size as spelled, in bytes): every case has a tensor larger than the limit
    for name, spelled, limit in (("mp4_dp2_bf16_omega_opt", "200", 200), ("mp2_dp2_fp16_omega_opt", "60", 60),
                                 ("mp1_dp8_bf16_omega_opt", "30", 30)):
        folder = harness.fixtures()[name]
        items = without_ties(torch_stitch(folder)["model"])
        assert any(nbytes(t) > limit for _, t in items), name
        work = harness.scratch("export-shards-" + name)
        stitch([folder, "--format", "safetensors", "--max-shard-size", spelled, "-o",
                os.path.join(work, "model.safetensors")])
        got = check_sharded(work, items, limit)
        for file_name, metadata in got.metadata.items():
            assert metadata is not None and metadata.get("format") == "pt", (file_name, metadata)
        # everything in one shard: model.safetensors alone, no index
        single = harness.scratch("export-shards-one-" + name)
        stitch([folder, "--format", "safetensors", "--max-shard-size", "5GB", "-o",
                os.path.join(single, "model.safetensors")])
        assert listing(single) == ["model.safetensors"], listing(single)
        check_file(os.path.join(single, "model.safetensors"), items)


def test_max_shard_size_spellings():
    # two fp32 tensors of 600 and 408 bytes: 1008 in all
    work = harness.scratch("export-spellings")
    src = os.path.join(work, "two.pt")
    m = OrderedDict(a=torch.arange(150, dtype=torch.float32), b=torch.arange(102, dtype=torch.float32) * -1)
    torch.save({"model": m}, src)
    items = list(m.items())
    for spelled, limit in (("1KB", 1000), ("1KiB", 1024), ("1008", 1008), ("1007", 1007), ("5GB", 5 * 10 ** 9),
                           ("1MiB", 2 ** 20), ("500", 500), ("10KB", 10000), ("500MB", 500 * 10 ** 6)):
        out = harness.scratch("export-spelling-" + spelled)
        stitch([src, "--format", "safetensors", "--max-shard-size", spelled, "-o",
                os.path.join(out, "model.safetensors")])
        if sum(nbytes(t) for _, t in items) <= limit:
            assert listing(out) == ["model.safetensors"], (spelled, listing(out))
            check_file(os.path.join(out, "model.safetensors"), items)
        else:
            check_sharded(out, items, limit)
    for bad in ("abc", "12QB", "-5", "KB"):
        out = harness.scratch("export-spelling-bad")
        refused(["stitch", "-q", src, "--format", "safetensors", "--max-shard-size", bad, "-o",
                 os.path.join(out, "model.safetensors")])
        assert listing(out) == [], (bad, listing(out))


# ----------------------------------------------------------------- --format hf

def test_hf_folder_for_every_case():
    for name, folder in harness.fixtures().items():
        ckpt = torch_stitch(folder)
        model = ckpt["model"]
        dtype = model[TIED_SRC].dtype
        out = os.path.join(harness.scratch("export-hf-" + name), "hf")  # missing: created
        stitch([folder, "--format", "hf", "-o", out])
        got = check_hf_folder(out, model, expected_config(ckpt, model, dtype))
        assert not any(n.endswith("decoder.version") or "output_projection" in n for n in got.tensors)
        assert "model.decoder.final_layer_norm.weight" in got.tensors and \
            "model.decoder.layers.0.final_layer_norm.weight" in got.tensors
        # diff maps the metaseq side's names with the same table: equal, every tensor compared
        report = diff_report(out, folder, "--names", "hf-opt")
        assert report["equal"] and not report["differing"] and not report["only_in_a"] and not report["only_in_b"], \
            (name, report)
        assert report["compared_tensors"] == len(got.tensors), (name, report["compared_tensors"], len(got.tensors))
        harness.run(["verify", out])
        harness.run(["inspect", out])


def test_hf_dtype_conversion():
    for name, flag in (("mp2_dp3_fp32_ns_args", "fp16"), ("mp2_dp2_fp16_omega_opt", "bf16"),
                       ("mp1_dp8_bf16_omega_opt", "fp32")):
        folder = harness.fixtures()[name]
        ckpt = torch_stitch(folder, ("--dtype", flag))
        out = os.path.join(harness.scratch(f"export-hf-dtype-{name}"), "hf")
        stitch([folder, "--format", "hf", "--dtype", flag, "-o", out])
        check_hf_folder(out, ckpt["model"], expected_config(ckpt, ckpt["model"], DTYPE_FLAG[flag]))


def test_hf_sharded_and_diff_names_a_changed_tensor():
    name = "mp4_dp2_bf16_omega_opt"
    folder = harness.fixtures()[name]
    ckpt = torch_stitch(folder)
    model = ckpt["model"]
    work = harness.scratch("export-hf-sharded")
    out = os.path.join(work, "hf")
    stitch([folder, "--format", "hf", "--max-shard-size", "300", "-o", out])
    got = check_hf_folder(out, model, expected_config(ckpt, model, torch.bfloat16), limit=300)
    assert len(got.files) > 2
    report = diff_report(out, folder, "--names", "hf-opt")
    assert report["equal"] and report["compared_tensors"] == len(got.tensors), report
    harness.run(["verify", out])
    harness.run(["inspect", out])
    # one byte of one tensor changed in a copy: diff names that tensor, and only it
    changed = os.path.join(work, "changed")
    shutil.copytree(out, changed)
    target = "model.decoder.layers.1.fc1.weight"
    flip_first_byte(os.path.join(changed, got.index["weight_map"][target]), target)
    report = diff_report(changed, folder, "--names", "hf-opt")
    assert not report["equal"] and [target in d["name"] for d in report["differing"]] == [True], report
    assert report["differing"][0]["count"] == 1, report
    stdout, _ = harness.run(["diff", changed, folder, "--names", "hf-opt"], expect=1)
    assert target in stdout, stdout


def test_hf_mapping_of_project_in_out_and_layer_norm():
    work = harness.scratch("export-hf-project")
    g = torch.Generator().manual_seed(11)

    def add_projections(model):
        e = model[TIED_SRC].shape[1]
        model["decoder.project_in_dim.weight"] = torch.randn(e, e, generator=g)
        model["decoder.project_out_dim.weight"] = torch.randn(e, e, generator=g)

    src, ckpt = edited_singleton("mp1_dp1_fp32_ns", work, model_edit=add_projections)
    model = torch_stitch(src)["model"]
    out = os.path.join(work, "hf")
    stitch([src, "--format", "hf", "-o", out])
    got = check_hf_folder(out, model, expected_config(ckpt, model, torch.float32))
    assert {"model.decoder.project_in.weight", "model.decoder.project_out.weight",
            "model.decoder.final_layer_norm.bias"} <= set(got.tensors)
    assert not any("project_in_dim" in n or "project_out_dim" in n or n.startswith("model.decoder.layer_norm")
                   for n in got.tensors)


def test_hf_unknown_key_is_refused():
    work = harness.scratch("export-hf-unknown")
    src, _ = edited_singleton("mp2_dp2_fp16_omega_opt", work,
                              model_edit=lambda m: m.__setitem__("mystery.weight", torch.ones(3).half()))
    out = os.path.join(work, "hf")
    err = one_line_error(["stitch", "-q", src, "--format", "hf", "-o", out])
    assert "mystery.weight" in err, err
    assert not os.path.exists(out) or listing(out) == [], listing(out)
    assert listing(work) in (["input.pt"], ["hf", "input.pt"])


def test_hf_config_flags_and_missing_fields():
    work = harness.scratch("export-hf-config")
    # A post-norm model with a final layer norm: transformers would never load it.
    src, ckpt = edited_singleton("mp1_dp1_fp32_ns", work, cfg_edit=lambda s: cfg_set(s, "decoder_normalize_before",
                                                                                      False))
    assert "never loads" in one_line_error(["stitch", "-q", src, "--format", "hf", "-o", os.path.join(work, "hf")])
    # Namespace cfg without decoder_attention_heads, post-norm as metaseq builds it (no final layer norm)
    def post_norm(model):
        for key in ("decoder.layer_norm.weight", "decoder.layer_norm.bias"):
            del model[key]
    src, ckpt = edited_singleton("mp1_dp1_fp32_ns", work, cfg_edit=lambda s: (
        cfg_del(s, "decoder_attention_heads"), cfg_set(s, "decoder_normalize_before", False)), model_edit=post_norm)
    model = torch_stitch(src)["model"]
    out = os.path.join(work, "hf")
    err = one_line_error(["stitch", "-q", src, "--format", "hf", "-o", out])
    assert "num_attention_heads" in err or "decoder_attention_heads" in err, err
    assert not os.path.exists(out) or listing(out) == [], listing(out)
    stitch([src, "--format", "hf", "-o", out, "--hf-config", "num_attention_heads=2"])
    want = expected_config(ckpt, model, torch.float32, {"num_attention_heads": 2})
    assert want["do_layer_norm_before"] is False
    check_hf_folder(out, model, want)

    # OmegaConf cfg without activation_fn
    src2, ckpt2 = edited_singleton("mp4_dp3_fp16_omega", harness.scratch("export-hf-config-omega"),
                                   cfg_edit=lambda s: cfg_del(s, "activation_fn"))
    out2 = os.path.join(os.path.dirname(src2), "hf")
    err = one_line_error(["stitch", "-q", src2, "--format", "hf", "-o", out2])
    assert "activation_function" in err or "activation_fn" in err, err
    assert not os.path.exists(out2) or listing(out2) == []
    stitch([src2, "--format", "hf", "-o", out2, "--hf-config", "activation_function=gelu"])
    model2 = torch_stitch(src2)["model"]
    check_hf_folder(out2, model2, expected_config(ckpt2, model2, torch.float16, {"activation_function": "gelu"}))

    # overrides and additions on a fixture: VALUE as JSON, else as a string
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    ckpt3 = torch_stitch(folder)
    out3 = os.path.join(harness.scratch("export-hf-config-flags"), "hf")
    flags = ["dropout=0.25", 'architectures=["OPTModel"]', "use_cache=false", "note=hello world", 'quoted="5"',
             "n=5", "eq=a=b", "pad_token_id=0", "nothing=null", 'nested={"a": [1, 2.5]}', "prefix=/tmp/x"]
    args = [folder, "--format", "hf", "-o", out3]
    for flag in flags:
        args += ["--hf-config", flag]
    stitch(args)
    overrides = {"dropout": 0.25, "architectures": ["OPTModel"], "use_cache": False, "note": "hello world",
                 "quoted": "5", "n": 5, "eq": "a=b", "pad_token_id": 0, "nested": {"a": [1, 2.5]}, "prefix": "/tmp/x"}
    got = check_hf_folder(out3, ckpt3["model"], expected_config(ckpt3, ckpt3["model"], torch.float16, overrides))
    config = json.load(open(os.path.join(out3, "config.json")))
    assert "nothing" in config and config["nothing"] is None, config
    assert len(got.tensors) == len(hf_items(ckpt3["model"]))


# ----------------------------------------------------------------- --weights-only

def test_weights_only_for_every_case():
    for name, folder in harness.fixtures().items():
        normal = torch_stitch(folder)
        out = os.path.join(harness.scratch("export-wo-" + name), "out.pt")
        stitch([folder, "--weights-only", "-o", out])
        loaded = load_weights_only(out)  # refuses any class but the plain ones
        # model and cfg; a top-level args Namespace dropped or kept as its plain vars
        assert isinstance(loaded, dict) and set(loaded) - {"args"} == {"model", "cfg"}, (name, list(loaded))
        assert list(loaded["model"]) == list(normal["model"]), name
        for key, t in normal["model"].items():
            assert_bits(loaded["model"][key], t, f"{name}: model/{key}")
        assert_plain_equal(loaded["cfg"], plain(normal["cfg"]))
        if "args" in loaded:
            assert "args" in normal, name
            assert_plain_equal(loaded["args"], plain(normal["args"]), "args")
        assert (name == "mp2_dp3_fp32_ns_args") == ("args" in normal)
    # --no-cfg: the state dict alone
    folder = harness.fixtures()["mp2_dp3_fp32_ns_args"]
    out = os.path.join(harness.scratch("export-wo-nocfg"), "out.pt")
    stitch([folder, "--weights-only", "--no-cfg", "-o", out])
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    assert set(loaded) == {"model"}, list(loaded)
    for key, t in torch_stitch(folder)["model"].items():
        assert_bits(loaded["model"][key], t, f"model/{key}")


# ----------------------------------------------------------------- inspect, diff, verify

def test_inspect_diff_verify_read_safetensors():
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    work = harness.scratch("export-read")
    pt = os.path.join(work, "out.pt")
    stitch([folder, "-o", pt])
    sf = os.path.join(work, "out.safetensors")
    stitch([folder, "--format", "safetensors", "-o", sf])
    names = [n for n, _ in without_ties(torch_stitch(folder)["model"])]
    stdout, _ = harness.run(["inspect", sf, "--tensors"])
    missing = [n for n in names if n not in stdout]
    assert not missing, (missing, stdout)
    harness.run(["inspect", sf, "--json"])
    stdout, _ = harness.run(["verify", sf])
    assert stdout.startswith("ok:"), stdout
    # the safetensors side against the torch file / the raw shards: tensors under model/,
    # the torch side's cfg and other objects not compared; the only name allowed on one
    # side alone is the tie's alias, which the safetensors file writes once
    for other in (pt, folder):
        for a, b, alone in ((sf, other, "only_in_b"), (other, sf, "only_in_a")):
            report = diff_report(a, b)
            assert not report["differing"] and not report["objects"], report
            assert report[alone] in ([], ["model/" + TIED_DST]), report
            assert not report["only_in_a" if alone == "only_in_b" else "only_in_b"], report
            assert report["compared_tensors"] >= len(names), report
    assert diff_report(sf, sf)["equal"]
    # a changed byte is found and named
    changed = os.path.join(work, "changed.safetensors")
    shutil.copy(sf, changed)
    flip_first_byte(changed, "decoder.layers.0.fc1.weight")
    report = diff_report(changed, pt)
    assert [d["name"] for d in report["differing"]] == ["model/decoder.layers.0.fc1.weight"], report
    # an HF folder of one file, with its config.json
    hf = os.path.join(work, "hf")
    stitch([folder, "--format", "hf", "-o", hf])
    harness.run(["inspect", hf])
    harness.run(["verify", hf])
    assert diff_report(hf, hf)["equal"]


def test_hostile_headers_are_one_line_errors():
    work = harness.scratch("export-hostile")
    # the baseline: a correct file, written here from the specification, is read
    good = st.write(os.path.join(work, "good.safetensors"),
                    [("dense.weight_x", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
                     ("dense.bias_y", torch.ones(3).half()), ("mask_z", torch.tensor([True, False]))], {"format": "pt"})
    stdout, _ = harness.run(["inspect", good, "--tensors"])
    assert all(n in stdout for n in ("dense.weight_x", "dense.bias_y", "mask_z")), stdout
    harness.run(["verify", good])
    harness.run(["diff", good, good])
    for label, (data, reason) in st.hostile_files().items():
        path = os.path.join(work, f"bad-{label}.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        try:  # the file breaks the rule it is meant to break
            st.read(path)
            raise RuntimeError(f"{label}: the reader accepts it")
        except AssertionError as e:
            assert reason in str(e), (label, e)
        err = one_line_error(["inspect", path])
        assert os.path.basename(path) in err, (label, err)
        err = one_line_error(["inspect", path, "--tensors", "--json"])
        assert os.path.basename(path) in err, (label, err)
        proc = run_raw(["verify", path])
        assert proc.returncode == 1 and os.path.basename(path) in proc.stdout + proc.stderr, (label, proc)
        proc = run_raw(["diff", path, path])
        assert proc.returncode == 2 and os.path.basename(path) in proc.stderr, (label, proc)


# ----------------------------------------------------------------- dry run, existing outputs

def test_dry_run_writes_nothing():
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    work = harness.scratch("export-dry")
    for args in (["--format", "safetensors", "-o", os.path.join(work, "model.safetensors")],
                 ["--format", "safetensors", "--max-shard-size", "100", "-o", os.path.join(work, "model.safetensors")],
                 ["--format", "hf", "-o", os.path.join(work, "hf")],
                 ["--format", "hf", "--max-shard-size", "100", "-o", os.path.join(work, "hf")],
                 ["--weights-only", "-o", os.path.join(work, "out.pt")]):
        stdout, _ = stitch([folder, "--dry-run"] + args)
        assert listing(work) == [], (args, listing(work))
        assert "decoder.layers.0.fc1.weight" in stdout, (args, stdout)


def test_existing_outputs_are_kept():
    folder = harness.fixtures()["mp1_dp1_fp32_ns"]
    items = without_ties(torch_stitch(folder)["model"])
    # one safetensors file
    work = harness.scratch("export-keep")
    out = os.path.join(work, "model.safetensors")
    open(out, "w").write("precious")
    refused(["stitch", "-q", folder, "--format", "safetensors", "-o", out])
    assert open(out).read() == "precious" and listing(work) == ["model.safetensors"]
    stitch([folder, "--format", "safetensors", "-o", out, "--force"])
    assert listing(work) == ["model.safetensors"]
    check_file(out, items)
    # an index of an earlier sharded export
    work = harness.scratch("export-keep-index")
    index = os.path.join(work, st.INDEX_NAME)
    open(index, "w").write("precious")
    refused(["stitch", "-q", folder, "--format", "safetensors", "--max-shard-size", "100", "-o",
             os.path.join(work, "model.safetensors")])
    assert open(index).read() == "precious" and listing(work) == [st.INDEX_NAME], listing(work)
    stitch([folder, "--format", "safetensors", "--max-shard-size", "100", "-o", os.path.join(work, "model.safetensors"),
            "--force"])
    check_sharded(work, items, 100)
    # an HF folder with a config.json and a model.safetensors
    work = harness.scratch("export-keep-hf")
    hf = os.path.join(work, "hf")
    os.makedirs(hf)
    open(os.path.join(hf, "config.json"), "w").write("precious config")
    open(os.path.join(hf, "model.safetensors"), "w").write("precious weights")
    refused(["stitch", "-q", folder, "--format", "hf", "-o", hf])
    assert listing(hf) == ["config.json", "model.safetensors"]
    assert open(os.path.join(hf, "config.json")).read() == "precious config"
    assert open(os.path.join(hf, "model.safetensors")).read() == "precious weights"
    stitch([folder, "--format", "hf", "-o", hf, "--force"])
    ckpt = torch_stitch(folder)
    check_hf_folder(hf, ckpt["model"], expected_config(ckpt, ckpt["model"], torch.float32))
    # a weights-only torch file
    work = harness.scratch("export-keep-wo")
    out = os.path.join(work, "out.pt")
    open(out, "w").write("precious")
    refused(["stitch", "-q", folder, "--weights-only", "-o", out])
    assert open(out).read() == "precious" and listing(work) == ["out.pt"]


def test_found_by_the_black_box_review():
    """What a stranger broke in the first version, each now refused or right."""
    work = harness.scratch("export-black-box")
    case = "mp2_dp2_fp16_omega_opt"
    # 1. A tie pickled as two tensor objects over one storage (model.state_dict() does
    # that): stitch keeps one storage, safetensors one name, hf a tied head.
    def tie_by_view(model):
        model["decoder.output_projection.weight"] = model["decoder.embed_tokens.weight"].view(
            model["decoder.embed_tokens.weight"].shape)
    src, _ = edited_singleton(case, work, model_edit=tie_by_view)
    given = ckptcheck.load(src)["model"]  # the input really holds two tensor objects over one storage
    a, b = given["decoder.output_projection.weight"], given["decoder.embed_tokens.weight"]
    assert a is not b and a.data_ptr() == b.data_ptr()
    out = os.path.join(work, "tied.pt")
    stitch([src, "-o", out])
    model = ckptcheck.load(out)["model"]
    assert model["decoder.output_projection.weight"].data_ptr() == model["decoder.embed_tokens.weight"].data_ptr()
    st_path = os.path.join(work, "tied.safetensors")
    stitch([src, "-o", st_path])
    assert "decoder.output_projection.weight" not in dict(st.read(st_path)[0])
    hf = os.path.join(work, "hf")
    stitch([src, "--format", "hf", "-o", hf])
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["tie_word_embeddings"] is True and config["enable_bias"] is True, config
    assert not any(k.startswith("lm_head") for k, _ in st.read(os.path.join(hf, "model.safetensors"))[0])

    # 2. Another set's files beside the new one: refused, or removed with --force;
    # a folder holding both layouts is refused when read.
    raw = harness.fixtures()[case]
    stitch([raw, "--format", "hf", "--max-shard-size", "300", "-o", hf], expect=1)
    assert listing(hf) == ["config.json", "model.safetensors"]
    stitch([raw, "--format", "hf", "--max-shard-size", "300", "-o", hf, "--force"])
    assert "model.safetensors" not in listing(hf) and "model.safetensors.index.json" in listing(hf)
    shutil.copy(os.path.join(work, "tied.safetensors"), os.path.join(hf, "model.safetensors"))
    err = one_line_error(["inspect", hf])
    assert "both model.safetensors and model.safetensors.index.json" in err, err
    os.remove(os.path.join(hf, "model.safetensors"))
    # 3. The index is an input of its own.
    out_text, _ = harness.run(["inspect", os.path.join(hf, "model.safetensors.index.json")])
    assert "format: safetensors" in out_text, out_text
    harness.run(["diff", os.path.join(hf, "model.safetensors.index.json"), raw, "--names", "hf-opt"])

    # 4. Names safetensors or the split cannot hold: errors naming them, not internal errors.
    src, _ = edited_singleton(case, work, model_edit=lambda m: m.__setitem__("__metadata__", torch.ones(2)))
    assert "__metadata__" in one_line_error(["stitch", "-q", src, "-o", os.path.join(work, "m.safetensors")])
    def fused_and_split(model):
        k = model["decoder.layers.0.self_attn.k_proj.weight"]
        model["decoder.layers.0.self_attn.qkv_proj.weight"] = torch.cat([k, k, k])
    src, _ = edited_singleton(case, work, model_edit=fused_and_split)
    err = one_line_error(["stitch", "-q", src, "-o", os.path.join(work, "dup.pt")])
    assert "which the state dict holds already" in err, err
    assert not os.path.exists(os.path.join(work, "dup.pt"))

    # 5. --hf-config cannot contradict the weights; every missing field is named at once.
    err = one_line_error(["stitch", "-q", raw, "--format", "hf", "-o", os.path.join(work, "hf2"),
                          "--hf-config", "vocab_size=5"])
    assert "vocab_size" in err and "weights give 10" in err, err
    src, _ = edited_singleton(case, work, cfg_edit=lambda m: [cfg_del(m, k) for k in ("dropout", "activation_fn")])
    err = one_line_error(["stitch", "-q", src, "--format", "hf", "-o", os.path.join(work, "hf3")])
    assert "activation_function" in err and "dropout (" in err, err

    # 6. --weights-only: sets, bytes, enums and complex as plain values.
    ckpt = {"model": {"w": torch.ones(2)}, "cfg": {"model": {"s": {3}, "b": b"\x00\xff", "c": complex(1, 2)}}}
    src = os.path.join(work, "weird.pt")
    torch.save(ckpt, src)
    out = os.path.join(work, "weird-plain.pt")
    stitch([src, "--weights-only", "-o", out])
    cfg = load_weights_only(out)["cfg"]["model"]
    assert cfg == {"s": [3], "b": [0, 255], "c": (1.0, 2.0)}, cfg


def test_found_by_the_second_black_box_review():
    work = harness.scratch("export-black-box-2")
    case = "mp2_dp2_fp16_omega_opt"
    # 1. A view tie in a singleton is a tie for diff too, against what stitch wrote of it.
    def tie_by_view(model):
        embed = model["decoder.embed_tokens.weight"]
        model["decoder.output_projection.weight"] = embed.view(embed.shape)
    src, _ = edited_singleton(case, work, model_edit=tie_by_view)
    hf = os.path.join(work, "hf")
    stitch([src, "--format", "hf", "-o", hf])
    harness.run(["diff", hf, src, "--names", "hf-opt"])
    st_path = os.path.join(work, "m.safetensors")
    stitch([src, "-o", st_path])
    harness.run(["diff", st_path, src])

    # 2. Padding other than spaces is refused (a NUL ends nlohmann's reading early).
    raw = open(st_path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + n].rstrip(b" ")
    for pad, message in ((b"\0", "NUL byte"), (b"\n", "only spaces may pad it")):
        padded = text + pad * (n - len(text))
        bad = os.path.join(work, f"pad{pad[0]}.safetensors")
        open(bad, "wb").write(raw[:8] + padded + raw[8 + n:])
        assert message in one_line_error(["inspect", bad])

    # 3. Shards without their index (a run killed before writing it) are not read as a set.
    sharded = os.path.join(work, "sharded")
    stitch([harness.fixtures()[case], "--format", "hf", "--max-shard-size", "300", "-o", sharded])
    os.remove(os.path.join(sharded, "model.safetensors.index.json"))
    err = one_line_error(["inspect", sharded], expect=harness.EXIT["incomplete_set"])
    assert "no *.safetensors.index.json" in err, err
    one_line_error(["verify", sharded], expect=harness.EXIT["incomplete_set"])

    # 4. --hf-config cannot contradict what the weights hold, nor give a size as a float.
    raw_case = harness.fixtures()[case]
    for flag in ("enable_bias=false", "_remove_final_layer_norm=true", "vocab_size=10.0"):
        assert "weights give" in one_line_error(["stitch", "-q", raw_case, "--format", "hf", "-o",
                                                 os.path.join(work, "hf-x"), "--hf-config", flag]), flag
    err = one_line_error(["stitch", "-q", raw_case, "--format", "hf", "-o", os.path.join(work, "hf-y"),
                          "--hf-config", "do_layer_norm_before=false"])
    assert "never loads" in err, err
    stitch([raw_case, "--format", "hf", "-o", os.path.join(work, "hf-z"), "--hf-config", "vocab_size=10"])

    # 5. --weights-only keys stay hashable when their parts become lists.
    src = os.path.join(work, "keys.pt")
    torch.save({"model": {"w": torch.ones(1)}, "cfg": {(b"a", frozenset([2])): 1}}, src)
    out = os.path.join(work, "keys-plain.pt")
    stitch([src, "--weights-only", "-o", out])
    assert load_weights_only(out)["cfg"] == {((97,), (2,)): 1}


if __name__ == "__main__":
    harness.main([test_reader_self_check, test_safetensors_for_every_case,
                  test_safetensors_from_manifest_glob_and_singleton, test_safetensors_dtype_conversion,
                  test_safetensors_dtypes_ties_and_data_order, test_max_shard_size_shards_in_state_dict_order,
                  test_max_shard_size_spellings, test_hf_folder_for_every_case, test_hf_dtype_conversion,
                  test_hf_sharded_and_diff_names_a_changed_tensor,
                  test_hf_mapping_of_project_in_out_and_layer_norm, test_hf_unknown_key_is_refused,
                  test_hf_config_flags_and_missing_fields, test_weights_only_for_every_case,
                  test_inspect_diff_verify_read_safetensors, test_hostile_headers_are_one_line_errors,
                  test_dry_run_writes_nothing, test_existing_outputs_are_kept,
                  test_found_by_the_black_box_review, test_found_by_the_second_black_box_review])
