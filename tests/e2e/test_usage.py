#!/usr/bin/python3
"""Usage errors: every bad argument exits 2 with exactly one line on stderr, before
any input is read or output created (the output folder is listed before and after,
the inputs' bytes and mtimes compared), and names from a checkpoint reach the
terminal with their control characters escaped."""
import hashlib
import os
import shutil
import subprocess

import torch

import harness


def snapshot(folder):
    """Every file and folder under `folder`, with each file's size, mtime and hash."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            state[os.path.relpath(os.path.join(root, name), folder) + "/"] = None
        for name in files:
            path = os.path.join(root, name)
            info = os.stat(path)
            state[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns,
                                                   hashlib.sha256(open(path, "rb").read()).hexdigest())
    return state


def setup(name, case="mp2_dp2_fp16_omega_opt"):
    """A scratch folder holding a copy of a fixture (`in/`) and an empty `out/`."""
    work = harness.scratch("usage-" + name)
    inputs = os.path.join(work, "in")
    shutil.copytree(harness.fixtures()[case], inputs)
    out = os.path.join(work, "out")
    os.makedirs(out)
    return inputs, out


def refused(args, cwd, watched, needle=""):
    """Runs the tool in `cwd`; asserts exit 2, one line on stderr (containing `needle`),
    and nothing changed under the `watched` folders."""
    before = {folder: snapshot(folder) for folder in watched}
    proc = subprocess.run([harness.TOOL] + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    shown = f"{args}: exit {proc.returncode}\nstdout: {proc.stdout[-1000:]}\nstderr: {proc.stderr[-1000:]}"
    assert proc.returncode == 2, shown
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), shown
    assert proc.stderr.startswith("ckpt-tool: error: "), shown
    assert needle in proc.stderr, f"expected {needle!r}\n{shown}"
    for folder in watched:
        assert snapshot(folder) == before[folder], f"{args} changed {folder}\n{shown}"
    return proc.stderr


def test_cli11_errors_are_one_line():
    _, out = setup("cli11")
    refused([], out, [out], "subcommand")
    refused(["inspect", "--no-such-flag", "x.pt"], out, [out])
    refused(["frobnicate"], out, [out])
    refused(["stitch", "x.pt"], out, [out], "--output")
    refused(["reshard", "x.pt", "--mp", "0", "--dp", "1", "-o", "{m}-{d}.pt"], out, [out], "--mp")


def refused_each(prefix, cases, cwd, watched):
    """`refused(prefix + args, ...)` for every (args, needle) in `cases`."""
    for args, needle in cases:
        refused(prefix + args, cwd, watched, needle)


def test_reshard_patterns():
    inputs, out = setup("reshard")
    os.makedirs(os.path.join(out, "x-1"))
    refused_each(["reshard", inputs], [
        (["--mp", "2", "--dp", "2", "-o", "x.pt"], "must contain {m} and {d}"),
        (["--mp", "1", "--dp", "2", "-o", "x.pt"], "must contain {d}"),
        (["--mp", "1", "--dp", "2", "-o", "x-{d}-{x}.pt"], "unknown field {x}"),
        (["--mp", "1", "--dp", "2", "-o", "x-{d.pt"], "stray '{'"),
        (["--mp", "1", "--dp", "2", "-o", "x-}{d}.pt"], "stray '}'"),
        (["--mp", "1", "--dp", "2", "-o", ""], "empty"),
        (["--mp", "1", "--dp", "2", "-o", "x-{d}/"], "names a directory"),
        (["--mp", "1", "--dp", "2", "-o", "nodir/x-{d}.pt"], "does not exist: nodir"),
        (["--mp", "12", "--dp", "12", "-o", "{m}{d}.pt"], "names two outputs"),
        (["--mp", "1", "--dp", "2", "-o", "x-{d}", "--force"], "(x-1): is an existing directory"),
    ], out, [inputs, out])


def test_stitch_patterns():
    inputs, out = setup("stitch")
    os.makedirs(os.path.join(out, "taken"))
    os.makedirs(os.path.join(out, "p-1"))
    refused_each(["stitch", inputs], [
        (["-o", "a-{m}.pt"], "{m} is not allowed here"),
        (["-o", "a-{d}.pt"], "{d} is not allowed here"),
        (["-o", "a-{x}.pt"], "unknown field {x}"),
        (["-o", ""], "empty"),
        (["-o", "a.pt/"], "names a directory"),
        (["-o", "nodir/a.pt"], "output directory does not exist: nodir"),
        (["-o", "a.pt", "--no-stitch-megatron"], "must contain {m}"),
        (["-o", "a-{m}-{d}.pt", "--no-stitch-megatron"], "{d} is not allowed"),
        (["-o", "a-{m", "--no-stitch-megatron"], "stray '{'"),
        (["-o", "taken"], "is an existing directory"),
        (["-o", "taken", "--force"], "is an existing directory"),
        # the part count is known only after reading: the substituted paths are checked before writing
        (["-o", "p-{m}", "--no-stitch-megatron", "--force"], "(p-1): is an existing directory"),
    ], out, [inputs, out])


def test_manifest_and_synth_outputs():
    inputs, out = setup("manifest")
    os.makedirs(os.path.join(out, "taken"))
    open(os.path.join(out, "file"), "w").write("x")
    refused_each(["manifest", inputs], [
        (["-o", ""], "empty"),
        (["-o", "m-{m}.json"], "{m} is not allowed here"),
        (["-o", "nodir/m.json"], "does not exist"),
        (["-o", "taken", "--force"], "is an existing directory"),
    ], out, [inputs, out])
    refused_each(["synth"], [
        (["-o", ""], "empty"),
        (["-o", "s-{m}"], "{m} is not allowed here"),
        (["-o", "file"], "not a directory"),
        (["-o", "file/sub"], "is not a directory"),
    ], out, [out])


def test_synth_numbers():
    _, out = setup("synth")
    for flag, value in [("--params", "-5"), ("--params", "0"), ("--params", "1e30"), ("--params", "nan"),
                        ("--params", "inf"), ("--layers", "0"), ("--layers", "-2"), ("--layers", "100000"),
                        ("--embed-dim", "-3"), ("--ffn-dim", "0"), ("--vocab", "-1"), ("--positions", "0"),
                        ("--embed-dim", "99999999999"), ("--threads", "5000"), ("--threads", "-1"),
                        ("--mp", "0")]:
        refused(["synth", "-o", "s", flag, value], out, [out], flag)
    # each dimension in range, the product too large: refused as an argument problem
    refused(["synth", "-o", "s", "--layers", "4096", "--embed-dim", "16777216", "--ffn-dim", "16777216"], out, [out],
            "parameters")
    refused(["synth", "-o", "s", "--mp", "3", "--embed-dim", "64"], out, [out], "not divisible by --mp 3")


def test_diff_and_threads_numbers():
    inputs, out = setup("numbers")
    a = os.path.join(inputs, "checkpoint_last-model_part-0-shard0.pt")
    for args in (["--atol", "-1"], ["--rtol", "-0.5"], ["--atol", "nan"], ["--rtol", "inf"],
                 ["--max-positions", "-1"], ["--threads", "2000"]):
        refused(["diff", a, a] + args, out, [inputs, out], args[0])
    refused(["stitch", inputs, "-o", "a.pt", "--threads", "5000"], out, [inputs, out], "--threads")
    refused(["verify", inputs, "--threads", "-1"], out, [inputs, out], "--threads")
    refused(["inspect", inputs, "--tensors", "--filter", "(["], out, [inputs, out], "'(['")


def test_control_characters_are_escaped():
    out = harness.scratch("usage-escape")
    hostile = "decoder.\x1b[2Jlayer\nforged line\x7f"
    a = os.path.join(out, "a.pt")
    b = os.path.join(out, "b.pt")
    torch.save({"model": {hostile: torch.ones(3), "plain": torch.zeros(2)}, "cfg": {"note\x1b[31m": "red\x1b[0m"}}, a)
    torch.save({"model": {hostile: torch.full((3,), 2.0), "plain": torch.zeros(2)},
                "only\nin b": torch.ones(1), "cfg": {"note\x1b[31m": "blue"}}, b)
    escaped = "decoder.\\x1b[2Jlayer\\nforged line\\x7f"
    stdout, _ = harness.run(["inspect", a, "--tensors"])
    assert "\x1b" not in stdout and "\x7f" not in stdout, stdout
    assert "model/" + escaped in stdout, stdout
    assert not any(line.startswith("forged") for line in stdout.splitlines()), stdout
    assert "note\\x1b[31m: 'red\\x1b[0m'" in stdout, stdout
    stdout, _ = harness.run(["diff", a, b], expect=1)
    assert "\x1b" not in stdout and "\x7f" not in stdout, stdout
    assert f"model/{escaped}: 3 of 3 elements differ" in stdout, stdout
    assert "only in B: only\\nin b" in stdout, stdout
    assert not any(line.startswith(("forged", "in b")) for line in stdout.splitlines()), stdout
    stdout, _ = harness.run(["stitch", a, "-o", os.path.join(out, "c.pt"), "--dry-run"])
    assert "\x1b" not in stdout and f"  {escaped} float32 [3]" in stdout, stdout
    # JSON output stays JSON-escaped (and parses)
    stdout, _ = harness.run(["inspect", a, "--tensors", "--json"])
    assert "\x1b" not in stdout


if __name__ == "__main__":
    harness.main([test_cli11_errors_are_one_line, test_reshard_patterns, test_stitch_patterns,
                  test_manifest_and_synth_outputs, test_synth_numbers, test_diff_and_threads_numbers,
                  test_control_characters_are_escaped])
