#!/usr/bin/python3
"""The way back to training, judged by torch: a consolidated checkpoint (the
generator's expected/consolidated.pt, separate k/v/q and a tie, or fused.pt) split
by `ckpt-tool reshard` into metaseq's model-parallel parts (one qkv_proj per layer,
[k_m; v_m; q_m]) equals the generator's consolidated parts; with --layout-from the
raw shards themselves come back, every object but the optimizer state equal, and on
another grid fairscale's rule (fairscale_rule.py) gets the Megatron cut of the
singleton (written here, from the rules, not by the tool) back from the shards;
stitch of what was written gives the singleton back (diff exit 0); a template of
another model is refused naming the tensor, and nothing is written."""
import json
import os
import subprocess
from collections import OrderedDict

import torch

import fairscale_rule
import harness
from harness import ckptcheck


PART = "reshard-model_part-{m}.pt"  # names stitch reads back as a grid
SHARD = "checkpoint_last-model_part-{m}-shard{d}.pt"


def tool(args, expect=0):
    return harness.run([str(a) for a in args], expect=expect)


def case_of(folder):
    return json.load(open(os.path.join(folder, "case.json")))


def singleton(folder, name="consolidated"):
    return os.path.join(folder, "expected", f"{name}.pt")


def megatron_part(full, mp, m, fused=True):
    """Part m of `full` (a consolidated state dict, separate k/v/q) cut by Megatron's
    rules: k, v, q chunked on dim 0 (fused per layer as [k_m; v_m; q_m]), embed_tokens
    and fc1 on dim 0, fc2 and out_proj weights on dim 1, the rest replicated; a tie
    stays a tie."""
    out = OrderedDict()
    seen = {}  # id(tensor) -> key, for ties
    for key, t in full.items():
        if id(t) in seen:
            out[key] = out[seen[id(t)]]
            continue
        seen[id(t)] = key
        proj = next((p for p in ("k_proj", "v_proj", "q_proj") if f".{p}." in key), None)
        if proj is not None:
            if not fused:
                out[key] = t.chunk(mp, dim=0)[m].clone()
            elif proj == "k_proj":
                thirds = [full[key.replace("k_proj", p)].chunk(mp, dim=0)[m] for p in ("k_proj", "v_proj", "q_proj")]
                out[key.replace("k_proj", "qkv_proj")] = torch.cat(thirds, dim=0)
        elif key.endswith("embed_tokens.weight") or ".fc1." in key:
            out[key] = t.chunk(mp, dim=0)[m].clone()
        elif key.endswith("fc2.weight") or key.endswith("out_proj.weight"):
            out[key] = t.chunk(mp, dim=1)[m].clone()
        else:
            out[key] = t
    return out


def in_order_of(got, expected, where):
    """`expected` in `got`'s key order, after checking both hold the same keys."""
    assert set(got) == set(expected), (where, sorted(set(got) ^ set(expected)))
    return OrderedDict((k, expected[k]) for k in got)


def raw_file(folder, m, d):
    case = case_of(folder)
    return os.path.join(folder, next(f["path"] for f in case["files"] if f["mp_part"] == m and f["dp_shard"] == d))


def another_grid(case):
    """A grid other than the case's that its dimensions allow."""
    dims = case["dims"]
    mp = next((p for p in (2, 1, 4) if p != case["mp"] and all(dims[k] % p == 0 for k in ("E", "F", "V"))),
              case["mp"])
    return mp, case["dp"] % 3 + 2


