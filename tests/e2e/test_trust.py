#!/usr/bin/python3
"""Trust, end to end: ckpt-tool never writes a wrong or partial output and never
touches an input. Incomplete or mixed shard sets are refused by stitch, reshard
and diff and reported by inspect and verify alike, naming what is missing; files
that are not training checkpoints get a one-line answer; an output that is an
input is refused even with --force; a corrupted input byte stops the run before
anything is renamed; several outputs appear all together or not at all, whether
the run fails, fills the disk or is interrupted (SIGINT, SIGTERM); temporary
files of a killed run are recognized and removed by the next one. Every refusal
is exit 1 with one line on stderr, nothing left in the output directory and
the inputs byte-identical."""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zipfile

import torch

import harness
from harness import ckptcheck

FIXTURE = "mp2_dp2_fp16_omega_opt"


def digest(folder):
    """name -> sha256 of every file in `folder` (inputs must stay byte-identical)."""
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))}


def copy_case(name, work):
    """A private copy of fixture `name`'s shard files in work/in."""
    src = harness.fixtures()[name]
    dst = os.path.join(work, "in")
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.endswith(".pt"):
            shutil.copy(os.path.join(src, f), dst)
    return dst


def refused(args, *needles, code=1):
    """Runs the tool, expects exit `code` (one of them, if a tuple) and exactly one line
    on stderr holding every needle."""
    proc = subprocess.run([harness.TOOL] + [str(a) for a in args], capture_output=True, text=True)
    assert proc.returncode in (code if isinstance(code, tuple) else (code,)), (args, proc.returncode, proc.stderr)
    err = proc.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt-tool: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def problems_of(args):
    """inspect --json's problems for a set of files."""
    out, _ = harness.run(["inspect", "--json"] + args)
    return json.loads(out)["problems"]


