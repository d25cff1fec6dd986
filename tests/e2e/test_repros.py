#!/usr/bin/python3
"""The sets a stranger's generator wrote that broke ckpt-tool (fixtures/repros/, issue 24),
and the property tests around each: sets written by tests/e2e/stranger_sets.py, another
writer than the fixtures', compared with the model they were cut from."""
import itertools
import json
import os
import shutil
import sys
import types

import torch

import fairscale_rule
import harness
import safetensors_check
import stranger_sets

REPROS = os.path.join(harness.SOURCE_ROOT, "fixtures", "repros")


def load_any(path):
    """torch.load, with a stand-in class for every module the writer had and we lack
    (the repros pickle a `fakemeters.AverageMeter`)."""
    for _ in range(16):
        try:
            return harness.ckptcheck.load(path)
        except ModuleNotFoundError as missing:
            parts = missing.name.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                module = types.ModuleType(name)
                module.__path__ = []
                module.__getattr__ = lambda attr, name=name: type(attr, (), {"__module__": name, "__setstate__":
                                                                           lambda self, state: None})
                sys.modules.setdefault(name, module)
    raise AssertionError(f"{path}: cannot be loaded")


def set_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pt"))


def assert_same_state_dict(got, want, what):
    assert list(got) == list(want), (what, list(got), list(want))
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (what, key)
    tied = stranger_sets.TIED
    if tied[1] in want and want[tied[1]] is want[tied[0]]:
        assert got[tied[1]].data_ptr() == got[tied[0]].data_ptr(), (what, "tie lost")


# -- unflatten-segfault: a node reference held across an arena append ------------------

def test_unflatten_repro():
    folder = os.path.join(REPROS, "unflatten-segfault")
    out = harness.scratch("repro-unflatten")
    pattern = os.path.join(out, "reshard-model_part-{m}.pt")
    harness.run(["reshard", folder, "--mp", 1, "--dp", 1, "--unflatten", "-o", pattern])
    shards = [load_any(path) for path in set_files(folder)]
    want = fairscale_rule.consolidate_shard_weights(shards)
    got = load_any(pattern.format(m=0))["model"]
    assert_same_state_dict(got, want, "unflatten-segfault")


def test_unflatten_property():
    """1-4 layers, shapes spelled torch.Size, tuple or list, grids 1x1, 2x2 and 4x3: every
    part unflattened equals the part the set was cut from, and stitch gives the model."""
    grids = [(1, 1), (2, 2), (4, 3)]
    cases = list(itertools.product(range(1, 5), ["size", "tuple", "list"]))
    for n, (layers, shapes) in enumerate(cases):
        mp, dp = grids[n % len(grids)]
        work = harness.scratch(f"unflatten-{layers}-{shapes}")
        written = stranger_sets.write_set(os.path.join(work, "in"), layers=layers, mp=mp, dp=dp, shapes=shapes,
                                          tied=n % 2 == 0, root_first=n % 4 < 2, seed=n, dtype=torch.float32)
        what = f"{layers} layers, {shapes} shapes, {mp} x {dp}"
        pattern = os.path.join(work, "part-{m}.pt")
        harness.run(["reshard", os.path.join(work, "in"), "--mp", mp, "--dp", 1, "--unflatten", "-o", pattern])
        for m in range(mp):
            assert_same_state_dict(load_any(pattern.format(m=m))["model"], written.parts[m], f"{what}: part {m}")
        stitched = os.path.join(work, "stitched.pt")
        harness.run(["stitch", os.path.join(work, "in"), "-o", stitched])
        assert_same_state_dict(load_any(stitched)["model"], written.full, f"{what}: stitch")


# -- swapped-shard-names: files renamed into each other's cells -----------------------