def test_a_singleton_splits_into_metaseqs_parts():
    for name, folder in harness.fixtures().items():
        case = case_of(folder)
        mp = case["mp"]
        for source in ("consolidated", "fused"):
            out = harness.scratch(f"b2t-{name}-{source}")
            tool(["reshard", "-q", singleton(folder, source), "--mp", mp, "--dp", 1, "--unflatten", "-o",
                  os.path.join(out, PART)])
            parts = [os.path.join(out, PART.format(m=m)) for m in range(mp)]
            for m, path in enumerate(parts):
                got = ckptcheck.load(path)["model"]
                want = harness.load_fixture(os.path.join(folder, "expected", f"part-{m}.pt"))["model"]
                assert list(got.keys()) == case["part_keys"], (name, source, list(got.keys()))
                ckptcheck.assert_same(got, want, f"{name} {source} part {m}")
            # stitch of the parts gives the singleton back, bit for bit
            back = os.path.join(out, "back.pt")
            tool(["stitch", "-q"] + parts + ["-o", back])
            tool(["diff", back, singleton(folder)])
        # --split-qkv: separate k, v, q per part, as the rules cut them
        out = harness.scratch(f"b2t-{name}-split")
        tool(["reshard", "-q", singleton(folder, "fused"), "--mp", mp, "--dp", 1, "--unflatten", "--split-qkv",
              "-o", os.path.join(out, PART)])
        full = harness.load_fixture(singleton(folder))["model"]
        for m in range(mp):
            got = ckptcheck.load(os.path.join(out, PART.format(m=m)))["model"]
            want = megatron_part(full, mp, m, fused=False)
            ckptcheck.assert_same(got, in_order_of(got, want, name), f"{name} split part {m}")


def test_another_part_count_is_cut_by_the_rules():
    for name, folder in harness.fixtures().items():
        mp, _ = another_grid(case_of(folder))
        out = harness.scratch(f"b2t-mp-{name}")
        tool(["reshard", "-q", singleton(folder), "--mp", mp, "--dp", 1, "--unflatten", "-o",
              os.path.join(out, PART)])
        full = harness.load_fixture(singleton(folder))["model"]
        for m in range(mp):
            got = ckptcheck.load(os.path.join(out, PART.format(m=m)))["model"]
            ckptcheck.assert_same(got, megatron_part(full, mp, m), f"{name} mp {mp} part {m}")


def test_layout_from_gives_the_raw_shards_back():
    for name, folder in harness.fixtures().items():
        case = case_of(folder)
        for source in ("consolidated", "fused"):
            out = harness.scratch(f"b2t-layout-{name}-{source}")
            _, err = tool(["reshard", singleton(folder, source), "--mp", case["mp"], "--dp", case["dp"],
                           "--layout-from", folder, "-o", os.path.join(out, SHARD)])
            if case["has_optimizer_state"]:
                assert "holds no optimizer state, so the outputs have none" in err, err
            for f in case["files"]:
                got = ckptcheck.load(os.path.join(out, SHARD.format(m=f['mp_part'], d=f['dp_shard'])))
                want = dict(harness.load_fixture(os.path.join(folder, f["path"])))
                want.pop("last_optimizer_state", None)
                ckptcheck.assert_same(got, want, f"{name} {source} {f['path']}")
        # a manifest of the set is a template too; stitch gives the singleton back
        manifest = os.path.join(out, "raw.json")
        tool(["manifest", folder, "-o", manifest])
        again = harness.scratch(f"b2t-layout-{name}-manifest")
        tool(["reshard", "-q", singleton(folder), "--mp", case["mp"], "--dp", case["dp"], "--layout-from", manifest,
              "-o", os.path.join(again, SHARD)])
        for f in case["files"]:
            a = os.path.join(again, SHARD.format(m=f['mp_part'], d=f['dp_shard']))
            subprocess.run(["cmp", a, os.path.join(out, SHARD.format(m=f['mp_part'], d=f['dp_shard']))], check=True)
        back = os.path.join(again, "back.pt")
        tool(["stitch", "-q", again, "-o", back])
        tool(["diff", back, singleton(folder)])


