#!/usr/bin/python3
"""The Python module ckpt_tool (issue 29, first step): ckpt_tool.load of every fixture
case equals torch.load of the file `ckpt-tool stitch` writes, tensor for tensor; a
tensor that lies whole in one file is a view of the mapped file; DeepSpeed folders,
safetensors and DCP read as stitch reads them; errors raise their class."""
import os
import shutil
import sys

import torch

import deepspeed_sets as ds
import harness

PYTHONPATH = os.environ.get("CKPT_PYTHONPATH", "")
if PYTHONPATH:
    sys.path.insert(0, PYTHONPATH)
    import ckpt_tool


def _built():
    return bool(PYTHONPATH)  # (a build without pybind11 has no module: these tests are skipped)


def _same(got, want, where, ordered=True):
    if ordered:
        assert list(got) == list(want), (where, list(got)[:5], list(want)[:5])
    assert sorted(got) == sorted(want), (where, sorted(got)[:5], sorted(want)[:5])
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, (where, key)
        assert torch.equal(got[key], tensor), (where, key)


def test_load_equals_the_stitched_file_for_every_fixture():
    if not _built():
        return
    work = harness.scratch("python-fixtures")
    for case, folder in harness.fixtures().items():
        out = os.path.join(work, case + ".pt")
        proc = harness.subprocess.run([harness.TOOL, "stitch", "-q", folder, "-o", out], capture_output=True)
        if proc.returncode != 0:  # a set stitch refuses is refused here too, with its class
            try:
                ckpt_tool.load(folder)
            except ckpt_tool.Error as e:
                assert str(e).splitlines()[0] in proc.stderr.decode(), (case, str(e), proc.stderr)
                continue
            raise AssertionError(f"{case}: stitch refused it, load did not")
        stitched = harness.load_fixture(out)  # (torch.load with the fixtures' classes importable)
        want = stitched["model"] if isinstance(stitched, dict) and "model" in stitched else stitched
        _same(ckpt_tool.load(folder), want, case)
        _same(ckpt_tool.load(out), want, case + " (the stitched file)")
        _same(ckpt_tool.load(folder, mmap=False), want, case + " (mmap=False)")


