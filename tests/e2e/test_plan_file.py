#!/usr/bin/python3
"""Plans written down (--save-plan) and run later (`ckpt-tool apply`): the same bytes
as running at once, for every fixture case and every kind of output; inputs changed
in between refused with nothing written; plan files that are damaged refused in one line."""
import os
import shutil
import subprocess

import harness


def outputs(folder):
    return sorted(f for f in os.listdir(folder) if not f.endswith(".plan"))


# What each case is written to, run at once and through a plan: torch (glued and
# per part), reshard to another grid, safetensors and a Hugging Face folder.
JOBS = [
    ("stitch", ["stitch", "{in}", "-o", "{out}/model.pt"]),
    ("per-part", ["stitch", "{in}", "--no-stitch-megatron", "-o", "{out}/part-{{m}}.pt"]),
    ("reshard", ["reshard", "{in}", "--mp", "1", "--dp", "2", "-o", "{out}/r-{{m}}-{{d}}.pt"]),
    ("safetensors", ["stitch", "{in}", "-o", "{out}/model.safetensors"]),
    ("hf", ["stitch", "{in}", "--format", "hf", "-o", "{out}/hf"]),
]


def job_args(template, folder, out):
    return [a.replace("{in}", folder).replace("{out}", out).replace("{{", "{").replace("}}", "}") for a in template]


def test_every_fixture_plan_round_trips():
    for case, folder in harness.fixtures().items():
        for name, template in JOBS:
            at_once = harness.scratch(f"plan-{case}-{name}-direct")
            later = harness.scratch(f"plan-{case}-{name}-applied")
            harness.run(job_args(template, folder, at_once) + ["-q"])
            # Same output names, so that the archive names inside match too.
            os.rmdir(later)
            os.rename(at_once, later)
            os.mkdir(at_once)
            saved = os.path.join(later + ".plan")
            harness.run(job_args(template, folder, at_once) + ["-q", "--save-plan", saved])
            assert not os.path.exists(at_once) or outputs(at_once) == [], f"{case} {name}: --save-plan wrote outputs"
            # Applied from another working directory: the plan's paths are absolute.
            cwd = os.getcwd()
            os.chdir("/")
            try:
                harness.run(["apply", saved, "-q"])
            finally:
                os.chdir(cwd)
            harness.same_tree(at_once, later, keep=lambda n: not n.endswith(".plan"))
            shutil.rmtree(later)
            os.remove(saved)


def planned(name, folder):
    out = harness.scratch(name)
    saved = os.path.join(out, "p.plan")
    harness.run(["stitch", folder, "-o", os.path.join(out, "model.pt"), "-q", "--save-plan", saved])
    return out, saved


def test_an_input_changed_after_planning_is_refused():
    case = harness.scratch("plan-changed-input")
    shutil.copytree(harness.fixtures()["mp2_dp2_fp16_omega_opt"], case, dirs_exist_ok=True)
    out, saved = planned("plan-changed", case)
    victim = os.path.join(case, "checkpoint_last-model_part-1-shard0.pt")
    with open(victim, "ab") as f:
        f.write(b"\0")
    _, err = harness.run(["apply", saved], expect=1)
    assert "changed after it was planned" in err and os.path.realpath(victim) in err, err
    assert os.listdir(out) == ["p.plan"], os.listdir(out)


def test_an_input_edited_with_its_mtime_set_back_is_refused():
    case = harness.scratch("plan-ctime-input")
    shutil.copytree(harness.fixtures()["mp1_dp1_fp32_ns"], case, dirs_exist_ok=True)
    out, saved = planned("plan-ctime", case)
    victim = os.path.join(case, next(f for f in sorted(os.listdir(case)) if f.endswith(".pt")))
    stat = os.stat(victim)
    data = bytearray(open(victim, "rb").read())
    data[-100] ^= 1
    with open(victim, "r+b") as f:
        f.write(data)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime set back: only the ctime tells
    _, err = harness.run(["apply", saved, "--no-crc-check"], expect=1)
    assert "changed after it was planned" in err, err
    assert os.listdir(out) == ["p.plan"], os.listdir(out)