def test_layout_from_writes_another_grid():
    for name, folder in harness.fixtures().items():
        case = case_of(folder)
        mp, dp = another_grid(case)
        out = harness.scratch(f"b2t-grid-{name}")
        tool(["reshard", "-q", singleton(folder), "--mp", mp, "--dp", dp, "--layout-from", folder, "-o",
              os.path.join(out, SHARD)])
        full = harness.load_fixture(singleton(folder))["model"]
        for m in range(mp):
            shards = [ckptcheck.load(os.path.join(out, SHARD.format(m=m, d=d))) for d in range(dp)]
            for d, shard in enumerate(shards):
                template = harness.load_fixture(raw_file(folder, m % case["mp"], d % case["dp"]))
                assert list(shard) == [k for k in template if k != "last_optimizer_state"], (name, list(shard))
                for meta in shard["shard_metadata"]["param_metadata"]:  # fairscale's chunk and padding
                    for flat_name, v in meta["params"].items():
                        key = f"{meta['fsdp_path']}.{flat_name}" if meta["fsdp_path"] else flat_name
                        n = sum(v["numels"])
                        chunk = -(-n // dp)
                        held = max(0, min(chunk, n - d * chunk))
                        flat = shard["model"][key]
                        assert flat.numel() == chunk and v["padding"] == chunk - held, (name, key, d)
                        assert not flat[held:].any(), (name, key, d, "padding not zero")
            got = fairscale_rule.consolidate_shard_weights(shards)
            want = megatron_part(full, mp, m)
            ckptcheck.assert_same(got, in_order_of(got, want, name), f"{name} {mp}x{dp} part {m}")


def synth(out, layers):
    tool(["synth", "-q", "-o", out, "--mp", 2, "--dp", 2, "--layers", layers, "--embed-dim", 8, "--ffn-dim", 16,
          "--vocab", 16, "--positions", 8, "--dtype", "fp32"])
    return out


def test_a_template_of_another_model_is_refused_before_writing():
    work = harness.scratch("b2t-refused")
    two = synth(os.path.join(work, "two"), 2)
    single = os.path.join(work, "single.pt")
    tool(["stitch", "-q", two, "-o", single])
    out = harness.scratch("b2t-refused-out")
    pattern = os.path.join(out, SHARD)

    def refused(args, *needles, weights=single):
        _, err = tool(["reshard", weights, "--mp", 2, "--dp", 2, "-o", pattern] + args, expect=1)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), (args, err)
        assert os.listdir(out) == [], os.listdir(out)

    # a layer more in the template: its parameters are named
    refused(["--layout-from", synth(os.path.join(work, "three"), 3)], "decoder.layers.2.",
            "does not hold", "three/")
    # a layer fewer: the weights' layer 1 would be lost
    refused(["--layout-from", synth(os.path.join(work, "one"), 1)], "single.pt", "decoder.layers.1.",
            "would be lost")
    # another width
    wide = os.path.join(work, "wide")
    tool(["synth", "-q", "-o", wide, "--mp", 2, "--dp", 2, "--layers", 2, "--embed-dim", 16, "--ffn-dim", 16,
          "--vocab", 16, "--positions", 8, "--dtype", "fp32"])
    refused(["--layout-from", wide], "single.pt", "shape [", "not the template's model")
    # a part count the weights do not split into
    fixtures = harness.fixtures()
    refused(["--layout-from", fixtures["mp4_dp3_fp16_omega"]], "cut as the template's 4 model parts",
            "embed_tokens", weights=singleton(fixtures["mp2_dp2_fp16_omega_opt"]))
    # no FSDP layout in the template, no layout at all, and --split-qkv against a fused layout
    refused(["--layout-from", single], "single.pt", "no shard_metadata here")
    refused([], "no shard_metadata", "--layout-from")
    refused(["--layout-from", two, "--split-qkv"], "qkv_proj", "can only be written fused")
    # the weights untied where the template ties them
    untied = os.path.join(work, "untied.pt")
    ckpt = ckptcheck.load(single)
    ckpt["model"]["decoder.output_projection.weight"] = ckpt["model"]["decoder.output_projection.weight"].clone()
    torch.save(ckpt, untied)
    _, err = tool(["reshard", untied, "--mp", 2, "--dp", 2, "-o", pattern, "--layout-from", two], expect=1)
    assert "decoder.output_projection.weight" in err and "would be lost" in err, err
    # the template's files are inputs: never written over, even with --force
    before = {f: open(os.path.join(two, f), "rb").read() for f in os.listdir(two)}
    tool(["reshard", single, "--mp", 2, "--dp", 2, "--force", "--layout-from", two, "-o",
          os.path.join(two, "checkpoint_last-model_part-{m}-shard{d}.pt")], expect=1)
    assert {f: open(os.path.join(two, f), "rb").read() for f in os.listdir(two)} == before
    # and what is accepted is the synth's set again, byte for byte in every tensor
    tool(["reshard", "-q", single, "--mp", 2, "--dp", 2, "--layout-from", two, "-o", pattern])
    for m in range(2):
        for d in range(2):
            tool(["diff", os.path.join(out, SHARD.format(m=m, d=d)),
                  os.path.join(two, f"checkpoint_last-model_part-{m}-shard{d}.pt")])


