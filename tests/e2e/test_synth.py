#!/usr/bin/python3
"""`ckpt-tool synth` writes what metaseq writes: cross-checked against the fixture
generator's files of the same dimensions and grid (keys, shapes, dtypes,
shard_metadata, optimizer state), loadable by torch.load, and consistent enough
that stitch, reshard and verify accept it."""
import json
import os

import torch

import harness
from harness import ckptcheck


def structure(value):
    """Everything but tensor values: types, keys, shapes, dtypes, metadata."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape))
    if isinstance(value, dict):
        return (type(value).__name__, [(k, structure(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [structure(v) for v in value])
    return type(value).__name__


def test_same_structure_as_the_generator():
    for name in ("mp2_dp2_fp16_omega_opt", "mp4_dp3_fp16_omega", "mp1_dp8_bf16_omega_opt"):
        folder = harness.fixtures()[name]
        case = json.load(open(os.path.join(folder, "case.json")))
        if case["param_metadata_order"] != "root_first":
            continue
        d = case["dims"]
        out = harness.scratch("synth-" + name)
        dtype = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[case["dtype"]]
        args = ["synth", "-q", "--mp", case["mp"], "--dp", case["dp"], "--dtype", dtype, "--layers", d["layers"],
                "--embed-dim", d["E"], "--ffn-dim", d["F"], "--vocab", d["V"], "--positions", d["P"], "-o", out]
        if case["has_optimizer_state"]:
            args.append("--optimizer-state")
        harness.run(args)
        for entry in case["files"]:
            theirs = ckptcheck.load(os.path.join(folder, entry["path"]))
            ours = ckptcheck.load(os.path.join(out, f"checkpoint_last-model_part-{entry['mp_part']}-shard{entry['dp_shard']}.pt"))
            assert structure(ours["model"]) == structure(theirs["model"]), f"{name} {entry['path']} model"
            assert ours["shard_metadata"] == theirs["shard_metadata"], f"{name} {entry['path']} shard_metadata"
            if case["has_optimizer_state"]:
                assert structure(ours["last_optimizer_state"]["state"]) == structure(theirs["last_optimizer_state"]["state"])
            assert ours["cfg"]["model"]["model_parallel_size"] == case["mp"]
        checked = True
    assert checked


def test_synth_feeds_the_other_commands():
    out = harness.scratch("synth-pipeline")
    harness.run(["synth", "-q", "--params", "5e6", "--layers", "3", "--embed-dim", "64", "--vocab", "512",
                 "--mp", "2", "--dp", "3", "--dtype", "bf16", "--optimizer-state", "-o", out])
    stdout, _ = harness.run(["verify", out])
    assert stdout.startswith("ok: 6 file(s)"), stdout
    buffered = harness.scratch("synth-buffered")  # the same files through the page cache
    harness.run(["synth", "-q", "--params", "5e6", "--layers", "3", "--embed-dim", "64", "--vocab", "512",
                 "--mp", "2", "--dp", "3", "--dtype", "bf16", "--optimizer-state", "--buffered-io", "-o", buffered])
    for name in sorted(os.listdir(out)):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(buffered, name), "rb").read(), name
    stitched = os.path.join(harness.scratch("synth-stitched"), "out.pt")
    _, stderr = harness.run(["stitch", out, "-o", stitched])
    assert "warning" not in stderr, stderr  # replicated tensors agree across parts
    model = ckptcheck.load(stitched)["model"]
    assert model["decoder.layers.2.fc1.weight"].shape == (256, 64)
    assert model["decoder.layers.0.fc2.weight"].dtype == torch.bfloat16
    values = model["decoder.layers.1.self_attn.k_proj.weight"].float()
    assert values.abs().max() <= 0.05 and values.std() > 0.01  # plausible weights, not noise bits
    resharded = harness.scratch("synth-resharded")
    harness.run(["reshard", "-q", out, "--mp", "1", "--dp", "2", "-o",
                 os.path.join(resharded, "checkpoint_last-model_part-{m}-shard{d}.pt")])
    stdout, _ = harness.run(["diff", resharded, stitched])
    assert stdout.startswith("equal"), stdout


if __name__ == "__main__":
    harness.main([test_same_structure_as_the_generator, test_synth_feeds_the_other_commands])
