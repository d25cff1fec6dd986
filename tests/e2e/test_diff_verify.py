#!/usr/bin/python3
"""`ckpt-tool diff` and `verify`, and every kind of bad input: each gives one
clear line naming the file and what is wrong, exit code 1 (2 for diff errors),
and no file left at the output path; an existing output is never clobbered by
a failed run."""
import json
import os
import resource
import shutil
import subprocess
import zipfile

import torch

import harness
from harness import ckptcheck
from test_numbers import shortest


def copy_case(name, work):
    target = os.path.join(work, name)
    shutil.copytree(harness.fixtures()[name], target)
    return target


def data_offset(path, member_suffix):
    with zipfile.ZipFile(path) as z:
        info = [i for i in z.infolist() if i.filename.endswith(member_suffix)][0]
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.filename, info.header_offset + 30 + name_len + extra_len


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# ----------------------------------------------------------------- diff

def test_diff_equal_sets_and_files():
    folder = harness.fixtures()["mp2_dp8_fp16_ns_opt"]
    stdout, _ = harness.run(["diff", folder, os.path.join(folder, "expected", "consolidated.pt")])
    assert stdout.startswith("equal:"), stdout
    expected = os.path.join(folder, "expected", "consolidated.pt")
    stdout, _ = harness.run(["diff", expected, expected, "--json"])
    report = json.loads(stdout)
    assert report["equal"] and report["compared_tensors"] > 10


def test_diff_names_the_wrong_positions():
    folder = harness.fixtures()["mp4_dp3_fp16_omega"]
    work = harness.scratch("diff-positions")
    ckpt = ckptcheck.load(os.path.join(folder, "expected", "consolidated.pt"))
    w = ckpt["model"]["decoder.layers.1.fc1.weight"]
    w[3, 2] += 0.5
    w[7, 0] = -w[7, 0]
    ckpt["model"]["decoder.layers.0.fc2.bias"] = ckpt["model"]["decoder.layers.0.fc2.bias"].float()
    del ckpt["model"]["decoder.layers.2.fc1.bias"]
    ckpt["model"]["extra.weight"] = torch.zeros(2)
    ckpt["cfg"].model.dropout = 0.25
    changed = os.path.join(work, "changed.pt")
    torch.save(ckpt, changed)
    original = ckptcheck.load(os.path.join(folder, "expected", "consolidated.pt"))["model"]["decoder.layers.1.fc1.weight"]
    stdout, _ = harness.run(["diff", folder, changed], expect=1)
    assert "model/decoder.layers.1.fc1.weight: 2 of 32 elements differ" in stdout, stdout
    # fp16 values print with the fewest digits that read back as the same fp16 value
    x, y = shortest(original[3, 2].item(), torch.float16), shortest(w[3, 2].item(), torch.float16)
    assert f"model/decoder.layers.1.fc1.weight (3, 2): {x} != {y}" in stdout, stdout
    assert "(7, 0)" in stdout
    assert "model/decoder.layers.0.fc2.bias: dtype float16 != float32" in stdout
    assert "only in A: model/decoder.layers.2.fc1.bias" in stdout and "only in B: model/extra.weight" in stdout
    stdout, _ = harness.run(["diff", os.path.join(folder, "expected", "consolidated.pt"), changed], expect=1)
    assert "object cfg/model/dropout: 0.1 != 0.25" in stdout, stdout
    report = json.loads(harness.run(["diff", folder, changed, "--json", "--max-positions", "1"], expect=1)[0])
    fc1 = [d for d in report["differing"] if d["name"] == "model/decoder.layers.1.fc1.weight"][0]
    assert fc1["count"] == 2 and len(fc1["positions"]) == 1 and fc1["positions"][0]["index"] == [3, 2]
    assert abs(fc1["max_abs"] - 2 * abs(original[7, 0].item())) < 1e-3 or abs(fc1["max_abs"] - 0.5) < 1e-2