def parameter_states(single, name):
    """{parameter: state tensor} of a consolidated file holding torch's per-parameter
    optimizer state: state i is the i-th tensor of the model that is neither a tie
    nor a buffer (version)."""
    params, seen = [], set()
    for key, t in single["model"].items():
        if id(t) in seen or key.endswith(".version"):
            continue
        seen.add(id(t))
        params.append(key)
    state = single["last_optimizer_state"]["state"]
    assert sorted(state) == list(range(len(params))), (len(state), len(params))
    assert single["last_optimizer_state"]["param_groups"][0]["params"] == list(range(len(params)))
    return OrderedDict((p, state[i][name]) for i, p in enumerate(params))


def test_optimizer_state_goes_back_with_its_weights():
    for name, folder in harness.fixtures().items():
        case = case_of(folder)
        if not case["has_optimizer_state"]:
            continue
        mp, dp = case["mp"], case["dp"]
        out = harness.scratch(f"b2t-opt-{name}")
        single = os.path.join(out, "single.pt")
        tool(["stitch", "-q", folder, "--optimizer-state", "-o", single])
        # the singleton's state i, cut by the rules, is the raw shards' flat state
        loaded = ckptcheck.load(single)
        for state_name in ("exp_avg", "exp_avg_sq"):
            states = parameter_states(loaded, state_name)
            for m in range(mp):
                shards = [harness.load_fixture(raw_file(folder, m, d)) for d in range(dp)]
                cut = megatron_part(states, mp, m)
                metas = shards[0]["shard_metadata"]["param_metadata"]
                for flat, meta in zip(fairscale_rule.consolidate_optimizer_state(shards, state_name), metas):
                    names = meta["params"]["flat_param_0"]["names"]
                    keys = [f"{meta['fsdp_path']}.{n}" if meta["fsdp_path"] else n for n in names]
                    want = torch.cat([cut[k].reshape(-1) for k in keys])
                    ckptcheck.assert_same(flat, want, f"{name} {state_name} part {m} {meta['fsdp_path']}")
        # back on the same grid: the raw shards, every object; on another: what reshard of the shards writes
        again = harness.scratch(f"b2t-opt-{name}-again")
        tool(["reshard", "-q", single, "--mp", mp, "--dp", dp, "--layout-from", folder, "-o",
              os.path.join(again, SHARD)])
        for f in case["files"]:
            got = ckptcheck.load(os.path.join(again, SHARD.format(m=f["mp_part"], d=f["dp_shard"])))
            ckptcheck.assert_same(got, harness.load_fixture(os.path.join(folder, f["path"])), f"{name} {f['path']}")
        other = dp % 3 + 2
        direct, through = harness.scratch(f"b2t-opt-{name}-direct"), harness.scratch(f"b2t-opt-{name}-through")
        tool(["reshard", "-q", folder, "--mp", mp, "--dp", other, "-o", os.path.join(direct, SHARD)])
        tool(["reshard", "-q", single, "--mp", mp, "--dp", other, "--layout-from", folder, "-o",
              os.path.join(through, SHARD)])
        for f in sorted(os.listdir(direct)):
            subprocess.run(["cmp", os.path.join(direct, f), os.path.join(through, f)], check=True)
        # consolidated parts with their state (--no-stitch-megatron) go back the same way
        parts = harness.scratch(f"b2t-opt-{name}-parts")
        tool(["stitch", "-q", folder, "--optimizer-state", "--no-stitch-megatron", "-o", os.path.join(parts, PART)])
        tool(["reshard", "-q", parts, "--mp", mp, "--dp", other, "--layout-from", folder, "-o",
              os.path.join(parts, SHARD)])
        for f in sorted(os.listdir(direct)):
            subprocess.run(["cmp", os.path.join(direct, f), os.path.join(parts, f)], check=True)


