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


# -------------------------------------------------------------------- item 9

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


if __name__ == "__main__":
    harness.main([test_sparse_tensors_are_refused_by_every_command, test_parameters_are_carried_as_parameters,
                  test_requires_grad_of_a_plain_tensor_is_kept, test_the_root_keeps_its_type,
                  test_a_header_that_is_not_utf8_json_is_one_escaped_line,
                  test_qkv_split_keeps_a_modules_order_through_reshard_and_back])