def assert_refused_everywhere(files, out_dir, *needles):
    """stitch, reshard and diff refuse the set; inspect and verify report the same problem."""
    before = {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}
    incomplete = harness.EXIT["incomplete_set"]
    refused(["stitch", "-q"] + files + ["-o", os.path.join(out_dir, "out.pt")], *needles, code=incomplete)
    refused(["reshard", "-q"] + files + ["--mp", "1", "--dp", "1", "-o", os.path.join(out_dir, "r-{m}-{d}.pt")],
            *needles, code=incomplete)
    manifest = out_dir.rstrip("/") + "-manifest.json"
    harness.run(["manifest"] + files + ["-o", manifest, "--force"])
    refused(["diff", manifest, manifest], *needles, code=2)
    problems = problems_of(files)
    assert any(all(n in p for n in needles) for p in problems), problems
    out, _ = harness.run(["verify", "-q"] + files, expect=1)
    assert all(n in out for n in needles), out
    assert os.listdir(out_dir) == [], os.listdir(out_dir)
    assert before == {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def test_missing_model_part_at_the_end():
    # cfg says model_parallel_size 2; only part 0 is given: never half a model
    work = harness.scratch("trust-missing-part")
    folder = harness.fixtures()[FIXTURE]
    part0 = sorted(os.path.join(folder, f) for f in os.listdir(folder) if "model_part-0" in f)
    out = os.path.join(work, "out")
    os.makedirs(out)
    assert_refused_everywhere(part0, out, "model part 1 of 2 missing", "cfg.model.model_parallel_size = 2")
    # a consolidated part file alone (no FSDP, no cfg beyond model_parallel_size) says the same
    expected = os.path.join(folder, "expected", "part-0.pt")
    single = os.path.join(work, "reshard-model_part-0.pt")
    shutil.copy(expected, single)
    refused(["stitch", "-q", single, "-o", os.path.join(out, "x.pt")], "model part 1 of 2 missing", code=harness.EXIT["incomplete_set"])
    # the Namespace cfg of another case
    folder = harness.fixtures()["mp2_dp3_fp32_ns_args"]
    part0 = sorted(os.path.join(folder, f) for f in os.listdir(folder) if "model_part-0" in f)
    refused(["stitch", "-q"] + part0 + ["-o", os.path.join(out, "y.pt")], "model part 1 of 2 missing",
            "model_parallel_size = 2", code=harness.EXIT["incomplete_set"])


def test_a_stale_cfg_is_overridden_by_model_parts():
    # metaseq's reshard_model_parallel copies cfg unchanged: glued to one part, the
    # file still says model_parallel_size 2
    work = harness.scratch("trust-stale-cfg")
    folder = harness.fixtures()[FIXTURE]
    state = ckptcheck.load(os.path.join(folder, "expected", "consolidated.pt"))
    state["cfg"]["model"]["model_parallel_size"] = 2
    glued = os.path.join(work, "resharded-model_part-0.pt")
    torch.save(state, glued)
    out = os.path.join(work, "out.pt")
    refused(["stitch", "-q", glued, "-o", out], "model part 1 of 2 missing", "--model-parts overrides a stale cfg",
            code=harness.EXIT["incomplete_set"])
    assert problems_of([glued]) != []
    harness.run(["stitch", "-q", glued, "-o", out, "--model-parts", "1"])
    assert ckptcheck.load(out)["cfg"]["model"]["model_parallel_size"] == 1
    harness.run(["verify", "-q", glued, "--model-parts", "1"])
    out_json, _ = harness.run(["inspect", "--json", glued, "--model-parts", "1"])
    assert json.loads(out_json)["problems"] == []
    # the flag cannot make an incomplete set complete
    part0 = sorted(os.path.join(folder, f) for f in os.listdir(folder) if "model_part-0" in f)
    refused(["stitch", "-q"] + part0 + ["-o", os.path.join(work, "half.pt"), "--model-parts", "2"],
            "model part 1 of 2 missing (--model-parts 2)", code=harness.EXIT["incomplete_set"])


def test_missing_last_shard_is_named():
    work = harness.scratch("trust-missing-shard")
    folder = harness.fixtures()["mp2_dp3_fp32_ns_args"]
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".pt",)) and "shard2" not in f)
    assert_refused_everywhere(files, work, "shard 2 of 3 missing for model part 0")
    # DP-only names, the last rank of 3 missing
    folder = harness.fixtures()["mp1_dp3_bf16_ns_opt"]
    files = [os.path.join(folder, f"checkpoint_last-shard{d}.pt") for d in (0, 1)]
    refused(["stitch", "-q"] + files + ["-o", os.path.join(work, "z.pt")], "shard 2 of 3 missing for model part 0",
            code=harness.EXIT["incomplete_set"])


def test_plain_files_are_not_training_checkpoints():
    work = harness.scratch("trust-plain")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    cases = {
        "state_dict.pt": (model.state_dict(), "a plain state dict of 4 tensors"),
        "module.pt": (model, "a pickled Python object of class torch.nn.modules.container.Sequential"),
        "tensor.pt": (torch.ones(3), "a single tensor"),
    }
    for name, (obj, needle) in cases.items():
        path = os.path.join(work, name)
        torch.save(obj, path)
        out = os.path.join(work, name + ".out")
        refused(["stitch", "-q", path, "-o", out, "--dtype", "bf16"], path, needle, "'model' state dict")
        refused(["reshard", "-q", path, "--mp", "1", "--dp", "2", "-o", out + "-{d}"], path, needle)
        assert not os.path.exists(out)
        text, _ = harness.run(["inspect", path])  # inspect says what stitch would
        assert f"not a training checkpoint: {needle}" in text, text
        harness.run(["verify", "-q", path])  # an intact torch.save file verifies
    script = os.path.join(work, "script.pt")
    torch.jit.save(torch.jit.script(model), script)
    refused(["stitch", "-q", script, "-o", os.path.join(work, "s.out")], script, "TorchScript")
    assert sorted(os.listdir(work)) == ["module.pt", "script.pt", "state_dict.pt", "tensor.pt"], os.listdir(work)