def adam_singleton(name):
    """A case with Adam state stitched with --optimizer-state: (its folder, a work folder, the
    singleton, an empty output folder)."""
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    work = harness.scratch(name)
    single = os.path.join(work, "single.pt")
    tool(["stitch", "-q", folder, "--optimizer-state", "-o", single])
    return folder, work, single, harness.scratch(name + "-out")


def edited_set(folder, out, change):
    """A copy of the raw set in `folder` with `change(ckpt, file name)` applied to every shard."""
    os.makedirs(out)
    for f in sorted(os.listdir(folder)):
        if f.endswith(".pt"):
            ckpt = ckptcheck.load(os.path.join(folder, f))
            change(ckpt, f)
            torch.save(ckpt, os.path.join(out, f))
    return out


def test_optimizer_state_that_does_not_fit_is_refused():
    folder, work, single, out = adam_singleton("b2t-opt-refused")

    def refused(weights, template, *needles, args=()):
        _, err = tool(["reshard", weights, "--mp", 2, "--dp", 2, "--layout-from", template, "-o",
                       os.path.join(out, SHARD)] + list(args), expect=1)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), err
        assert os.listdir(out) == [], os.listdir(out)

    # two parameters' states swapped: shaped unlike their parameters
    swapped = ckptcheck.load(single)
    state = swapped["last_optimizer_state"]["state"]
    state[1], state[2] = state[2], state[1]
    torch.save(swapped, os.path.join(work, "swapped.pt"))
    refused(os.path.join(work, "swapped.pt"), folder, "last_optimizer_state/state/1/exp_avg", "shape [",
            "not this model's optimizer state")
    # a template without optimizer state: nowhere to write it, unless dropped
    bare = edited_set(folder, os.path.join(work, "bare"), lambda ckpt, _: ckpt.pop("last_optimizer_state"))
    refused(single, bare, "no optimizer state here to write the input's (exp_avg, exp_avg_sq) in",
            "--drop-optimizer-state")
    tool(["reshard", "-q", single, "--mp", 2, "--dp", 2, "--layout-from", bare, "--drop-optimizer-state", "-o",
          os.path.join(out, SHARD)])
    assert "last_optimizer_state" not in ckptcheck.load(os.path.join(out, SHARD.format(m=0, d=0)))
    # stitch: no state to keep, and formats that cannot hold it
    tool(["stitch", "-q", harness.fixtures()["mp4_dp3_fp16_omega"], "--optimizer-state", "-o",
          os.path.join(work, "none.pt")], expect=1)
    for args in (["--format", "safetensors", "-o", os.path.join(work, "x.safetensors")],
                 ["--weights-only", "-o", os.path.join(work, "x.pt")], ["--ema", "-o", os.path.join(work, "x.pt")]):
        _, err = tool(["stitch", folder, "--optimizer-state"] + args, expect=2)
        assert "--optimizer-state" in err, err