def test_swapped_names_repro():
    folder = os.path.join(REPROS, "swapped-shard-names")
    out = harness.scratch("repro-swapped")
    stdout, _ = harness.run(["verify", folder], expect=1)
    for d, saved in ((0, 1), (1, 0)):
        assert f"model_part-0-shard{d}.pt: named shard {d} but saved as shard {saved}" in stdout, stdout
        assert f"model_part-0-shard{saved}.pt is named shard {saved}" in stdout, stdout
    stdout, _ = harness.run(["inspect", folder])
    assert "named shard 0 but saved as shard 1" in stdout, stdout
    incomplete = harness.EXIT["incomplete_set"]
    for command, code in ((["stitch", folder, "-o", os.path.join(out, "s.pt")], incomplete),
                          (["reshard", folder, "--mp", 1, "--dp", 2, "-o", os.path.join(out, "r{d}.pt")], incomplete),
                          (["diff", folder, folder], 2)):
        _, stderr = harness.run(command, expect=code)
        assert "named shard 0 but saved as shard 1" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert os.listdir(out) == [], os.listdir(out)


def test_renamed_sets():
    """Names that contradict what torch saved are refused, in parts and in shards; a
    consistent rename (another prefix, no numbers at all) is accepted."""
    work = harness.scratch("renamed")
    written = stranger_sets.write_set(os.path.join(work, "in"), layers=2, mp=2, dp=2, seed=7, dtype=torch.float32)
    files = set_files(os.path.join(work, "in"))

    def renamed(name, mapping):
        folder = os.path.join(work, name)
        os.makedirs(folder)
        for path in files:
            shutil.copy(path, os.path.join(folder, mapping(os.path.basename(path))))
        return folder

    best = renamed("best", lambda f: f.replace("checkpoint_last", "checkpoint_best"))
    harness.run(["verify", best])
    harness.run(["stitch", best, "-o", os.path.join(work, "best.pt")])
    assert_same_state_dict(load_any(os.path.join(work, "best.pt"))["model"], written.full, "renamed prefix")

    parts_swapped = renamed("parts", lambda f: f.replace("part-0", "part-X").replace("part-1", "part-0")
                            .replace("part-X", "part-1"))
    stdout, _ = harness.run(["verify", parts_swapped], expect=1)
    assert "named model part 0 but saved as model part 1" in stdout, stdout
    harness.run(["stitch", parts_swapped, "-o", os.path.join(work, "parts.pt")], expect=harness.EXIT["incomplete_set"])

    single = stranger_sets.write_set(os.path.join(work, "one"), layers=1, seed=8, dtype=torch.float32)
    plain = os.path.join(work, "model.pt")
    shutil.copy(single.files[0], plain)  # no numbers in the name: nothing to contradict
    harness.run(["stitch", plain, "-o", os.path.join(work, "plain.pt")])
    assert_same_state_dict(load_any(os.path.join(work, "plain.pt"))["model"], single.full, "no numbers")


# -- untied-output-projection-mp2: a vocab-parallel output layer ---------------------

def glued_repro(folder, mp, dp):
    parts = [fairscale_rule.consolidate_shard_weights(
        [load_any(os.path.join(folder, f"checkpoint_last-model_part-{m}-shard{d}.pt")) for d in range(dp)])
        for m in range(mp)]
    return parts


def test_untied_output_projection_repro():
    folder = os.path.join(REPROS, "untied-output-projection-mp2")
    out = harness.scratch("repro-untied")
    parts = glued_repro(folder, 2, 2)
    stitched = os.path.join(out, "s.pt")
    _, stderr = harness.run(["stitch", folder, "-o", stitched])
    assert "warning" not in stderr, stderr
    model = load_any(stitched)["model"]
    for key in ("decoder.output_projection.weight", "decoder.embed_tokens.weight"):
        assert torch.equal(model[key], torch.cat([p[key] for p in parts])), key
    assert model["decoder.output_projection.weight"].data_ptr() != model["decoder.embed_tokens.weight"].data_ptr()
    harness.run(["verify", folder])
    harness.run(["diff", folder, stitched])

    # cut again on dim 0, like embed_tokens
    pattern = os.path.join(out, "r-model_part-{m}.pt")
    harness.run(["reshard", stitched, "--mp", 2, "--dp", 1, "--unflatten", "--split-qkv", "-o", pattern])
    for m in range(2):
        got = load_any(pattern.format(m=m))["model"]
        assert torch.equal(got["decoder.output_projection.weight"], parts[m]["decoder.output_projection.weight"])

    # Hugging Face: lm_head of the whole vocabulary, as config.json says
    hf = os.path.join(out, "hf")
    harness.run(["stitch", folder, "--format", "hf", "-o", hf])
    config = json.load(open(os.path.join(hf, "config.json")))
    tensors = dict(safetensors_check.read(os.path.join(hf, "model.safetensors"))[0])
    assert config["tie_word_embeddings"] is False
    assert list(tensors["lm_head.weight"].shape) == [config["vocab_size"], config["word_embed_proj_dim"]]
    assert torch.equal(tensors["lm_head.weight"], model["decoder.output_projection.weight"])