def test_every_flipped_byte_of_a_plan_is_refused():
    """Found by the stranger: a plan without a checksum applied with one byte flipped,
    writing other bytes (or to another path) with exit 0. Now a flip is refused in one
    line, or (a bit zstd does not read) gives exactly the plan's own output."""
    out, saved = planned("plan-flips", harness.fixtures()["mp1_dp1_fp32_ns"])
    model = os.path.join(out, "model.pt")
    harness.run(["apply", saved, "-q"])
    want = open(model, "rb").read()
    os.remove(model)
    data = open(saved, "rb").read()
    flipped = os.path.join(out, "flipped.plan")
    applied = 0
    for at in range(8, len(data), 5):  # every 5th byte (the magic: the damaged-file test)
        with open(flipped, "wb") as f:
            f.write(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
        proc = subprocess.run([harness.TOOL, "apply", flipped, "-q"], capture_output=True, text=True)
        if proc.returncode == 0:
            applied += 1
            assert open(model, "rb").read() == want, at
            os.remove(model)
            continue
        assert proc.returncode in (harness.EXIT["bad_input"], harness.EXIT["corrupt_data"]), (at, proc.returncode,
                                                                                           proc.stderr)
        assert proc.stderr.count("\n") == 1, (at, proc.stderr)
        assert sorted(os.listdir(out)) == ["flipped.plan", "p.plan"], (at, os.listdir(out))
    assert applied < (len(data) - 8) // 100, applied


def test_save_plan_refuses_what_could_never_be_applied():
    folder = harness.fixtures()["mp1_dp1_fp32_ns"]
    out = harness.scratch("plan-refusals")
    model = os.path.join(out, "model.pt")
    for extra in (["--save-plan", ""], ["--save-plan", model], ["--save-plan", os.path.join(out, "p"), "--dry-run"]):
        _, err = harness.run(["stitch", folder, "-o", model] + extra, expect=harness.EXIT["usage"])
        assert err.count("\n") == 1, (extra, err)
    assert os.listdir(out) == [], os.listdir(out)


def test_a_plan_is_never_its_own_output():
    out = harness.scratch("plan-self")
    saved = os.path.join(out, "self.plan")
    model = os.path.join(out, "model.pt")
    harness.run(["stitch", harness.fixtures()["mp1_dp1_fp32_ns"], "-o", model, "-q", "--save-plan", saved])
    other = os.path.join(out, "other.plan")
    before = open(saved, "rb").read()
    harness.run(["stitch", harness.fixtures()["mp1_dp1_fp32_ns"], "-o", saved, "-q", "--save-plan", other])
    _, err = harness.run(["apply", other, "--force"])
    assert open(saved, "rb").read() != before  # another plan's output may be a plan file, and is written
    harness.run(["stitch", harness.fixtures()["mp1_dp1_fp32_ns"], "-o", other, "-q", "--save-plan", other],
                expect=harness.EXIT["usage"])


def test_damaged_plan_files_are_refused_in_one_line():
    out, saved = planned("plan-damaged", harness.fixtures()["mp2_dp2_fp16_omega_opt"])
    data = open(saved, "rb").read()
    cases = {
        "empty": b"",
        "not a plan": b"PK\x03\x04" + data[4:],
        "truncated": data[: len(data) // 2],
        "other version": data[:8] + b"\x07\0\0\0" + data[12:],
        "trailing garbage": data + b"x",
    }
    for name, content in cases.items():
        path = os.path.join(out, name.replace(" ", "-") + ".plan")
        with open(path, "wb") as f:
            f.write(content)
        _, err = harness.run(["apply", path], expect=1)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckpt-tool: error: ") and path in lines[0], (name, err)
    assert outputs(out) == [], outputs(out)


if __name__ == "__main__":
    harness.main([test_every_fixture_plan_round_trips, test_an_input_changed_after_planning_is_refused,
                  test_an_input_edited_with_its_mtime_set_back_is_refused, test_every_flipped_byte_of_a_plan_is_refused,
                  test_save_plan_refuses_what_could_never_be_applied, test_a_plan_is_never_its_own_output,
                  test_damaged_plan_files_are_refused_in_one_line])