def test_found_by_the_black_box_review():
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]  # OmegaConf cfg, a plain dict here
    work = harness.scratch("b2t-review")
    single = singleton(folder)
    out = harness.scratch("b2t-review-out")
    pattern = os.path.join(out, SHARD)
    # 1. a manifest read as template or INPUT is an input: never written, not even with --force
    manifest = os.path.join(work, "template.json")
    tool(["manifest", folder, "-o", manifest])
    before = open(manifest, "rb").read()
    _, err = tool(["reshard", single, "--mp", 1, "--dp", 1, "--layout-from", manifest, "--force", "-o", manifest],
                  expect=1)
    assert "inputs are never written" in err and open(manifest, "rb").read() == before, err
    _, err = tool(["stitch", manifest, "--force", "-o", manifest], expect=1)
    assert "inputs are never written" in err and open(manifest, "rb").read() == before, err
    # 2. a template whose cfg is stale (metaseq's reshard_model_parallel leaves the old count):
    # named as the template's problem, and --layout-model-parts states its count
    stale = os.path.join(work, "stale")
    os.makedirs(stale)
    for f in os.listdir(folder):
        if f.endswith(".pt"):
            ckpt = ckptcheck.load(os.path.join(folder, f))
            ckpt["cfg"]["model"]["model_parallel_size"] = 8
            torch.save(ckpt, os.path.join(stale, f))
    _, err = tool(["reshard", single, "--mp", 2, "--dp", 2, "--layout-from", stale, "-o", pattern],
                  expect=harness.EXIT["incomplete_set"])
    assert err.startswith("ckpt-tool: error: --layout-from: ") and "--layout-model-parts overrides" in err, err
    tool(["reshard", "-q", single, "--mp", 2, "--dp", 2, "--layout-from", stale, "--layout-model-parts", 2, "-o",
          pattern])
    assert ckptcheck.load(os.path.join(out, SHARD.format(m=1, d=1)))["cfg"]["model"]["model_parallel_size"] == 2
    tool(["reshard", single, "--mp", 2, "--dp", 2, "--layout-model-parts", 2, "-o", pattern], expect=2)
    tool(["reshard", single, "--mp", 2, "--dp", 2, "--layout-from", "", "-o", pattern], expect=2)
    # 3. buffers: one the template holds and the weights lack, or of another shape, named in the weights
    for change, needle in ((lambda model: model.pop("decoder.version"), "a buffer that model part 0 of the template"),
                           (lambda model: model.__setitem__("decoder.version", torch.zeros(3)),
                            "buffer of shape [3], but")):
        ckpt = ckptcheck.load(single)
        change(ckpt["model"])
        edited = os.path.join(work, "edited.pt")
        torch.save(ckpt, edited)
        out2 = harness.scratch("b2t-review-buffers")
        _, err = tool(["reshard", edited, "--mp", 2, "--dp", 2, "--layout-from", folder, "-o",
                       os.path.join(out2, SHARD)], expect=1)
        assert f"{edited}: decoder.version: {needle}" in err and os.listdir(out2) == [], err
    # 4. an error of the layout rules names the one input file
    ckpt = ckptcheck.load(single)
    ckpt["model"]["decoder.layers.0.fc1.weight"] = ckpt["model"]["decoder.layers.0.fc1.weight"].float()
    mixed = os.path.join(work, "mixed.pt")
    torch.save(ckpt, mixed)
    _, err = tool(["reshard", mixed, "--mp", 2, "--dp", 2, "--layout-from", folder, "-o", pattern], expect=1)
    assert f"{mixed}: decoder.layers.0.fc1.weight: dtype differs" in err, err