def test_diff_tolerances():
    folder = harness.fixtures()["mp1_dp1_fp32_ns"]
    work = harness.scratch("diff-tol")
    base = os.path.join(folder, "expected", "consolidated.pt")
    ckpt = ckptcheck.load(base)
    ckpt["model"]["decoder.layers.0.fc1.weight"][0, 0] += 1e-6
    near = os.path.join(work, "near.pt")
    torch.save(ckpt, near)
    harness.run(["diff", base, near], expect=1)
    harness.run(["diff", base, near, "--atol", "1e-5"])
    harness.run(["diff", base, near, "--rtol", "1e-9"], expect=1)
    _, stderr = harness.run(["diff", base, os.path.join(work, "missing.pt")], expect=2)
    assert "missing.pt" in stderr
    # integers and bool: exact whatever the tolerance (2**60 and 2**60 + 100 are one double)
    ints_a, ints_b = os.path.join(work, "ints_a.pt"), os.path.join(work, "ints_b.pt")
    torch.save({"model": {"steps": torch.tensor([2 ** 60, 5]), "mask": torch.tensor([True, False])}}, ints_a)
    torch.save({"model": {"steps": torch.tensor([2 ** 60 + 100, 5]), "mask": torch.tensor([True, False])}}, ints_b)
    for tolerance in ([], ["--atol", "0.5"], ["--rtol", "1e-20"], ["--atol", "1000", "--rtol", "1"]):
        out, _ = harness.run(["diff", ints_a, ints_b, "--json"] + tolerance, expect=1)
        report = json.loads(out)
        assert [d["name"] for d in report["differing"]] == ["model/steps"], (tolerance, report)
    flipped = os.path.join(work, "ints_c.pt")
    torch.save({"model": {"steps": torch.tensor([2 ** 60, 5]), "mask": torch.tensor([False, False])}}, flipped)
    harness.run(["diff", ints_a, flipped, "--atol", "1"], expect=1)
    harness.run(["diff", ints_a, ints_a, "--atol", "1"])


# ----------------------------------------------------------------- verify

def test_verify_clean_and_flipped_byte():
    work = harness.scratch("verify")
    folder = copy_case("mp2_dp2_fp16_omega_opt", work)
    stdout, _ = harness.run(["verify", folder])
    assert stdout.startswith("ok: 4 file(s)"), stdout
    target = os.path.join(folder, "checkpoint_last-model_part-1-shard0.pt")
    member, offset = data_offset(target, "/data/3")
    flip_byte(target, offset + 1)
    other = os.path.join(folder, "checkpoint_last-model_part-0-shard1.pt")
    member2, offset2 = data_offset(other, "/data/0")
    flip_byte(other, offset2)
    stdout, _ = harness.run(["verify", folder], expect=1)
    lines = [l for l in stdout.splitlines() if "CRC-32" in l]
    assert len(lines) == 2, stdout  # every problem, not only the first
    assert any(target in l and member in l and f"0x{offset:x}" in l for l in lines), stdout


def test_verify_metadata_problems():
    work = harness.scratch("verify-meta")
    folder = copy_case("mp2_dp3_fp32_ns_args", work)
    os.remove(os.path.join(folder, "checkpoint_last-model_part-1-shard2.pt"))
    stdout, _ = harness.run(["verify", folder], expect=1)
    assert "shard 2 of 3 missing for model part 1" in stdout
    # inconsistent padding: shard 1 claims one pad element more than it has
    path = os.path.join(folder, "checkpoint_last-model_part-0-shard1.pt")
    ckpt = ckptcheck.load(path)
    ckpt["shard_metadata"]["param_metadata"][0]["params"]["flat_param_0"]["padding"] += 1
    torch.save(ckpt, path)
    stdout, _ = harness.run(["verify", folder], expect=1)
    assert "padding" in stdout and "chunk rule" in stdout and "shard 2 of 3 missing for model part 1" in stdout, stdout


def test_mixed_checkpoints_are_refused():
    work = harness.scratch("mixed")
    a = copy_case("mp2_dp2_fp16_omega_opt", work)
    b = harness.fixtures()["mp2_dp8_fp16_ns_opt"]
    shutil.copy(os.path.join(b, "checkpoint_last-model_part-1-shard1.pt"),
                os.path.join(a, "checkpoint_last-model_part-1-shard1.pt"))
    stdout, _ = harness.run(["verify", a], expect=1)
    assert "differs" in stdout or "chunk rule" in stdout, stdout
    out = os.path.join(work, "out.pt")
    _, stderr = harness.run(["stitch", a, "-o", out], expect=harness.EXIT["incomplete_set"])
    assert stderr.count("\n") == 1 and "checkpoint_last-model_part-1-shard1.pt" in stderr, stderr
    assert not os.path.exists(out)