def test_a_tensor_whole_in_one_file_is_a_view_of_the_mapping():
    if not _built():
        return
    work = harness.scratch("python-views")
    path = os.path.join(work, "plain.pt")
    torch.save({"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16)}, path)
    loaded = ckpt_tool.load(path)
    assert torch.equal(loaded["w"], torch.arange(1000, dtype=torch.float32))
    # A change in place (an optimizer step) is the process's own: no fault, the file unchanged.
    before = open(path, "rb").read()
    loaded["b"].add_(1)
    loaded["w"][0] = 42.0
    assert loaded["w"][0].item() == 42.0 and loaded["b"].tolist() == [2.0, 2.0, 2.0]
    assert open(path, "rb").read() == before
    assert ckpt_tool.load(path)["w"][0].item() == 0.0
    loaded = ckpt_tool.load(path)
    # The bytes are the file's pages: a change to the file shows through (no copy was made).
    with open(path, "r+b") as f:
        data = f.read()
        at = data.find(torch.arange(1000, dtype=torch.float32)[500:502].numpy().tobytes())
        assert at > 0
        f.seek(at)
        f.write(torch.tensor([-7.0], dtype=torch.float32).numpy().tobytes())
    assert loaded["w"][500].item() == -7.0
    copied = ckpt_tool.load(path, mmap=False)  # mmap=False: memory of its own
    assert copied["w"][500].item() == -7.0
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(torch.tensor([500.0], dtype=torch.float32).numpy().tobytes())
    assert loaded["w"][500].item() == 500.0 and copied["w"][500].item() == -7.0


def test_deepspeed_safetensors_and_filter():
    if not _built():
        return
    work = harness.scratch("python-layouts")
    model = ds.Model(seed=5, dtype=torch.bfloat16)
    root = os.path.join(work, "ds")
    folder = ds.write_set(root, model, 3, 4, bf16=True)
    got = ckpt_tool.load(root)
    want = ds.reference_zero_to_fp32(folder)
    _same(got, want, "deepspeed")
    assert got["lm_head.weight"] is got["head.weight"]  # a tie: one tensor under both keys
    st = os.path.join(work, "model.safetensors")
    harness.run(["stitch", "-q", root, "-o", st])
    _same(ckpt_tool.load(st), {k: v for k, v in want.items() if k != "lm_head.weight"}, "safetensors",
          ordered=False)  # (ckpt-tool writes a safetensors file largest elements first, for alignment)
    only = ckpt_tool.load(root, filter=r"^layers\.1\.")
    assert list(only) == ["layers.1.weight", "layers.1.bias"], list(only)
    lazy = ckpt_tool.open(root)  # read on access: keys and shapes from the metadata
    assert list(lazy) == list(want) and lazy.shape("layers.1.weight") == want["layers.1.weight"].shape
    assert torch.equal(lazy["head.weight"], want["head.weight"]) and lazy["lm_head.weight"] is lazy["head.weight"]
    assert "param_shapes" in lazy.metadata() or "optimizer_state_dict" in lazy.metadata()
    half = ckpt_tool.load(root, dtype=torch.bfloat16)
    assert half["layers.0.weight"].dtype == torch.bfloat16 and half["embed.position_ids"].dtype == torch.bfloat16


def test_errors_raise_their_class_with_the_line_ckpt_tool_prints():
    if not _built():
        return
    work = harness.scratch("python-errors")
    case = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    partial = os.path.join(work, "partial")
    shutil.copytree(case, partial)
    for name in os.listdir(partial):
        if "shard1" in name:
            os.remove(os.path.join(partial, name))
    for path, kind, fragment in ((partial, ckpt_tool.IncompleteSetError, "not one consistent MP x DP grid"),
                                 (os.path.join(work, "nothing.pt"), ckpt_tool.IoError, "nothing.pt"),
                                 (os.path.join(work, "junk.pt"), ckpt_tool.BadInputError, "junk.pt")):
        if path.endswith("junk.pt"):
            with open(path, "wb") as f:
                f.write(b"not a checkpoint")
        try:
            ckpt_tool.load(path)
        except kind as e:
            assert isinstance(e, ckpt_tool.Error) and fragment in str(e), (kind, str(e))
        else:
            raise AssertionError(f"{path}: no {kind.__name__}")


def test_arguments_of_the_wrong_kind():
    if not _built():
        return
    work = harness.scratch("python-arguments")
    path = os.path.join(work, "x.pt")
    torch.save({"w": torch.ones(2)}, path)
    for call, kind in ((lambda: ckpt_tool.load(""), ValueError), (lambda: ckpt_tool.load([]), ValueError),
                       (lambda: ckpt_tool.load(5), TypeError), (lambda: ckpt_tool.load([path, 5]), TypeError),
                       (lambda: ckpt_tool.load(path, dtype="float16"), TypeError),
                       (lambda: ckpt_tool.load(path, dtype=torch.int64), TypeError),
                       (lambda: ckpt_tool.load(path, filter=5), TypeError),
                       (lambda: ckpt_tool.load(path, filter="("), ValueError)):
        try:
            call()
        except kind:
            continue
        raise AssertionError(f"no {kind.__name__}")
    # a file name that is no UTF-8 reaches the reader as it is
    odd = os.path.join(os.fsencode(work), b"\xff.pt")
    shutil.copy(path, odd)
    assert torch.equal(ckpt_tool.load(odd)["w"], torch.ones(2))
    assert list(ckpt_tool.load(path, filter=__import__("re").compile("w"))) == ["w"]


if __name__ == "__main__":
    harness.main([test_load_equals_the_stitched_file_for_every_fixture,
                  test_a_tensor_whole_in_one_file_is_a_view_of_the_mapping,
                  test_deepspeed_safetensors_and_filter,
                  test_errors_raise_their_class_with_the_line_ckpt_tool_prints,
                  test_arguments_of_the_wrong_kind])