def test_odd_inputs_answer_at_once():
    work = harness.scratch("trust-odd")
    fifo = os.path.join(work, "fifo.pt")
    os.mkfifo(fifo)
    proc = subprocess.run([harness.TOOL, "inspect", fifo], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc
    # a directory holding a link named like a checkpoint that cannot be followed (a loop,
    # a dangling link to a missing shard): named and refused at once, never skipped (the
    # stranger's finding: a set read without one of its files)
    folder = copy_case(FIXTURE, work)
    os.symlink("loop.pt", os.path.join(folder, "loop.pt"))
    _, err = harness.run(["stitch", "-q", folder, "-o", os.path.join(work, "out.pt")], expect=harness.EXIT["io"])
    assert "loop.pt" in err and err.count("\n") == 1, err
    os.remove(os.path.join(folder, "loop.pt"))
    refused(["reshard", "-q", folder, "--unflatten", "--mp", "1", "--dp", "2", "-o", os.path.join(work, "r{d}.pt")],
            "--unflatten", "--dp 1", code=2)
    # a manifest mixed with the files it indexes is not read as a zip
    manifest = os.path.join(work, "m.json")
    harness.run(["manifest", folder, "-o", manifest])
    refused(["stitch", "-q", manifest, folder, "-o", os.path.join(work, "mixed.pt")], manifest,
            "a manifest is the whole input set", code=harness.EXIT["usage"])


def test_inputs_are_never_written():
    work = harness.scratch("trust-inputs")
    inputs = copy_case(FIXTURE, work)
    before = digest(inputs)
    pattern = os.path.join(inputs, "checkpoint_last-model_part-{m}-shard{d}.pt")
    for force in ([], ["--force"]):
        err = refused(["reshard", "-q", inputs, "--mp", "1", "--dp", "2", "-o", pattern] + force,
                      "one of this run's input files")
        assert "--force to overwrite" not in err, err
        err = refused(["stitch", "-q", inputs, "-o", os.path.join(inputs, "checkpoint_last-model_part-1-shard1.pt")]
                      + force, "one of this run's input files")
    # through a symbolic link and a hard link, and through a manifest
    os.symlink(os.path.join(inputs, "checkpoint_last-model_part-0-shard0.pt"), os.path.join(work, "link.pt"))
    os.link(os.path.join(inputs, "checkpoint_last-model_part-0-shard1.pt"), os.path.join(work, "hard.pt"))
    for name in ("link.pt", "hard.pt"):
        refused(["stitch", "-q", inputs, "-o", os.path.join(work, name), "--force"], "one of this run's input files")
    manifest = os.path.join(work, "m.json")
    harness.run(["manifest", inputs, "-o", manifest])
    refused(["stitch", "-q", manifest, "-o", os.path.join(work, "link.pt"), "--force"], "input files")
    os.unlink(os.path.join(work, "hard.pt"))  # (a second name of an input: not part of `digest`)
    assert digest(inputs) == before
    assert sorted(os.listdir(inputs)) == sorted(before)


def swap_offsets(manifest):
    """Two tensors of files[1] at each other's place (same list, both in range)."""
    offsets, crcs = manifest["files"][1]["file_byte_offsets"], manifest["files"][1]["record_crc32s"]
    offsets[0], offsets[1] = offsets[1], offsets[0]
    crcs[0], crcs[1] = crcs[1], crcs[0]


def test_hand_edited_manifests_are_one_line_each():
    work = harness.scratch("trust-manifest")
    manifest = os.path.join(work, "m.json")
    harness.run(["manifest", harness.fixtures()[FIXTURE], "-o", manifest])
    good = json.load(open(manifest))
    edits = [
        (lambda m: m["files"][0].__setitem__("mp_part", -5), "files[0].mp_part", "-5"),
        (lambda m: m["files"][0].__setitem__("mp_part", 2000000000), "files[0].mp_part", "2000000000"),
        (lambda m: m["files"][1]["file_byte_offsets"].__setitem__(0, 10 ** 9),
         "files[1].file_byte_offsets[0]", "past the end of the file"),
        (lambda m: m["tensor_lists"][0][0].__setitem__("shape", [-4]), "tensor_lists[0][0].shape[0]", "negative"),
        (lambda m: m["files"][1].__setitem__("tensors", 99), "files[1].tensors", "refers to tensor_lists[99]"),
        (lambda m: m.__setitem__("version", 2), "version", "version 2 is not supported"),
        (lambda m: m.__setitem__("version", 3), "version", "version 3 is not supported"),
        # self-consistent edits that only the files can contradict: each tensor's place and
        # description, the FSDP metadata, the object tree
        (swap_offsets, "files[1].file_byte_offsets[0]", "does not describe"),
        (lambda m: m["tensor_lists"][0][0].__setitem__("dtype", "bfloat16"), "files[0].tensors (tensor 0)",
         "does not describe"),
        (lambda m: m["fsdp"][0]["param_metadata"][0]["flat_params"][0]["names"].reverse(), "files[0].fsdp",
         "does not describe"),
        (lambda m: m["object_trees"][0].__setitem__("extra", 1), "files[0].objects", "does not describe"),
        (lambda m: m["files"][0].__setitem__("model_parallel_size", {"parts": 2, "from": "x"}),
         "files[0].model_parallel_size.from", "is not a place"),
    ]
    for edit, field, needle in edits:
        bad = json.loads(json.dumps(good))
        edit(bad)
        path = os.path.join(work, "bad.json")
        json.dump(bad, open(path, "w"))
        for command in (["inspect", path], ["stitch", "-q", path, "-o", os.path.join(work, "out.pt")]):
            refused(command, path, field, needle)
    assert sorted(os.listdir(work)) == ["bad.json", "m.json"]


def flip_byte(path, record_suffix, delta=5):
    """Flips one bit inside the data of the record whose name ends with `record_suffix`."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        offset = info.header_offset + 30 + name_len + extra_len + delta
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))
    return info.filename


def test_corruption_is_never_laundered():
    work = harness.scratch("trust-corrupt")
    inputs = copy_case(FIXTURE, work)
    victim = os.path.join(inputs, "checkpoint_last-model_part-1-shard0.pt")
    record = flip_byte(victim, "/data/2")
    # the pickle is decoded, not copied: checked all the same (objects would carry the corruption)
    # the pickle is decoded, not copied: checked all the same (a flipped letter of a
    # string decodes fine and would be carried into every output)
    pickle_inputs = copy_case(FIXTURE, harness.scratch("trust-corrupt-pickle"))
    pickled = os.path.join(pickle_inputs, "checkpoint_last-model_part-0-shard0.pt")
    with zipfile.ZipFile(pickled) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        at = z.read(name).index(b"ddp_backend")  # a cfg key: nothing checks it
    flip_byte(pickled, "/data.pkl", delta=at + 3)
    refused(["reshard", "-q", pickle_inputs, "--mp", "2", "--dp", "2", "-o", os.path.join(work, "r-{m}-{d}.pt")],
            pickled, name, "CRC-32", "corrupted", code=harness.EXIT["corrupt_data"])

    out = os.path.join(work, "out")
    os.makedirs(out)
    refused(["stitch", "-q", inputs, "-o", os.path.join(out, "a.pt")], victim, record, "CRC-32", "corrupted", code=harness.EXIT["corrupt_data"])
    refused(["reshard", "-q", inputs, "--mp", "1", "--dp", "3", "-o", os.path.join(out, "r{d}.pt")], victim, record,
            code=harness.EXIT["corrupt_data"])
    refused(["stitch", "-q", inputs, "-o", os.path.join(out, "p{m}.pt"), "--no-stitch-megatron"], victim, record,
            code=harness.EXIT["corrupt_data"])
    assert os.listdir(out) == []
    # a byte in the padding of a flat parameter (read by no copy) is still caught
    work2 = harness.scratch("trust-corrupt-padding")
    inputs2 = copy_case("mp4_dp3_fp16_omega", work2)  # padding 2 in every instance
    victim = os.path.join(inputs2, "checkpoint_last-model_part-0-shard2.pt")
    manifest = os.path.join(work2, "m.json")
    harness.run(["manifest", victim, "-o", manifest])
    tensor = next(t for t in ckptcheck.manifest_files(json.load(open(manifest)))[0]["tensors"]
                  if t["path"] == "model/decoder.layers.0.flat_param_0")
    record = tensor["record_name"]
    with zipfile.ZipFile(victim) as z:
        size = z.getinfo(record).file_size
    flip_byte(victim, record, delta=size - 1)  # the last padding element
    refused(["stitch", "-q", inputs2, "-o", os.path.join(out, "b.pt")], victim, record, "CRC-32", code=harness.EXIT["corrupt_data"])
    # --no-crc-check copies what is there, and says so
    _, err = harness.run(["stitch", inputs, "-o", os.path.join(out, "c.pt"), "--no-crc-check"])
    assert "NOT checked" in err, err
    _, err = harness.run(["stitch", harness.fixtures()[FIXTURE], "-o", os.path.join(out, "d.pt")])
    assert "inputs checked against their CRC-32" in err, err


def modified_copy(work, change):
    """A copy of the fixture with `change(path, state)` applied to shard 1 of part 1 (torch.load/save)."""
    inputs = copy_case(FIXTURE, work)
    path = os.path.join(inputs, "checkpoint_last-model_part-1-shard1.pt")
    state = torch.load(path)
    change(state)
    torch.save(state, path)
    return inputs


def test_mixed_sets_are_reported_and_refused():
    def to_bf16(state):
        for k, v in state["model"].items():
            if v.is_floating_point():
                state["model"][k] = v.to(torch.bfloat16)

    work = harness.scratch("trust-mixed-dtype")
    inputs = modified_copy(work, to_bf16)
    out = os.path.join(work, "out")
    os.makedirs(out)
    files = sorted(os.path.join(inputs, f) for f in os.listdir(inputs))
    assert_refused_everywhere(files, out, "mixed dtypes")

    work = harness.scratch("trust-no-optimizer")
    inputs = modified_copy(work, lambda state: state.pop("last_optimizer_state"))
    out = os.path.join(work, "out")
    os.makedirs(out)
    files = sorted(os.path.join(inputs, f) for f in os.listdir(inputs))
    assert_refused_everywhere(files, out, "optimizer state in some files only")

    def later_step(state):
        state["optimizer_history"][-1]["num_updates"] += 1000
        state["extra_state"]["train_iterator"]["iterations_in_epoch"] += 1000

    work = harness.scratch("trust-other-step")
    inputs = modified_copy(work, later_step)
    out = os.path.join(work, "out")
    os.makedirs(out)
    files = sorted(os.path.join(inputs, f) for f in os.listdir(inputs))
    assert_refused_everywhere(files, out, "checkpoint_last-model_part-1-shard1.pt: saved at another training step",
                              "1250 != 250", "shards of different checkpoints")

    def other_parts(state):
        state["cfg"]["model"]["model_parallel_size"] = 4

    work = harness.scratch("trust-declared")
    inputs = modified_copy(work, other_parts)
    files = sorted(os.path.join(inputs, f) for f in os.listdir(inputs))
    problems = problems_of(files)
    assert any("model_parallel_size = 4" in p and "different checkpoints" in p for p in problems), problems


def test_clean_sets_stay_clean():
    for name, folder in harness.fixtures().items():
        assert problems_of([folder]) == [], (name, problems_of([folder]))
        harness.run(["verify", "-q", folder])


def synth_input(name, params="6e7"):
    """A synthetic 2 x 2 training checkpoint large enough to interrupt (about 120 MB), made once."""
    folder = os.path.join(harness.WORK, "trust-synth-" + name)
    if not os.path.exists(os.path.join(folder, "checkpoint_last-model_part-1-shard1.pt")):
        shutil.rmtree(folder, ignore_errors=True)
        harness.run(["synth", "-q", "-o", folder, "--params", params, "--mp", "2", "--dp", "2"])
    return folder


def wait_for_temp_files(folder, count, proc, deadline_s=60):
    """Polls until `count` temporary outputs exist in `folder` (the run is copying)."""
    end = time.time() + deadline_s
    while time.time() < end and proc.poll() is None:
        temps = [f for f in os.listdir(folder) if ".ckpt-tmp-" in f]
        if len(temps) >= count:
            return temps
        time.sleep(0.001)
    return None


def test_interrupted_reshard_leaves_nothing():
    inputs = synth_input("signals")
    before = digest(inputs)
    for sig in (signal.SIGINT, signal.SIGTERM):
        for stage in (1, 3):  # while writing the first output, and with two finished
            out = harness.scratch(f"trust-signal-{sig}-{stage}")
            proc = subprocess.Popen([harness.TOOL, "reshard", "-q", inputs, "--mp", "1", "--dp", "4", "--buffered-io",
                                     "--threads", "1", "-o", os.path.join(out, "c-{m}-{d}.pt")],
                                    stderr=subprocess.PIPE, text=True)
            temps = wait_for_temp_files(out, stage, proc)
            assert temps is not None, f"the run ended before {stage} temporary file(s) existed"
            proc.send_signal(sig)
            proc.wait()
            assert proc.returncode == -sig, (proc.returncode, proc.stderr.read())
            assert os.listdir(out) == [], os.listdir(out)
    # more outputs than a fixed table of temporary files would hold
    out = harness.scratch("trust-signal-many")
    proc = subprocess.Popen([harness.TOOL, "reshard", "-q", inputs, "--mp", "1", "--dp", "100", "--buffered-io",
                             "--threads", "1", "-o", os.path.join(out, "c-{d}.pt")], stderr=subprocess.PIPE, text=True)
    assert wait_for_temp_files(out, 80, proc) is not None, "the run ended before 80 temporary files existed"
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    assert proc.returncode == -signal.SIGTERM and os.listdir(out) == [], (proc.returncode, len(os.listdir(out)))
    # the folders a DCP set's run made (with its parents) go too, after the files in them
    out = harness.scratch("trust-signal-dcp")
    dcp = os.path.join(out, "made", "dcp")
    env = harness.preloaded(CKPT_SLOW_WRITES_MS="200")
    proc = subprocess.Popen([harness.TOOL, "stitch", "-q", inputs, "--format", "dcp", "--threads", "1", "-o", dcp],
                            stderr=subprocess.PIPE, text=True, env=env)
    end = time.time() + 60
    while time.time() < end and proc.poll() is None and not (
            os.path.isdir(dcp) and any(".ckpt-tmp-" in f for f in os.listdir(dcp))):
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    assert proc.returncode == -signal.SIGTERM and os.listdir(out) == [], (proc.returncode, os.listdir(out))
    assert digest(inputs) == before


def test_killed_run_leaves_recognizable_temps_that_the_next_run_removes():
    inputs = synth_input("signals")
    out = harness.scratch("trust-sigkill")
    pattern = os.path.join(out, "c-{m}-{d}.pt")
    proc = subprocess.Popen([harness.TOOL, "reshard", "-q", inputs, "--mp", "1", "--dp", "2", "--buffered-io",
                             "--threads", "1", "-o", pattern], stderr=subprocess.DEVNULL)
    temps = wait_for_temp_files(out, 1, proc)
    assert temps is not None
    proc.kill()
    proc.wait()
    left = sorted(os.listdir(out))
    assert left and all(f.startswith(".c-1-") or f.startswith(".c-0-") for f in left), left
    assert all(f.endswith(f".ckpt-tmp-{proc.pid}") for f in left), left
    _, err = harness.run(["reshard", inputs, "--mp", "1", "--dp", "2", "-o", pattern])
    for f in left:
        assert f"removed {os.path.join(out, f)}, left by an interrupted run (process {proc.pid} is no ckpt-tool run now)" in err, err
    assert sorted(os.listdir(out)) == ["c-0-0.pt", "c-0-1.pt"], os.listdir(out)


def test_many_stale_temps_are_all_removed_and_told_in_a_few_lines():
    inputs = harness.fixtures()[FIXTURE]
    out = harness.scratch("trust-many-temps")
    dead = 999999  # a pid no process has
    while os.path.exists(f"/proc/{dead}"):
        dead -= 1
    for d in range(8):
        open(os.path.join(out, f".c-0-{d}.pt.ckpt-tmp-{dead}"), "w").close()
    _, err = harness.run(["reshard", "-q", inputs, "--mp", "1", "--dp", "8", "-o", os.path.join(out, "c-{m}-{d}.pt")])
    notes = err.strip().splitlines()
    assert len(notes) == 6 and notes[-1] == "ckpt-tool: note: more of the same not shown", err
    assert sorted(os.listdir(out)) == [f"c-0-{d}.pt" for d in range(8)], os.listdir(out)


def test_disk_full_during_the_copy_leaves_nothing():
    inputs = copy_case(FIXTURE, harness.scratch("trust-enospc"))
    before = digest(inputs)
    out = harness.scratch("trust-enospc-out")
    env = harness.preloaded()
    for budget in (0, 20000, 60000):  # the first output, the second, the fourth (of 6)
        env["CKPT_FAIL_WRITES_AFTER_BYTES"] = str(budget)
        proc = subprocess.run([harness.TOOL, "reshard", "-q", inputs, "--mp", "2", "--dp", "3", "--buffered-io",
                               "-o", os.path.join(out, "c-{m}-{d}.pt")], env=env, capture_output=True, text=True)
        assert proc.returncode == harness.EXIT["no_space"], proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
        assert os.listdir(out) == [], os.listdir(out)
    assert digest(inputs) == before
    # synth and stitch --no-stitch-megatron are all or nothing too
    env["CKPT_FAIL_WRITES_AFTER_BYTES"] = "30000"
    proc = subprocess.run([harness.TOOL, "synth", "-q", "-o", out, "--params", "2e5", "--mp", "2", "--dp", "2"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == harness.EXIT["no_space"] and os.listdir(out) == [], (proc, os.listdir(out))
    proc = subprocess.run([harness.TOOL, "stitch", "-q", inputs, "--no-stitch-megatron", "-o",
                           os.path.join(out, "p{m}.pt")], env=env, capture_output=True, text=True)
    assert proc.returncode == harness.EXIT["no_space"] and os.listdir(out) == [], (proc, os.listdir(out))


def test_a_failed_rename_takes_back_the_set():
    inputs = harness.fixtures()[FIXTURE]
    out = harness.scratch("trust-rename")
    env = harness.preloaded(CKPT_FAIL_RENAME_AT="3")
    pattern = os.path.join(out, "c-{m}-{d}.pt")
    args = [harness.TOOL, "reshard", "-q", inputs, "--mp", "1", "--dp", "4", "-o", pattern]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == harness.EXIT["io"] and len(lines) == 1, proc
    assert "c-0-2.pt" in lines[0] and "the 2 output(s) renamed before it were removed again" in lines[0], lines
    assert os.listdir(out) == [], os.listdir(out)
    # over existing outputs (--force), the ones replaced cannot be taken back: named
    harness.run(["reshard", "-q", inputs, "--mp", "1", "--dp", "4", "-o", pattern])
    os.remove(os.path.join(out, "c-0-1.pt"))
    proc = subprocess.run(args + ["--force"], env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == harness.EXIT["io"] and len(lines) == 1, proc
    assert "the 1 output(s) renamed before it were removed again" in lines[0], lines
    assert f"these replaced existing files and stay: {os.path.join(out, 'c-0-0.pt')}" in lines[0], lines
    # the set's last file went before the first rename: what is left is visibly incomplete, never
    # new files beside the old last one (a sharded safetensors set's index)
    assert f"{os.path.join(out, 'c-0-3.pt')} (the set's last file, which it replaced) was removed" in lines[0], lines
    assert sorted(os.listdir(out)) == ["c-0-0.pt", "c-0-2.pt"], os.listdir(out)


def test_small_file_system_is_refused_before_copying():
    mount = harness.scratch("trust-tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mount], capture_output=True).returncode:
        print("skipped: cannot mount a tmpfs here (not root?)")
        return
    try:
        inputs = harness.fixtures()[FIXTURE]
        refused(["reshard", "-q", inputs, "--mp", "1", "--dp", "8", "-o", os.path.join(mount, "c-{d}.pt")],
                "not enough free space", code=harness.EXIT["no_space"])
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", mount], check=True)


def test_existing_outputs_all_checked_first():
    inputs = harness.fixtures()[FIXTURE]
    out = harness.scratch("trust-existing")
    open(os.path.join(out, "c-0-2.pt"), "w").write("precious")
    refused(["reshard", "-q", inputs, "--mp", "1", "--dp", "3", "-o", os.path.join(out, "c-{m}-{d}.pt")],
            "c-0-2.pt", "already exists")
    assert os.listdir(out) == ["c-0-2.pt"] and open(os.path.join(out, "c-0-2.pt")).read() == "precious"
    os.makedirs(os.path.join(out, "c-0-1.pt"))
    refused(["reshard", "-q", inputs, "--mp", "1", "--dp", "3", "-o", os.path.join(out, "c-{m}-{d}.pt"), "--force"],
            "c-0-1.pt", "directory", code=(1, 2))
    assert sorted(os.listdir(out)) == ["c-0-1.pt", "c-0-2.pt"]


def test_exit_codes_tell_the_kind_of_failure():
    """One exit code per kind of failure (README "Exit codes"), the same in every command that
    writes; diff answers 2 for each, verify 1 (a problem it found)."""
    work = harness.scratch("trust-exit-codes")
    out = os.path.join(work, "out")
    os.makedirs(out)
    corrupt = copy_case(FIXTURE, os.path.join(work, "corrupt"))
    flip_byte(os.path.join(corrupt, "checkpoint_last-model_part-0-shard1.pt"), "/data/0")
    no_shard = copy_case(FIXTURE, os.path.join(work, "no-shard"))
    for f in os.listdir(no_shard):
        if "shard1" in f:
            os.remove(os.path.join(no_shard, f))
    cases = [
        ("corrupt_data", corrupt, "CRC-32"),
        ("incomplete_set", no_shard, "shard 1 of 2 missing"),
        ("io", os.path.join(work, "absent-model_part-0-shard0.pt"), "cannot open"),
        ("bad_input", os.path.join(harness.SOURCE_ROOT, "README.md"), "README.md"),
    ]
    for kind, inputs, needle in cases:
        code = harness.EXIT[kind]
        refused(["stitch", "-q", inputs, "-o", os.path.join(out, "s.pt")], needle, code=code)
        refused(["reshard", "-q", inputs, "--mp", "1", "--dp", "1", "-o", os.path.join(out, "r.pt")], needle,
                code=code)
        if kind != "corrupt_data":  # diff reads no tensor data that both sides hold at the same place
            refused(["diff", inputs, harness.fixtures()[FIXTURE]], needle, code=2)
        assert os.listdir(out) == [], (kind, os.listdir(out))
    refused(["stitch", "-q", corrupt, "-o", os.path.join(out, "s.pt"), "--max-shard-size", "1x"], "--max-shard-size",
            code=harness.EXIT["usage"])
    harness.run(["verify", "-q", corrupt], expect=1)
    harness.run(["verify", "-q", no_shard], expect=1)

if __name__ == "__main__":
    harness.main([test_missing_model_part_at_the_end, test_a_stale_cfg_is_overridden_by_model_parts,
                  test_missing_last_shard_is_named,
                  test_plain_files_are_not_training_checkpoints, test_odd_inputs_answer_at_once,
                  test_inputs_are_never_written,
                  test_hand_edited_manifests_are_one_line_each, test_corruption_is_never_laundered,
                  test_mixed_sets_are_reported_and_refused,
                  test_clean_sets_stay_clean, test_interrupted_reshard_leaves_nothing,
                  test_killed_run_leaves_recognizable_temps_that_the_next_run_removes,
                  test_many_stale_temps_are_all_removed_and_told_in_a_few_lines,
                  test_disk_full_during_the_copy_leaves_nothing, test_a_failed_rename_takes_back_the_set,
                  test_small_file_system_is_refused_before_copying,
                  test_existing_outputs_all_checked_first, test_exit_codes_tell_the_kind_of_failure])
