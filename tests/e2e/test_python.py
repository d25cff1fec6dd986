#!/usr/bin/python3
"""The Python module ckpt_tool (issue 29): ckpt_tool.load of every fixture case equals
torch.load of the file `ckpt-tool stitch` writes, tensor for tensor; a tensor that lies
whole in one file is a view of the mapped file, and loading 1 GiB so costs far less
than 1 GiB of memory; glued tensors are filled window by window; open() reads only
what is asked for; corrupt bytes raise; DeepSpeed folders, safetensors and DCP read
as stitch reads them; the commands run in process, writing what the command line
writes; errors raise their class."""
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import zipfile

import torch

import deepspeed_sets as ds
import harness

PYTHONPATH = os.environ.get("CKPT_PYTHONPATH", "")
if PYTHONPATH:
    sys.path.insert(0, PYTHONPATH)
    import ckpt_tool


def _built():
    if not PYTHONPATH:  # (a build without pybind11, a sanitizer build: no module)
        print("skip: no Python module in this build (CKPT_PYTHONPATH unset)")
    return bool(PYTHONPATH)


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
    copied = ckpt_tool.load(path, mmap=False, check_crc=False)  # mmap=False: memory of its own (the file no
    # longer matches its CRC-32: unchecked)
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
                       (lambda: ckpt_tool.load(path, dtype="float17"), TypeError),
                       (lambda: ckpt_tool.load(path + "\0x"), ValueError),
                       (lambda: ckpt_tool.load(path, mmap="no"), TypeError),
                       (lambda: ckpt_tool.load(path, check_crc="false"), TypeError),
                       (lambda: ckpt_tool.load(path, dtype=torch.int64), TypeError),
                       (lambda: ckpt_tool.load(path, filter=5), TypeError),
                       (lambda: ckpt_tool.load(path, filter="("), ValueError)):
        try:
            call()
        except kind:
            continue
        raise AssertionError(f"no {kind.__name__}")
    assert ckpt_tool.load(path, dtype="bf16")["w"].dtype == torch.bfloat16  # the command line's names too
    # two tensors whose names join into one key: refused, not one of them dropped
    both = os.path.join(work, "both.pt")
    torch.save({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, both)
    try:
        ckpt_tool.load(both)
    except ckpt_tool.BadInputError as e:
        assert "both.pt: a/b: it and a.b are both the state dict key 'a.b'" in str(e), str(e)
    else:
        raise AssertionError("two tensors loaded under one key")
    # a file name that is no UTF-8 reaches the reader as it is
    odd = os.path.join(os.fsencode(work), b"\xff.pt")
    shutil.copy(path, odd)
    assert torch.equal(ckpt_tool.load(odd)["w"], torch.ones(2))
    assert list(ckpt_tool.load(path, filter=__import__("re").compile("w"))) == ["w"]


def test_glued_tensors_are_filled_window_by_window():
    """A synthetic 2 x 2 grid whose embedding (51 MiB, glued from four shards) spans
    several of the reader's 8 MiB windows."""
    if not _built():
        return
    work = harness.scratch("python-windows")
    folder = os.path.join(work, "synth")
    harness.run(["synth", "-q", "--params", "30e6", "--mp", "2", "--dp", "2", "--layers", "2", "-o", folder])
    out = os.path.join(work, "stitched.pt")
    harness.run(["stitch", "-q", folder, "-o", out])
    want = torch.load(out)["model"]
    assert max(t.numel() * t.element_size() for t in want.values()) > 3 * (8 << 20)
    _same(ckpt_tool.load(folder), want, "synth 2 x 2")
    _same(ckpt_tool.load(folder, mmap=False, check_crc=False), want, "synth 2 x 2, no CRC check")


def _rchar():
    """Bytes this process has read through read(2)/pread(2) so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_open_reads_only_what_is_asked_for():
    if not _built():
        return
    work = harness.scratch("python-open")
    path = os.path.join(work, "big.pt")
    torch.save({f"w{i}": torch.full((1 << 20,), float(i)) for i in range(8)}, path)  # 8 x 4 MiB
    before = _rchar()
    lazy = ckpt_tool.open(path, mmap=False)
    opened = _rchar() - before
    assert opened < (1 << 20), opened  # the index: the zip directory and the pickle, no tensor bytes
    before = _rchar()
    w3 = lazy["w3"]
    assert torch.equal(w3, torch.full((1 << 20,), 3.0))
    asked = _rchar() - before
    # w3's bytes, read once into the tensor and once for its record's CRC-32
    assert 2 * (4 << 20) <= asked < 2 * (4 << 20) + (1 << 20), asked
    before = _rchar()
    assert lazy["w3"] is w3
    assert _rchar() - before < 4096  # held: not read again (the rest: /proc/self/io itself)
    del w3  # dropped: its memory is freed, and a lookup reads its bytes again (its CRC only once)
    before = _rchar()
    assert torch.equal(lazy["w3"], torch.full((1 << 20,), 3.0))
    assert (4 << 20) <= _rchar() - before < (4 << 20) + (1 << 20)
    before = _rchar()
    filtered = ckpt_tool.load(path, filter=r"^w[01]$", check_crc=False, mmap=False)
    assert list(filtered) == ["w0", "w1"] and _rchar() - before < 2 * (4 << 20) + (1 << 20)


def test_corrupt_bytes_raise_and_name_the_file_and_tensor():
    if not _built():
        return
    work = harness.scratch("python-crc")
    path = os.path.join(work, "model.pt")
    torch.save({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(1000)}, path)
    data = bytearray(open(path, "rb").read())
    at = data.find(torch.arange(1000, dtype=torch.float32)[700:702].numpy().tobytes())
    data[at] ^= 0x40
    with open(path, "wb") as f:
        f.write(data)
    for call in (lambda: ckpt_tool.load(path), lambda: ckpt_tool.open(path, mmap=False)["a"]):
        try:
            call()
        except ckpt_tool.CorruptDataError as e:
            assert "model.pt: a: at byte" in str(e) and "CRC-32" in str(e), str(e)
        else:
            raise AssertionError("a corrupt byte loaded")
    assert torch.equal(ckpt_tool.open(path)["b"], torch.ones(1000))  # the other record is sound
    assert ckpt_tool.load(path, check_crc=False)["a"][700].item() != 700.0  # unchecked: the bytes as they are


# The peak RSS of loading a 1 GiB file, and where a view's bytes lie, in a fresh process.
_RSS_SCRIPT = r"""
import resource, sys
sys.path.insert(0, sys.argv[2])
import ckpt_tool, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
state = ckpt_tool.load(sys.argv[1], check_crc=sys.argv[3] == "check")
total = sum(t.numel() * t.element_size() for t in state.values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
spans = []
with open("/proc/self/maps") as f:
    for line in f:
        if line.rstrip().endswith(sys.argv[1]):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
biggest = max(state.values(), key=lambda t: t.numel())
inside = any(lo <= biggest.data_ptr() and biggest.data_ptr() + biggest.numel() * biggest.element_size() <= hi
             for lo, hi in spans)
print(total, peak - before, int(inside))
"""


def test_load_of_1_gib_shares_the_files_pages():
    if not _built():
        return
    work = harness.scratch("python-rss")
    folder = os.path.join(work, "synth")
    harness.run(["synth", "-q", "--params", "537e6", "--layers", "8", "-o", folder])
    path = os.path.join(work, "one.pt")
    harness.run(["stitch", "-q", folder, "-o", path])
    shutil.rmtree(folder)
    for check in ("check", "no-check"):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, PYTHONPATH, check], capture_output=True,
                             text=True, check=True).stdout.split()
        total, grown, inside = int(out[0]), int(out[1]), out[2] == "1"
        assert total > (1 << 30) * 0.95, total
        assert grown < 128 << 20, (check, grown)  # far less than the 1 GiB loaded
        assert inside, "the largest tensor's bytes are not the file's mapping"
    os.remove(path)


def test_the_commands_run_in_process_as_the_command_line_runs_them():
    if not _built():
        return
    work = harness.scratch("python-commands")
    case = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    # stitch and reshard: the same bytes as the command line's, progress told up to the total
    py, cli = os.path.join(work, "py"), os.path.join(work, "cli")
    for folder in (py, cli):
        os.makedirs(os.path.join(folder, "rs"))
    told = []
    written = ckpt_tool.stitch(case, os.path.join(py, "model.pt"), progress=lambda done, total: told.append((done, total)))
    assert written == [os.path.join(py, "model.pt")]
    assert told and told[-1][0] == told[-1][1] > 0, told
    harness.run(["stitch", "-q", case, "-o", os.path.join(cli, "model.pt")])
    ckpt_tool.stitch(case, os.path.join(py, "model.safetensors"), dtype=torch.bfloat16, max_shard_size="300B")
    harness.run(["stitch", "-q", case, "-o", os.path.join(cli, "model.safetensors"), "--dtype", "bf16",
                 "--max-shard-size", "300B"])
    ckpt_tool.reshard(case, os.path.join(py, "rs", "part-{m}-shard{d}.pt"), mp=1, dp=3)
    harness.run(["reshard", "-q", case, "-o", os.path.join(cli, "rs", "part-{m}-shard{d}.pt"), "--mp", "1", "--dp", "3"])
    assert len(os.listdir(os.path.join(py, "rs"))) == 3 and len([n for n in os.listdir(py) if "-of-" in n]) > 1
    harness.same_tree(py, cli)
    assert ckpt_tool.stitch(case, os.path.join(work, "later.pt"), save_plan=os.path.join(work, "plan.json")) == \
        [os.path.join(work, "plan.json")] and not os.path.exists(os.path.join(work, "later.pt"))
    plan = ckpt_tool.stitch(case, os.path.join(work, "never.pt"), dry_run=True)
    assert "decoder.embed_tokens.weight" in plan and not os.path.exists(os.path.join(work, "never.pt"))
    # inspect: the dict of --json
    stdout, _ = harness.run(["inspect", "--json", "--tensors", case])
    assert ckpt_tool.inspect(case, tensors=True) == json.loads(stdout)
    # diff: a result object
    same = ckpt_tool.diff(case, os.path.join(cli, "model.pt"))
    assert same.equal and same.differing == [] and same.compared_tensors > 0
    changed = os.path.join(work, "changed.pt")
    torch.save({"model": {k: (v + 1 if k == "decoder.layers.0.fc1.weight" else v)
                          for k, v in torch.load(os.path.join(cli, "model.pt"))["model"].items()}}, changed)
    other = ckpt_tool.diff(os.path.join(cli, "model.pt"), changed)
    assert not other.equal and [d["name"] for d in other.differing] == ["model/decoder.layers.0.fc1.weight"], other
    try:
        bool(other)
    except TypeError:
        pass
    else:
        raise AssertionError("a DiffResult read as a bool")
    # errors: their class and the command line's line
    for call, kind, fragment in (
            (lambda: ckpt_tool.stitch(case, os.path.join(py, "model.pt")), ckpt_tool.Error, "already exists"),
            (lambda: ckpt_tool.stitch(case, os.path.join(work, "x.pt"), no_such_flag=1), TypeError, "no_such_flag"),
            # a flag that takes a value given True would take the next argument as its value
            (lambda: ckpt_tool.stitch(case, os.path.join(work, "x.pt"), save_plan=True), TypeError, "takes a value"),
            (lambda: ckpt_tool.stitch(case, os.path.join(work, "x\0.pt")), ValueError, "null byte"),
            (lambda: ckpt_tool.stitch(case, os.path.join(work, "x.pt"), dtype="fp8"), ckpt_tool.UsageError, "fp8"),
            (lambda: ckpt_tool.reshard(case, os.path.join(work, "x.pt"), mp=1, dp=3), ckpt_tool.UsageError, "{d}"),
            (lambda: ckpt_tool.inspect(os.path.join(work, "none")), ckpt_tool.IoError, "none")):
        try:
            call()
        except kind as e:
            assert fragment in str(e), (fragment, str(e))
        else:
            raise AssertionError(f"no {kind.__name__}: {fragment}")
    # verify: the problem lines of `verify -q`; manifest: the dict `manifest` prints, or its file
    assert ckpt_tool.verify(case) == []
    damaged = os.path.join(work, "damaged")
    shutil.copytree(case, damaged)
    shard = os.path.join(damaged, sorted(n for n in os.listdir(damaged) if n.endswith(".pt"))[0])
    with zipfile.ZipFile(shard) as archive:  # the largest record's middle byte: tensor data
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(open(shard, "rb").read())
    local = record.header_offset + 30 + int.from_bytes(data[record.header_offset + 26:record.header_offset + 28],
                                                       "little") + \
        int.from_bytes(data[record.header_offset + 28:record.header_offset + 30], "little")
    data[local + record.file_size // 2] ^= 0x10
    open(shard, "wb").write(data)
    stdout, _ = harness.run(["verify", "-q", damaged], expect=1)
    problems = ckpt_tool.verify(damaged)
    assert problems and problems == stdout.splitlines(), (problems, stdout)
    stdout, _ = harness.run(["manifest", case])
    assert ckpt_tool.manifest(case) == json.loads(stdout)
    written = ckpt_tool.manifest(case, os.path.join(work, "index.json"))
    assert written == os.path.join(work, "index.json") and json.load(open(written)) == json.loads(stdout)
    # text output comes back too (diff without --json is not a function, but run() is the command line)
    from ckpt_tool import _ckpt_tool
    code, text, _ = _ckpt_tool.run([b"diff", os.fsencode(case), os.fsencode(os.path.join(cli, "model.pt"))])
    assert code == 0 and text.startswith(b"equal: "), text


def test_ctrl_c_and_a_raising_callback_stop_the_copy_and_leave_nothing():
    """A real SIGINT (from another thread, as a terminal's Ctrl-C reaches Python) and a
    callback that raises, each during the copy of a 0.5 GiB stitch: the exception is
    raised, no output and no temporary file is left; the next run writes it whole."""
    if not _built():
        return
    import signal
    import threading
    work = harness.scratch("python-interrupt")
    folder = os.path.join(work, "synth")
    harness.run(["synth", "-q", "--params", "268e6", "--mp", "2", "--dp", "2", "--layers", "4", "-o", folder])
    out = os.path.join(work, "out", "model.pt")
    os.makedirs(os.path.dirname(out))
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 1:
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)).start()

    class Stop(Exception):
        pass

    def raising(done, total):
        calls.append(done)
        raise Stop

    for callback, kind in ((interrupt, KeyboardInterrupt), (raising, Stop)):
        calls.clear()
        try:
            # (one copy thread: the copy lasts about a second, the interrupt lands within 0.2 s)
            ckpt_tool.stitch(folder, out, progress=callback, threads=1)
        except kind:
            pass
        else:
            raise AssertionError(f"no {kind.__name__}")
        assert os.listdir(os.path.dirname(out)) == [], os.listdir(os.path.dirname(out))
        assert calls and calls[0] < (512 << 20), calls  # stopped while copying
    assert ckpt_tool.stitch(folder, out) == [out]
    harness.run(["stitch", "-q", folder, "-o", os.path.join(work, "model.pt")])
    assert filecmp.cmp(out, os.path.join(work, "model.pt"), shallow=False)
    # The interpreter exiting while a daemon thread stitches: the copy is stopped at
    # exit (atexit), the process ends cleanly (it aborted: std::terminate), nothing is left.
    os.remove(out)
    script = ("import sys, threading, time\n"
              f"sys.path.insert(0, {PYTHONPATH!r})\n"
              "import ckpt_tool\n"
              "def work():\n"
              f"    ckpt_tool.stitch({folder!r}, {out!r}, threads=1)\n"
              "threading.Thread(target=work, daemon=True).start()\n"
              "time.sleep(0.3)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert os.listdir(os.path.dirname(out)) == [], os.listdir(os.path.dirname(out))


def test_threads_asking_for_one_tensor_at_once_get_one_tensor():
    if not _built():
        return
    import threading
    case = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    for mmap in (True, False):
        lazy = ckpt_tool.open(case, mmap=mmap)
        for key in list(lazy)[:6]:
            got = [None] * 8
            start = threading.Barrier(8)

            def ask(k):
                start.wait()
                got[k] = lazy[key]

            threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert all(t is got[0] for t in got), (key, mmap)
            assert lazy[key] is got[0]
    assert "StateDict of" in repr(lazy)


if __name__ == "__main__":
    harness.main([test_load_equals_the_stitched_file_for_every_fixture,
                  test_a_tensor_whole_in_one_file_is_a_view_of_the_mapping,
                  test_deepspeed_safetensors_and_filter,
                  test_errors_raise_their_class_with_the_line_ckpt_tool_prints,
                  test_arguments_of_the_wrong_kind,
                  test_glued_tensors_are_filled_window_by_window,
                  test_open_reads_only_what_is_asked_for,
                  test_corrupt_bytes_raise_and_name_the_file_and_tensor,
                  test_load_of_1_gib_shares_the_files_pages,
                  test_the_commands_run_in_process_as_the_command_line_runs_them,
                  test_ctrl_c_and_a_raising_callback_stop_the_copy_and_leave_nothing,
                  test_threads_asking_for_one_tensor_at_once_get_one_tensor])
