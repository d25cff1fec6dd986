#!/usr/bin/python3
"""The command line: exit codes (0 success, 1 failure, 2 usage), one-line errors
naming the file and what is wrong, no clobbering, and a pickle that would run
`os.system` under torch.load is decoded as data by ckpt-tool and never run."""
import io
import json
import os
import shutil
import zipfile

import torch

import harness


def write_zip(path, entries):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)


def evil_pickle(module, command):
    # GLOBAL 'module system', BINUNICODE command, TUPLE1, REDUCE, STOP
    return (b"\x80\x02c" + module.encode() + b"\nsystem\n" + b"X" + len(command).to_bytes(4, "little") +
            command.encode() + b"\x85R.")


def test_usage_errors_exit_2():
    harness.run([], expect=2)
    harness.run(["inspect"], expect=2)
    harness.run(["inspect", "--no-such-flag", "x.pt"], expect=2)
    harness.run(["frobnicate"], expect=2)


def test_help_exits_0():
    stdout, _ = harness.run(["--help"])
    assert "manifest" in stdout and "inspect" in stdout
    stdout, _ = harness.run(["inspect", "--help"])
    assert "--tensors" in stdout and "--filter" in stdout


def test_missing_file():
    _, stderr = harness.run(["inspect", "/nonexistent/shard0.pt"], expect=harness.EXIT["io"])
    assert stderr.startswith("ckpt-tool: error: /nonexistent/shard0.pt: cannot open"), stderr
    assert stderr.count("\n") == 1


def test_not_a_zip_and_legacy_format():
    out = harness.scratch("bad-format")
    text = os.path.join(out, "notes.pt")
    open(text, "w").write("just some text, not a checkpoint\n")
    _, stderr = harness.run(["inspect", text], expect=1)
    assert "notes.pt" in stderr and "not a zip archive" in stderr, stderr
    legacy = os.path.join(out, "legacy.pt")
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    _, stderr = harness.run(["inspect", legacy], expect=1)
    assert "legacy.pt" in stderr and "legacy torch.save format" in stderr, stderr


def test_truncated_file_names_file_and_offset():
    folder = harness.fixtures()["mp1_dp1_fp32_ns"]
    out = harness.scratch("truncated")
    src = os.path.join(folder, "checkpoint_last-shard0.pt")
    data = open(src, "rb").read()
    cut = os.path.join(out, "cut.pt")
    open(cut, "wb").write(data[: len(data) // 2])
    _, stderr = harness.run(["manifest", cut], expect=1)
    assert "cut.pt" in stderr and "truncated" in stderr and stderr.count("\n") == 1, stderr


def test_unknown_opcode_names_the_record_and_offset():
    out = harness.scratch("opcode")
    path = os.path.join(out, "weird.pt")
    write_zip(path, [("weird/data.pkl", b"\x80\x02}q\x00\xff."), ("weird/version", b"3\n")])
    _, stderr = harness.run(["inspect", path], expect=1)
    assert "weird.pt: weird/data.pkl: at byte 0x" in stderr and "unsupported opcode 0xff" in stderr, stderr


def test_os_system_is_never_run():
    out = harness.scratch("evil")
    for module in ("os", "posix"):
        marker = os.path.join(out, f"pwned-{module}")
        path = os.path.join(out, f"evil-{module}.pt")
        write_zip(path, [("evil/data.pkl", evil_pickle(module, f"touch {marker}")), ("evil/version", b"3\n")])
        stdout, _ = harness.run(["inspect", path, "--json"])
        assert json.loads(stdout)["objects"]["$class"] == f"{module}.system"
        harness.run(["manifest", path])
        assert not os.path.exists(marker), "ckpt-tool ran the pickle's code"
        # the file really is dangerous: torch.load runs the command (here, in this process:
        # a `touch` of the marker, no second Python start)
        try:
            torch.load(path)
        except Exception:  # noqa: BLE001 - what torch makes of os.system's return value does not matter
            pass
        assert os.path.exists(marker), "the test pickle should run os.system under torch.load"


def test_output_is_never_clobbered():
    folder = harness.fixtures()["mp1_dp1_fp32_ns"]
    out = harness.scratch("clobber")
    target = os.path.join(out, "m.json")
    open(target, "w").write("precious")
    _, stderr = harness.run(["manifest", folder, "-o", target], expect=1)
    assert "already exists" in stderr and open(target).read() == "precious"
    harness.run(["manifest", folder, "-o", target, "--force"])
    assert json.load(open(target))["format"] == "ckpt-tool-manifest"
    # a usage error (exit 2): the output's folder is checked before the inputs are read
    _, stderr = harness.run(["manifest", folder, "-o", os.path.join(out, "no-such-dir", "m.json")], expect=2)
    assert "does not exist" in stderr
    assert sorted(os.listdir(out)) == ["m.json"], os.listdir(out)  # no temp file left behind


def test_inputs_as_files_globs_and_directories():
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    by_dir, _ = harness.run(["manifest", folder])
    by_glob, _ = harness.run(["manifest", os.path.join(folder, "checkpoint_last-model_part-*-shard*.pt")])
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pt"))
    by_files, _ = harness.run(["manifest"] + list(reversed(files)))
    assert by_dir == by_glob == by_files
    _, stderr = harness.run(["manifest", os.path.join(folder, "nothing-*.pt")], expect=1)
    assert "no file matches" in stderr


if __name__ == "__main__":
    harness.main([test_usage_errors_exit_2, test_help_exits_0, test_missing_file, test_not_a_zip_and_legacy_format,
                  test_truncated_file_names_file_and_offset, test_unknown_opcode_names_the_record_and_offset,
                  test_os_system_is_never_run, test_output_is_never_clobbered, test_inputs_as_files_globs_and_directories])