# ----------------------------------------------------------------- bad input, one line each

def one_line_error(args, expect=1):
    _, stderr = harness.run(args, expect=expect)
    assert stderr.startswith("ckpt-tool: error: ") and stderr.count("\n") == 1, stderr
    return stderr


def test_corrupt_inputs_name_file_and_place():
    work = harness.scratch("corrupt")
    src = os.path.join(harness.fixtures()["mp1_dp1_fp32_ns"], "checkpoint_last-shard0.pt")
    data = open(src, "rb").read()
    cases = {}
    cases["truncated.pt"] = (data[: len(data) - 200], "truncated")
    cd = data.rfind(b"PK\x01\x02")
    cases["bad-directory.pt"] = (data[:cd] + b"XX\x01\x02" + data[cd + 4:], "bad central directory entry signature")
    cases["not-zip.pt"] = (b"\x00" * 100, "not a zip archive")
    for name, (content, message) in cases.items():
        path = os.path.join(work, name)
        open(path, "wb").write(content)
        err = one_line_error(["inspect", path])
        assert name in err and message in err, err
        err = one_line_error(["stitch", path, "-o", os.path.join(work, name + ".out")])
        assert not os.path.exists(os.path.join(work, name + ".out"))
    legacy = os.path.join(work, "legacy.pt")
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert "legacy torch.save format" in one_line_error(["manifest", legacy])


def test_output_in_missing_or_read_only_directory():
    folder = harness.fixtures()["mp1_dp1_fp32_ns"]
    # a missing directory is a usage error (exit 2), found before the inputs are read
    err = one_line_error(["stitch", folder, "-o", "/nonexistent-dir/out.pt"], expect=2)
    assert "/nonexistent-dir" in err and "does not exist" in err
    # /proc takes no new files, even from root: it has no free space
    err = one_line_error(["stitch", folder, "-o", "/proc/out.pt"], expect=harness.EXIT["no_space"])
    assert "/proc/out.pt" in err


def limited(args, max_bytes):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return subprocess.run([harness.TOOL] + args, capture_output=True, text=True, preexec_fn=limit)


def test_disk_full_leaves_nothing_and_keeps_existing_output():
    folder = harness.fixtures()["mp2_dp8_fp16_ns_opt"]
    work = harness.scratch("disk-full")
    out = os.path.join(work, "out.pt")
    proc = limited(["stitch", "-q", folder, "-o", out], 4096)  # far below the output's size: EFBIG
    assert proc.returncode == harness.EXIT["no_space"], proc
    assert proc.stderr.startswith("ckpt-tool: error: ") and out in proc.stderr, proc.stderr
    assert os.listdir(work) == [], os.listdir(work)
    open(out, "w").write("precious")
    proc = limited(["stitch", "-q", folder, "-o", out, "--force"], 4096)
    assert proc.returncode == harness.EXIT["no_space"] and open(out).read() == "precious"
    assert os.listdir(work) == ["out.pt"]


def test_diff_checks_the_crc_of_every_byte_it_compares():
    """Found by the stranger: diff of a single torch file read corrupt bytes as data
    ("equal" for a file against itself); sets were checked, single files not."""
    work = harness.scratch("diff-crc")
    path = os.path.join(work, "plain.pt")
    torch.save({"w": torch.arange(12, dtype=torch.float32), "b": torch.ones(5)}, path)
    clean = os.path.join(work, "clean.pt")
    shutil.copy(path, clean)
    data = bytearray(open(path, "rb").read())
    at = data.find(torch.arange(12, dtype=torch.float32).numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x40
    open(path, "wb").write(data)
    for args in ([path, path], [path, clean], [clean, path]):
        _, err = harness.run(["diff"] + args, expect=2)
        assert "CRC-32" in err and "plain.pt" in err and err.count("\n") == 1, err
    harness.run(["diff", clean, clean])


if __name__ == "__main__":
    harness.main([test_diff_checks_the_crc_of_every_byte_it_compares, test_diff_equal_sets_and_files, test_diff_names_the_wrong_positions, test_diff_tolerances,
                  test_verify_clean_and_flipped_byte, test_verify_metadata_problems, test_mixed_checkpoints_are_refused,
                  test_corrupt_inputs_name_file_and_place, test_output_in_missing_or_read_only_directory,
                  test_disk_full_leaves_nothing_and_keeps_existing_output])