def test_found_by_the_second_black_box_review():
    folder, work, single, out = adam_singleton("b2t-review2")

    def refused(args, *needles, code=1):
        _, err = tool(args + ["-o", os.path.join(out, SHARD) if args[0] == "reshard" else os.path.join(out, "x.pt")],
                      expect=code)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), (args, err)
        assert os.listdir(out) == [], os.listdir(out)

    def edited_single(name, change):
        ckpt = ckptcheck.load(single)
        change(ckpt["last_optimizer_state"])
        path = os.path.join(work, name)
        torch.save(ckpt, path)
        return path

    reshard = ["reshard", "--mp", 2, "--dp", 2, "--layout-from", folder]
    # a consolidated file's state 0 was the one never checked: swapped with state 1, or keyed 1..n
    swapped = edited_single("swapped.pt", lambda o: o["state"].update({0: o["state"][1], 1: o["state"][0]}))
    refused(reshard + [swapped], f"{swapped}: last_optimizer_state/state/0/exp_avg", "parameter 0")
    shifted = edited_single("shifted.pt", lambda o: o.update(state={k + 1: v for k, v in o["state"].items()}))
    refused(reshard + [shifted], shifted, "last_optimizer_state/state/", "--drop-optimizer-state")
    reversed_groups = edited_single("reversed.pt", lambda o: o["param_groups"][0]["params"].reverse())
    refused(reshard + [reversed_groups], "last_optimizer_state/param_groups", "in another order")
    # a state in another dtype is named as optimizer state, not as the weight
    fp16 = edited_single("fp16.pt", lambda o: o["state"][2].update(exp_avg=o["state"][2]["exp_avg"].half()))
    refused(reshard + [fp16], "optimizer state exp_avg:", "dtype differs")

    # raw shards: state 0 of another shape in every shard, and a state beyond the flat parameters
    def scalar_state0(ckpt, _):
        ckpt["last_optimizer_state"]["state"][0]["exp_avg"] = torch.tensor(1.0)

    def extra_state(ckpt, _):
        state = ckpt["last_optimizer_state"]["state"]
        state[len(state)] = dict(state[0])

    for name, change, needle in (("scalar", scalar_state0, "shape [], but flat parameter 0 (flat_param_0)"),
                                 ("extra", extra_state, "state 3, but there are 3 flat parameters")):
        raw = edited_set(folder, os.path.join(work, name), change)
        refused(["stitch", raw, "--optimizer-state"], needle)
        refused(["reshard", raw, "--mp", 1, "--dp", 2], needle, "last_optimizer_state/state/", "--drop-optimizer-state")
        tool(["reshard", "-q", raw, "--mp", 1, "--dp", 2, "--drop-optimizer-state", "-o", os.path.join(out, SHARD)])
        subprocess.run(["rm", "-rf", out], check=True)
        os.makedirs(out)
        refused(["reshard", single, "--mp", 2, "--dp", 2, "--layout-from", raw], needle)

    # an extra state in one shard only: every file is checked, not the first
    def extra_in_one(ckpt, name):
        if name.endswith("part-0-shard1.pt"):
            extra_state(ckpt, name)

    raw = edited_set(folder, os.path.join(work, "extra-one"), extra_in_one)
    for args in (["stitch", raw, "--optimizer-state"], ["reshard", raw, "--mp", 1, "--dp", 2]):
        refused(args, "part-0-shard1.pt: last_optimizer_state/state/3", "state 3, but there are 3 flat parameters")

    # the states of one save agree on their step: within a file and across the shards
    def step_differs(ckpt, _):
        ckpt["last_optimizer_state"]["state"][1]["step"] = 249

    def shard_step_differs(ckpt, name):
        if "shard1" in name:
            for state in ckpt["last_optimizer_state"]["state"].values():
                state["step"] = 251

    for name, change, needle in (("step", step_differs, "last_optimizer_state/state/1"),
                                 ("shard-step", shard_step_differs, "shard1.pt: last_optimizer_state")):
        raw = edited_set(folder, os.path.join(work, name), change)
        for args in (["stitch", raw, "--optimizer-state"], ["reshard", raw, "--mp", 1, "--dp", 2]):
            refused(args, needle, "agree on these")

    # the optimizer state of a replicated weight is compared across the parts, as the weight is
    def drift(ckpt, name):
        if "model_part-1" in name:
            ckpt["last_optimizer_state"]["state"][2]["exp_avg"] += 1.0  # a layer: its norms, row-parallel biases

    raw = edited_set(folder, os.path.join(work, "drift"), drift)
    _, err = tool(["stitch", raw, "--optimizer-state", "-o", os.path.join(out, "x.pt"), "--replicated-from-part-0"])
    assert "warning" in err and "last_optimizer_state exp_avg of decoder.layers.1.fc2.bias" in err, err
    os.remove(os.path.join(out, "x.pt"))
    refused(["stitch", raw, "--optimizer-state"], "last_optimizer_state exp_avg of decoder.layers.1.",
            code=harness.EXIT["incomplete_set"])