def test_untied_output_projection_property():
    """Untied output projections over 1, 2 and 4 parts: stitch gives the model back."""
    for mp, dp in ((1, 2), (2, 1), (4, 2)):
        work = harness.scratch(f"untied-{mp}x{dp}")
        written = stranger_sets.write_set(os.path.join(work, "in"), layers=2, mp=mp, dp=dp, tied=False, seed=mp,
                                          dtype=torch.float32)
        stitched = os.path.join(work, "s.pt")
        harness.run(["stitch", os.path.join(work, "in"), "-o", stitched])
        assert_same_state_dict(load_any(stitched)["model"], written.full, f"untied {mp} x {dp}")


# -- found by the stranger's black-box pass (issue 24's "before closing") --------------

def test_found_by_the_stranger():
    work = harness.scratch("stranger")
    written = stranger_sets.write_set(os.path.join(work, "in"), layers=1, mp=1, dp=2, seed=11, dtype=torch.float32)
    folder = os.path.join(work, "in")

    # --force replaces regular files only: never a FIFO or a link (nor /dev/null)
    fifo, link, target = (os.path.join(work, n) for n in ("fifo", "link.pt", "target.pt"))
    os.mkfifo(fifo)
    open(target, "wb").close()
    os.symlink(target, link)
    for path, kind in ((fifo, "a FIFO"), (link, "a symbolic link")):
        _, stderr = harness.run(["stitch", folder, "-o", path, "--force"], expect=1)
        assert f"output path is {kind}, not a regular file" in stderr, stderr
    assert os.path.islink(link) and os.path.getsize(target) == 0 and not os.path.isfile(fifo)

    # a plain state dict against safetensors: its tensors are the state dict
    plain = os.path.join(work, "plain.pt")
    torch.save({"w": torch.ones(3), "b": torch.zeros(2)}, plain)
    empty = os.path.join(work, "empty.safetensors")
    safetensors_check.write(empty, [])
    stdout, _ = harness.run(["diff", plain, empty], expect=1)
    assert "only in A: model/w" in stdout and "only in A: model/b" in stdout, stdout
    same = os.path.join(work, "same.safetensors")
    safetensors_check.write(same, [("w", torch.ones(3)), ("b", torch.zeros(2))])
    harness.run(["diff", plain, same])

    # a tie left out of safetensors is said
    _, stderr = harness.run(["stitch", folder, "-o", os.path.join(work, "s.safetensors")])
    assert "decoder.output_projection.weight is tied to decoder.embed_tokens.weight" in stderr, stderr

    # a flipped pickle byte is a CRC error, in every command
    broken = os.path.join(work, "broken")
    shutil.copytree(folder, broken)
    victim = os.path.join(broken, os.path.basename(written.files[1]))
    with open(victim, "rb") as f:
        data = bytearray(f.read())
    at = data.index(b"decoder.layers.0.flat_param_0")  # a key inside data.pkl
    data[at] ^= 0x01
    with open(victim, "wb") as f:
        f.write(data)
    for command in (["inspect", broken], ["manifest", broken, "-o", os.path.join(work, "m.json")],
                    ["stitch", broken, "-o", os.path.join(work, "b.pt")]):
        _, stderr = harness.run(command, expect=harness.EXIT["corrupt_data"])
        assert "data.pkl" in stderr and "CRC-32 of the pickle" in stderr, (command, stderr)

    # shard_metadata that fairscale could not consolidate either: refused by stitch and verify
    def edited(name, change):
        copy = os.path.join(work, name)
        shutil.copytree(folder, copy)
        for path in set_files(copy):
            ckpt = load_any(path)
            change(ckpt["shard_metadata"])
            torch.save(ckpt, path)
        return copy

    root = 0  # the root instance comes first (stranger_sets' default)
    for name, change, needle in (
            ("buffer", lambda md: md["buffer_names"].append("decoder.missing"), "lists decoder.missing"),
            ("tie-from", lambda md: md["param_metadata"][root]["shared_param_info"].append(
                ("decoder.nowhere.weight", "decoder.extra.weight")), "which no flat parameter holds"),
            ("tie-onto", lambda md: md["param_metadata"][root]["shared_param_info"].append(
                ("decoder.embed_tokens.weight", "decoder.layer_norm.weight")), "is a parameter of its own")):
        bad = edited(name, change)
        _, stderr = harness.run(["stitch", bad, "-o", os.path.join(work, name + ".pt")], expect=1)
        assert needle in stderr and "shard_metadata/" in stderr, (name, stderr)
        stdout, _ = harness.run(["verify", bad], expect=1)
        assert needle in stdout, (name, stdout)

    # a set is compared by its model, against a set, a one-file FSDP set or its stitched file
    one = os.path.join(work, "one")
    os.makedirs(one)
    harness.run(["reshard", folder, "--mp", 1, "--dp", 1, "-o", os.path.join(one, "checkpoint_last-shard{d}.pt")])
    stitched = os.path.join(work, "stitched.pt")
    harness.run(["stitch", folder, "-o", stitched])
    for other in (one, stitched):
        stdout, _ = harness.run(["diff", folder, other])
        assert stdout.startswith("equal: ") and "compared by its model state dict" in stdout, (other, stdout)

    # a protocol 1 pickle: what to do about it
    old = os.path.join(work, "old.pt")
    torch.save({"model": {"w": torch.ones(2)}}, old, pickle_protocol=1)
    _, stderr = harness.run(["inspect", old], expect=1)
    assert "pickle protocol 0 or 1" in stderr and "pickle_protocol=2" in stderr, stderr


