#!/usr/bin/python3
"""Issue 24: what a stranger found, each a one-line clear answer. Every input is
written here by torch (small, generated); every expectation is torch's reading of
the output, or the exact line a person reads."""
import collections
import json
import os
import re
import shutil
import struct
import subprocess
import warnings

import torch
import torch._utils

import harness
from harness import ckptcheck
import safetensors_check as st


def save(work, name, obj):
    path = os.path.join(work, name)
    torch.save(obj, path)
    return path


def run_raw(args):
    return subprocess.run([harness.TOOL] + [str(a) for a in args], capture_output=True, text=True)


def one_line_error(args, expect=1):
    """The one stderr line of a refused run, exit `expect`, nothing on stdout."""
    proc = run_raw(args)
    assert proc.returncode == expect, (args, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stderr.startswith("ckpt-tool: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def stitch(args, expect=0):
    return harness.run(["stitch", "--quiet"] + [str(a) for a in args], expect=expect)


def load_model(path):
    return ckptcheck.load(path)["model"]


# -------------------------------------------------------------------- item 1

def test_sparse_tensors_are_refused_by_every_command():
    work = harness.scratch("stranger-sparse")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    dense = torch.arange(4.0)
    for layout, sparse in (("torch.sparse_coo", torch.eye(3).to_sparse()),
                           ("torch.sparse_csr", torch.eye(3).to_sparse_csr())):
        path = save(work, f"{layout[6:]}.pt", {"model": {"dense": dense, "w": sparse}})
        name = os.path.basename(path)
        wanted = f"{name}: {name[:-3]}/data.pkl (model/w): a sparse tensor ({layout}): sparse layouts are not supported"

        def refuses(args, expect=1):
            err = one_line_error(args, expect)
            assert wanted in err, (args, err)

        refuses(["inspect", path])
        refuses(["inspect", path, "--json", "--tensors"])
        refuses(["diff", path, path], expect=2)  # diff's exit code for an error
        for command, out in (("stitch", "out.pt"), ("reshard", "re.pt"), ("manifest", "m.json")):
            target = os.path.join(work, out)
            extra = ["--mp", "1", "--dp", "1", "--unflatten"] if command == "reshard" else []
            refuses([command, path, "-o", target] + extra)
            assert not os.path.exists(target), command
        # verify reports it as its one problem (stdout), exit 1.
        proc = run_raw(["verify", "-q", path])
        assert proc.returncode == 1 and proc.stdout.count("\n") == 1 and wanted in proc.stdout, proc


# -------------------------------------------------------------------- item 2, 3

# torch >= 2.0 pickles a parameter with Python attributes through
# _rebuild_parameter_with_state; torch 1.13 has neither the function nor the
# behaviour, so the test gives it both (torch 2.x's own code).
def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    param = torch.nn.Parameter(data, requires_grad)
    param._backward_hooks = backward_hooks
    for key, value in state.items():
        setattr(param, key, value)
    return param


_rebuild_parameter_with_state.__module__ = "torch._utils"
torch._utils._rebuild_parameter_with_state = _rebuild_parameter_with_state


class ParameterWithState(torch.nn.Parameter):
    def __reduce_ex__(self, protocol):
        return (torch._utils._rebuild_parameter_with_state,
                (self.data, self.requires_grad, collections.OrderedDict(), dict(self.__dict__)))


def assert_same_values(a, b):
    """Key order, exact type (Tensor or Parameter), requires_grad, dtype and bits."""
    assert list(a) == list(b), (list(a), list(b))
    for key in a:
        x, y = a[key], b[key]
        assert type(x) is type(y) or (isinstance(x, torch.nn.Parameter) and isinstance(y, torch.nn.Parameter)), \
            (key, type(x), type(y))
        assert x.requires_grad == y.requires_grad, (key, x.requires_grad, y.requires_grad)
        assert x.dtype == y.dtype and torch.equal(x.detach(), y.detach()), key


def test_parameters_are_carried_as_parameters():
    work = harness.scratch("stranger-parameters")
    torch.manual_seed(24)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    net[1].bias.requires_grad_(False)
    params = dict(net.named_parameters())
    path = save(work, "params.pt", {"model": params})
    out = os.path.join(work, "out.pt")
    stitch([path, "-o", out])
    model = load_model(out)
    assert all(isinstance(v, torch.nn.Parameter) for v in model.values()), {k: type(v) for k, v in model.items()}
    assert_same_values(params, model)
    # The manifest and inspect say what they are; diff compares them as tensors.
    manifest = os.path.join(work, "m.json")
    harness.run(["manifest", path, "-o", manifest])
    listed = json.load(open(manifest))["tensor_lists"][0]
    assert [(t["path"], t.get("parameter"), t["requires_grad"]) for t in listed] == \
        [("model/" + k, "nn.Parameter", v.requires_grad) for k, v in params.items()], listed
    objects = json.loads(harness.run(["inspect", path, "--json"])[0])["objects"]
    assert all("$tensor" in v for v in objects["model"].values()), objects
    harness.run(["diff", path, out])
    harness.run(["stitch", "-q", manifest, "-o", os.path.join(work, "from-manifest.pt")])
    assert_same_values(params, load_model(os.path.join(work, "from-manifest.pt")))
    # reshard --unflatten writes them back as parameters too.
    resharded = os.path.join(work, "re.pt")
    harness.run(["reshard", "-q", path, "--mp", "1", "--dp", "1", "--unflatten", "-o", resharded])
    assert_same_values(params, load_model(resharded))
    # --weights-only keeps them: torch's weights-only loader rebuilds parameters.
    weights_only = os.path.join(work, "wo.pt")
    stitch([path, "-o", weights_only, "--weights-only"])
    assert_same_values(params, torch.load(weights_only, weights_only=True)["model"])

    # Parameters with Python attributes (torch >= 2.0's _rebuild_parameter_with_state).
    w = ParameterWithState(torch.randn(2, 3))
    w.tensor_model_parallel, w.partition_dim = True, 0
    b = ParameterWithState(torch.zeros(2), requires_grad=False)
    with_state = save(work, "with_state.pt", {"model": {"w": w, "b": b}})
    out = os.path.join(work, "with_state_out.pt")
    stitch([with_state, "-o", out])
    model = load_model(out)
    assert [type(v) for v in model.values()] == [torch.nn.Parameter] * 2, model
    assert model["w"].requires_grad and not model["b"].requires_grad
    assert model["w"].tensor_model_parallel is True and model["w"].partition_dim == 0, vars(model["w"])
    assert torch.equal(model["w"].detach(), w.detach())
    listed = json.loads(harness.run(["inspect", with_state, "--json", "--tensors"])[0])["tensors"]
    assert [t["path"] for t in listed] == ["model/w", "model/b"], listed


def test_requires_grad_of_a_plain_tensor_is_kept():
    work = harness.scratch("stranger-requires-grad")
    tensors = {"w": torch.ones(2, 3, requires_grad=True), "b": torch.zeros(3)}
    path = save(work, "rg.pt", {"model": tensors})
    for command in (["stitch", "-q", path, "-o", os.path.join(work, "s.pt")],
                    ["reshard", "-q", path, "--mp", "1", "--dp", "1", "--unflatten", "-o", os.path.join(work, "r.pt")]):
        harness.run(command)
        model = load_model(command[command.index("-o") + 1])
        assert [type(v) for v in model.values()] == [torch.Tensor] * 2
        assert model["w"].requires_grad and not model["b"].requires_grad, command
        assert_same_values(tensors, model)
    # --dtype converts, and keeps the flag.
    harness.run(["stitch", "-q", path, "-o", os.path.join(work, "h.pt"), "--dtype", "fp16"])
    model = load_model(os.path.join(work, "h.pt"))
    assert model["w"].dtype == torch.float16 and model["w"].requires_grad


# -------------------------------------------------------------------- item 4

def test_the_root_keeps_its_type():
    work = harness.scratch("stranger-root")
    root = collections.OrderedDict([("model", {"w": torch.ones(2)}), ("cfg", {"lr": 0.1})])
    out = os.path.join(work, "out.pt")
    stitch([save(work, "od.pt", root), "-o", out])
    loaded = ckptcheck.load(out)
    assert type(loaded) is collections.OrderedDict and list(loaded) == ["model", "cfg"], type(loaded)
    harness.run(["reshard", "-q", os.path.join(work, "od.pt"), "--mp", "1", "--dp", "1", "--unflatten", "-o",
                 os.path.join(work, "re.pt")])
    assert type(ckptcheck.load(os.path.join(work, "re.pt"))) is collections.OrderedDict
    stitch([save(work, "dict.pt", dict(root)), "-o", os.path.join(work, "dict-out.pt")])
    assert type(ckptcheck.load(os.path.join(work, "dict-out.pt"))) is dict


# -------------------------------------------------------------------- item 5

def test_a_header_that_is_not_utf8_json_is_one_escaped_line():
    work = harness.scratch("stranger-header")
    entry = b':{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    # The header's text starts at file byte 8: '{' 8, '"' 9, the key's first byte 10.
    cases = [
        (b'{"a\xe2\x82"' + entry, 11, r"invalid UTF-8 sequence \xe2\x82\x22"),
        (b'{"\xff"' + entry, 10, r"byte \xff begins no UTF-8 sequence"),
        (b'{"a":"\xf0\x9f\x98', 14, r"the UTF-8 sequence \xf0\x9f\x98 is cut short"),
        (b'{"a\x1b[31m"' + entry, 11, r"control byte \x1b"),
    ]
    for i, (header, byte, reason) in enumerate(cases):
        path = os.path.join(work, f"bad{i}.safetensors")
        with open(path, "wb") as f:
            f.write(st.assemble(header))
        for command in (["inspect", path], ["diff", path, path], ["verify", path]):
            proc = run_raw(command)
            text = proc.stderr if command[0] != "verify" else proc.stdout.splitlines()[0] + "\n"
            assert f"bad{i}.safetensors: header is not valid UTF-8 JSON at byte {byte}: {reason}" in text, \
                (command, text)
            assert proc.returncode == (2 if command[0] == "diff" else 1), (command, proc.returncode)
            # Nothing of nlohmann's own words, no raw byte: one printable ASCII line.
            assert "parse_error" not in text and "syntax error" not in text, text
            assert all(0x20 <= ord(c) < 0x7f for c in text.rstrip("\n")), repr(text)


# -------------------------------------------------------------------- item 6

def tiny_opt(seed, layers=2, embed=4, vocab=8, positions=6):
    """A metaseq OPT state dict (separate k, v, q, tied output projection) and the
    same weights under transformers' names."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    metaseq = collections.OrderedDict()
    metaseq["decoder.embed_tokens.weight"] = r(vocab, embed)
    metaseq["decoder.embed_positions.weight"] = r(positions + 2, embed)
    for i in range(layers):
        p = f"decoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            metaseq[f"{p}.self_attn.{proj}.weight"] = r(embed, embed)
            metaseq[f"{p}.self_attn.{proj}.bias"] = r(embed)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            metaseq[f"{p}.{norm}.weight"] = r(embed)
            metaseq[f"{p}.{norm}.bias"] = r(embed)
        metaseq[f"{p}.fc1.weight"], metaseq[f"{p}.fc1.bias"] = r(2 * embed, embed), r(2 * embed)
        metaseq[f"{p}.fc2.weight"], metaseq[f"{p}.fc2.bias"] = r(embed, 2 * embed), r(embed)
    metaseq["decoder.layer_norm.weight"], metaseq["decoder.layer_norm.bias"] = r(embed), r(embed)
    hf = collections.OrderedDict()
    for key, value in metaseq.items():
        hf["model." + key.replace("decoder.layer_norm.", "decoder.final_layer_norm.")] = value
    metaseq["decoder.output_projection.weight"] = metaseq["decoder.embed_tokens.weight"]
    return metaseq, hf


def test_diff_of_hf_names_against_metaseq_names_says_to_use_names_hf_opt():
    work = harness.scratch("stranger-hf-names")
    metaseq, hf = tiny_opt(6)
    torch_side = save(work, "consolidated.pt", {"model": metaseq})
    folder = os.path.join(work, "hf")
    os.makedirs(folder)
    st.write(os.path.join(folder, "model.safetensors"), hf, {"format": "pt"})
    for a, b, only_a, only_b in ((folder, torch_side, len(hf), len(metaseq) - 1),
                                 (torch_side, folder, len(metaseq) - 1, len(hf))):
        out, _ = harness.run(["diff", a, b], expect=1)
        assert out == (f"different: no tensor name is on both sides ({only_a} only in A, {only_b} only in B), "
                       f"but {len(hf)} pair under transformers' OPT names: add --names hf-opt to compare a "
                       f"Hugging Face folder with metaseq files\n"), out
        report = json.loads(harness.run(["diff", a, b, "--json"], expect=1)[0])
        assert "--names hf-opt" in report["hint"] and report["compared_tensors"] == 0, report
        harness.run(["diff", a, b, "--names", "hf-opt"])
    # Against metaseq's FSDP shards too (the fixture generator's), through stitch's HF export.
    shards = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    exported = os.path.join(work, "exported")
    stitch([shards, "--format", "hf", "-o", exported])
    out, _ = harness.run(["diff", exported, shards], expect=1)
    assert out.count("\n") == 1 and "add --names hf-opt" in out, out
    # No hint where the mapping would pair nothing, or where names do pair.
    other = os.path.join(work, "other.safetensors")
    st.write(other, {"x": torch.ones(2)})
    out, _ = harness.run(["diff", other, torch_side], expect=1)
    assert "--names hf-opt" not in out and "only in A: model/x" in out, out
    edited = dict(hf)
    edited["model.decoder.layers.0.fc1.bias"] = edited["model.decoder.layers.0.fc1.bias"] + 1
    st.write(os.path.join(work, "edited.safetensors"), edited)
    out, _ = harness.run(["diff", os.path.join(work, "edited.safetensors"), folder], expect=1)
    assert "--names hf-opt" not in out and "1 differ" in out, out


# -------------------------------------------------------------------- item 7

def test_every_stitch_flag_is_documented_in_the_readme():
    help_text, _ = harness.run(["stitch", "--help"])
    flags = set(re.findall(r"^\s+(?:-\w,\s*)?(--[a-z][a-z-]*)", help_text, re.MULTILINE)) - {"--help"}
    assert "--ema" in flags, flags
    readme = open(os.path.join(harness.SOURCE_ROOT, "README.md")).read()
    section = readme[readme.index("### `ckpt-tool stitch"):readme.index("### `ckpt-tool reshard")]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    missing = [f for f in sorted(flags) if not any(f"`{f}" in row or f", {f}" in row for row in table)]
    assert not missing, f"stitch flags not in the README's table: {missing}"


# -------------------------------------------------------------------- item 8

def test_inspect_of_a_wide_grid_fits_a_terminal():
    work = harness.scratch("stranger-wide-grid")
    grid = os.path.join(work, "grid")
    small = ["--layers", "1", "--embed-dim", "8", "--ffn-dim", "16", "--vocab", "64"]
    harness.run(["synth", "-q", "-o", grid, "--mp", "2", "--dp", "24"] + small)
    # A shard of another model (a larger vocabulary) in part 1, and a missing one in part 0.
    other = os.path.join(work, "other")
    harness.run(["synth", "-q", "-o", other, "--mp", "2", "--dp", "24", "--layers", "1", "--embed-dim", "8",
                 "--ffn-dim", "16", "--vocab", "65536"])
    shutil.copy(os.path.join(other, "checkpoint_last-model_part-1-shard7.pt"), grid)
    os.remove(os.path.join(grid, "checkpoint_last-model_part-0-shard5.pt"))
    out, _ = harness.run(["inspect", grid])
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("grid: "))
    assert lines[at] == "grid: 2 model-parallel part(s) x 24 data-parallel shard(s), FSDP-flattened", lines[at]
    part0, part1, note = lines[at + 1:at + 4]
    sizes = r"([\d.]+ KiB each|[\d.]+ KiB to [\d.]+ KiB)"
    assert re.fullmatch(r"  part0   23 of 24 shards, " + sizes + "; stand out: shard5 MISSING", part0), part0
    assert re.fullmatch(r"  part1   24 shards, [\d.]+ KiB to [\d.]+ KiB; stand out: shard7 [\d.]+ KiB", part1), part1
    assert note == "  (a line per part; --wide shows every shard's size)", note
    assert max(len(line) for line in lines[:at + 4]) <= 100, lines[:at + 4]
    # --wide keeps the whole table; --json gives every size.
    wide, _ = harness.run(["inspect", grid, "--wide"])
    header, row0, row1 = wide.splitlines()[at + 1:at + 4]
    assert header.split() == [f"shard{d}" for d in range(24)], header
    sizes = {name: os.path.getsize(os.path.join(grid, name)) for name in os.listdir(grid)}
    assert row0.split()[0] == "part0" and row0.count("MISSING") == 1 and len(row1.split()) == 1 + 2 * 24, row1
    report = json.loads(harness.run(["inspect", grid, "--json"])[0])
    table = report["grid"]["size_bytes"]
    assert table[0][5] is None and table[1][7] == sizes["checkpoint_last-model_part-1-shard7.pt"], table
    assert table[0][0] == sizes["checkpoint_last-model_part-0-shard0.pt"]
    # A small grid keeps its table.
    small_grid = os.path.join(work, "small")
    harness.run(["synth", "-q", "-o", small_grid, "--mp", "2", "--dp", "3"] + small)
    out, _ = harness.run(["inspect", small_grid])
    assert "       shard0    shard1    shard2" in out and "--wide" not in out, out


# -------------------------------------------------------------------- item 9

def test_diff_counts_add_up():
    work = harness.scratch("stranger-diff-counts")
    a = save(work, "a.pt", {"same": torch.ones(3), "value": torch.zeros(2), "shape": torch.ones(2, 3),
                            "dtype": torch.ones(2)})
    b = save(work, "b.pt", {"same": torch.ones(3), "value": torch.ones(2), "shape": torch.ones(3, 2),
                            "dtype": torch.ones(2, dtype=torch.float64)})
    out, _ = harness.run(["diff", a, b], expect=1)
    last = out.splitlines()[-1]
    assert re.fullmatch(r"different: 2 tensors compared \(20 B tensor bytes in A\) in [\d.]+ s; 1 differ, "
                        r"2 not comparable \(shape/dtype\), 0 only in A, 0 only in B", last), last
    report = json.loads(harness.run(["diff", a, b, "--json"], expect=1)[0])
    assert report["compared_tensors"] + report["not_comparable_tensors"] == 4, report
    assert len(report["differing"]) == 3
    out, _ = harness.run(["diff", a, a])
    assert "not comparable" not in out and out.rstrip().endswith("0 differ, 0 only in A, 0 only in B"), out


def test_floats_print_as_python_prints_them():
    work = harness.scratch("stranger-floats")
    cases = [(torch.bfloat16, 100.0, 101.0, "100.0", "101.0"),
             (torch.float16, 2048.0, 2050.0, "2048.0", "2050.0"),
             (torch.float32, 1e-5, 2e-5, "1e-05", "2e-05"),
             (torch.float64, 1e16, 123456789.0, repr(1e16), repr(123456789.0)),
             (torch.float64, 0.0001, -2.5e-3, repr(0.0001), repr(-2.5e-3))]
    for dtype, x, y, text_x, text_y in cases:
        a = save(work, "a.pt", {"t": torch.tensor([x], dtype=dtype)})
        b = save(work, "b.pt", {"t": torch.tensor([y], dtype=dtype)})
        out, _ = harness.run(["diff", a, b], expect=1)
        assert f"  t (0,): {text_x} != {text_y}\n" in out, (dtype, out)
        # What is printed reads back as the same value of the dtype.
        assert torch.tensor(float(text_x), dtype=torch.float64).to(dtype).item() == \
            torch.tensor([x], dtype=dtype).item()


def test_summaries_say_what_was_written_and_checked():
    work = harness.scratch("stranger-summaries")
    metaseq, _ = tiny_opt(9)
    path = save(work, "c.pt", {"model": metaseq})
    rate = r"( \(\d+\.\d (B|KiB|MiB|GiB|TiB)/s\))?"  # a rate only when measured, never "0 MiB/s"
    for out in ("m.safetensors", "m.pt"):
        _, err = harness.run(["stitch", path, "-o", os.path.join(work, out)])
        err = "".join(line for line in err.splitlines(True) if not line.startswith("ckpt-tool: note: "))  # ties
        # the whole command's time, then its parts (the copy's rate only when measured)
        assert re.fullmatch(r"wrote 1 file\(s\), [\d.]+ (B|KiB) in [\d.]+ s \(reading and planning [\d.]+ s, "
                            r"writing [\d.]+ s( at \d+\.\d (B|KiB|MiB|GiB|TiB)/s)?\)"
                            r"; inputs checked against their CRC-32\n", err), err
        assert "(0 MiB/s)" not in err
    out, err = harness.run(["verify", os.path.join(work, "m.safetensors")])
    assert re.fullmatch(r"ok: 1 file\(s\), \d+ record\(s\), 1 safetensors header\(s\) checked in [\d.]+ s; "
                        r"0 problem\(s\)\n", out), out
    assert "0 B checked" not in out and "MiB/s" not in out
    out, _ = harness.run(["verify", os.path.join(work, "m.pt")])
    assert re.fullmatch(r"ok: 1 file\(s\), \d+ record\(s\), [\d.]+ KiB of record data checked in [\d.]+ s" + rate +
                        r"; 0 problem\(s\)\n", out), out


def test_max_positions_states_its_real_range():
    work = harness.scratch("stranger-max-positions")
    help_text, _ = harness.run(["diff", "--help"])
    assert "--max-positions UINT:UINT in [0 - 100000]" in help_text and "at most 100000" in help_text, help_text
    _, err = harness.run(["diff", "a", "b", "--max-positions", "100001"], expect=2)
    assert "not in range 0 to 100000" in err, err
    # 6M float32 elements: two 16 MiB chunks. Differences in the second chunk only, then
    # in both: the positions are the first ones in row-major order, as many as asked.
    n = 6_000_000
    a = torch.zeros(n)
    b = a.clone()
    b[5_000_000:5_000_010] = 1
    pa, pb = save(work, "a.pt", {"t": a}), save(work, "b.pt", {"t": b})
    report = json.loads(harness.run(["diff", pa, pb, "--json", "--max-positions", "4"], expect=1)[0])
    assert [p["index"][0] for p in report["differing"][0]["positions"]] == list(range(5_000_000, 5_000_004))
    b[1:3] = 2
    pb = save(work, "b.pt", {"t": b})
    report = json.loads(harness.run(["diff", pa, pb, "--json", "--max-positions", "5"], expect=1)[0])
    assert [p["index"][0] for p in report["differing"][0]["positions"]] == [1, 2, 5_000_000, 5_000_001, 5_000_002]
    assert report["differing"][0]["count"] == 12
    everywhere = save(work, "c.pt", {"t": torch.ones(n)})
    report = json.loads(harness.run(["diff", pa, everywhere, "--json", "--max-positions", "100000"], expect=1)[0])
    positions = report["differing"][0]["positions"]
    assert len(positions) == 100000 and positions[-1]["index"] == [99999], len(positions)


def test_qkv_split_keeps_a_modules_order_through_reshard_and_back():
    work = harness.scratch("stranger-qkv-order")
    metaseq, _ = tiny_opt(3)
    single = save(work, "single.pt", {"model": metaseq})
    first = os.path.join(work, "first.pt")
    stitch([single, "-o", first])
    order = list(load_model(first))
    assert order == list(metaseq), order
    parts = os.path.join(work, "reshard-model_part-{m}.pt")
    harness.run(["reshard", "-q", first, "--mp", "2", "--dp", "1", "--unflatten", "-o", parts])
    fused = list(load_model(parts.format(m=0)))
    assert fused[2:4] == ["decoder.layers.0.self_attn.qkv_proj.weight", "decoder.layers.0.self_attn.qkv_proj.bias"]
    again = os.path.join(work, "again.pt")
    stitch([parts.format(m=0), parts.format(m=1), "-o", again])
    assert list(load_model(again)) == order
    harness.run(["diff", again, first])
    # The shards of a training run (fused qkv_proj) stitch in a module's order, and
    # --optimizer-state numbers its states by that order.
    shards = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    out = os.path.join(work, "with-state.pt")
    stitch([shards, "-o", out, "--optimizer-state"])
    loaded = ckptcheck.load(out)
    keys = list(loaded["model"])
    layer = [k for k in keys if k.startswith("decoder.layers.0.self_attn.") and "_proj." in k][:6]
    assert layer == [f"decoder.layers.0.self_attn.{p}_proj.{w}" for p in "kvq" for w in ("weight", "bias")], layer
    params = [k for k in keys if k not in ("decoder.output_projection.weight", "decoder.version")]
    states = loaded["last_optimizer_state"]["state"]
    assert len(states) == len(params)
    for i, key in enumerate(params):
        assert states[i]["exp_avg"].shape == loaded["model"][key].shape, (i, key)



# -------------------------------------------------------------------- the third stranger (issue 25)

class Outer:
    class Inner:
        def __init__(self):
            self.value = 7


def test_long_values_and_nested_classes_come_through_stitch():
    """F1: a str, bytes or big int past 16 KiB was read as the pickle's earlier strings run
    together, and stitch wrote that with exit 0. F4: a nested class pickled by protocol 4
    ("Outer.Inner") was written back under protocol 2, which torch.load cannot resolve."""
    work = harness.scratch("stranger-long-values")
    import __main__
    __main__.Outer = Outer  # the class as torch.save and torch.load see it
    Outer.__module__ = Outer.Inner.__module__ = "__main__"
    Outer.Inner.__qualname__ = "Outer.Inner"
    blob, text, big = bytes(range(256)) * 300, "ab\u00e9" * 9000, 7 ** 40000
    for protocol in (2, 4, 5):
        objects = {"blob": blob, "text": text, "big": big, "short": "s"}
        if protocol >= 4:
            objects["inner"] = Outer.Inner()
        path = os.path.join(work, f"p{protocol}.pt")
        torch.save({"model": {"w": torch.arange(6.0)}, **objects}, path, pickle_protocol=protocol)
        out = os.path.join(work, f"p{protocol}.out.pt")
        stitch([path, "-o", out, "--force"])
        got = ckptcheck.load(out)
        assert got["blob"] == blob and got["text"] == text and got["big"] == big and got["short"] == "s", protocol
        assert torch.equal(got["model"]["w"], torch.arange(6.0))
        if protocol >= 4:
            assert type(got["inner"]).__qualname__ == "Outer.Inner" and got["inner"].value == 7
        harness.run(["diff", path, out])


def test_a_nested_model_is_told_as_nested():
    """F11: a 'model' of nested dicts was "no 'model' state dict (top-level keys: model)"."""
    work = harness.scratch("stranger-nested-model")
    path = save(work, "nested.pt", {"model": {"a": {"b": {"w": torch.ones(2)}}}})
    message = one_line_error(["stitch", path, "-o", os.path.join(work, "out.pt")])
    assert "a 'model' that is not a flat state dict: its tensors sit deeper, such as model/a/b/w" in message, message


if __name__ == "__main__":
    harness.main([test_sparse_tensors_are_refused_by_every_command, test_parameters_are_carried_as_parameters,
                  test_requires_grad_of_a_plain_tensor_is_kept, test_the_root_keeps_its_type,
                  test_a_header_that_is_not_utf8_json_is_one_escaped_line,
                  test_diff_of_hf_names_against_metaseq_names_says_to_use_names_hf_opt,
                  test_every_stitch_flag_is_documented_in_the_readme, test_inspect_of_a_wide_grid_fits_a_terminal,
                  test_diff_counts_add_up, test_floats_print_as_python_prints_them,
                  test_summaries_say_what_was_written_and_checked, test_max_positions_states_its_real_range,
                  test_qkv_split_keeps_a_modules_order_through_reshard_and_back,
                  test_long_values_and_nested_classes_come_through_stitch, test_a_nested_model_is_told_as_nested])