def test_found_by_the_third_black_box_review():
    folder, work, single, out = adam_singleton("b2t-review3")
    pattern = os.path.join(out, SHARD)
    # torch numbers the states of several param groups group by group: not cut by position
    ckpt = ckptcheck.load(single)
    groups = ckpt["last_optimizer_state"]["param_groups"]
    params = groups[0]["params"]
    groups[:] = [dict(groups[0], params=params[:4]), dict(groups[0], params=params[4:], lr=1.0)]
    two = os.path.join(work, "two-groups.pt")
    torch.save(ckpt, two)
    _, err = tool(["reshard", two, "--mp", 2, "--dp", 2, "--layout-from", folder, "-o", pattern], expect=1)
    assert "last_optimizer_state/param_groups: 2 param groups: torch numbers the states group by group" in err, err
    assert os.listdir(out) == []
    # the input's step goes with its moments (an int, or a tensor of its own in every state)
    for step in (3, torch.tensor(3.0)):
        ckpt = ckptcheck.load(single)
        for state in ckpt["last_optimizer_state"]["state"].values():
            state["step"] = step.clone() if isinstance(step, torch.Tensor) else step
        stepped = os.path.join(work, "stepped.pt")
        torch.save(ckpt, stepped)
        tool(["reshard", "-q", "--force", stepped, "--mp", 2, "--dp", 2, "--layout-from", folder, "-o", pattern])
        states = ckptcheck.load(pattern.format(m=1, d=1))["last_optimizer_state"]["state"]
        for state in states.values():
            assert type(state["step"]) is type(step) and float(state["step"]) == 3.0, state["step"]
        if isinstance(step, torch.Tensor):
            assert len({id(state["step"]) for state in states.values()}) == len(states)  # Adam adds to it in place
    # Adam before its first step: no state to cut, the rest of the frame stays
    raw = edited_set(folder, os.path.join(work, "before-step-1"),
                     lambda c, _: c["last_optimizer_state"].update(state={}))
    again = harness.scratch("b2t-review3-again")
    tool(["reshard", "-q", raw, "--mp", 1, "--dp", 2, "-o", os.path.join(again, SHARD)])
    frame = ckptcheck.load(os.path.join(again, SHARD.format(m=0, d=1)))["last_optimizer_state"]
    original = harness.load_fixture(raw_file(folder, 0, 0))["last_optimizer_state"]
    assert frame["state"] == {} and frame["loss_scale"] == original["loss_scale"], frame
    assert frame["param_groups"] == original["param_groups"], frame


def test_a_failed_write_leaves_nothing():
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    out = harness.scratch("b2t-enospc")
    env = harness.preloaded(CKPT_FAIL_WRITES_AFTER_BYTES="20000")
    proc = subprocess.run([harness.TOOL, "reshard", "-q", singleton(folder), "--mp", "2", "--dp", "3", "--buffered-io",
                           "--layout-from", folder, "-o", os.path.join(out, SHARD)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == harness.EXIT["no_space"] and "No space left on device" in proc.stderr, proc
    assert os.listdir(out) == [], os.listdir(out)


if __name__ == "__main__":
    harness.main([test_a_singleton_splits_into_metaseqs_parts, test_another_part_count_is_cut_by_the_rules,
                  test_layout_from_gives_the_raw_shards_back, test_layout_from_writes_another_grid,
                  test_a_template_of_another_model_is_refused_before_writing,
                  test_optimizer_state_goes_back_with_its_weights, test_optimizer_state_that_does_not_fit_is_refused,
                  test_found_by_the_black_box_review, test_found_by_the_second_black_box_review,
                  test_found_by_the_third_black_box_review,
                  test_a_failed_write_leaves_nothing])