# -- 200,000 small tensors (an MoE-sized state dict): every command works on it -----

def test_two_hundred_thousand_tensors():
    """The count, not the bytes: stitch gives every tensor back, in order, and
    inspect, manifest and inspect of the manifest read it (their time and memory are
    measured by `make bench`, not here)."""
    work = harness.scratch("200k")
    source = os.path.join(work, "many.pt")
    generator = torch.Generator().manual_seed(200)
    model = {f"decoder.layers.{i // 768}.experts.{(i // 3) % 256}.w{i % 3}": torch.randn(2, generator=generator)
             for i in range(200_000)}
    torch.save({"model": model}, source)
    out = os.path.join(work, "out.pt")
    _, stderr = harness.run(["stitch", source, "-o", out])
    assert "reading and planning" in stderr, stderr
    got = load_any(out)["model"]
    assert list(got) == list(model)
    assert torch.equal(torch.stack(list(got.values())), torch.stack(list(model.values())))
    stdout, _ = harness.run(["inspect", source])
    assert "parameters: 400,000" in stdout and "in 200000 stored tensor(s)" in stdout, stdout[:2000]
    manifest = os.path.join(work, "m.json.zst")
    harness.run(["manifest", source, "-o", manifest])
    stdout, _ = harness.run(["inspect", manifest])
    assert "parameters: 400,000" in stdout and "in 200000 stored tensor(s)" in stdout, stdout[:2000]


if __name__ == "__main__":
    harness.main([test_unflatten_repro, test_unflatten_property, test_swapped_names_repro, test_renamed_sets,
                  test_untied_output_projection_repro, test_untied_output_projection_property,
                  test_found_by_the_stranger, test_two_hundred_thousand_tensors])
