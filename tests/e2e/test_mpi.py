#!/usr/bin/python3
"""One job over several processes (mpirun -np N): the bytes one process writes, for
every fixture case, every output kind and an output large enough to be written in
parts by several ranks; all or nothing when a rank fails (ENOSPC, a corrupt input,
SIGKILL mid-copy), said once in one line naming the rank; commands without a plan
end the job as one process would. The ranks share this machine's 2 cores: these
tests check bytes and behaviour, never speed. Skipped where mpirun is absent."""
import filecmp
import os
import shutil
import signal
import struct
import subprocess
import time
import zipfile

import torch

import harness

MPIRUN = shutil.which("mpirun")
# As root in a container: Open MPI refuses root without the flag, and more
# ranks than cores without --oversubscribe.
MPI = [MPIRUN, "--allow-run-as-root", "--oversubscribe"] if MPIRUN else []
if not MPIRUN:
    print("mpirun not found (apt-get install openmpi-bin): every test here is skipped")
# Under the sanitizers (make sanitize), LeakSanitizer would report what Open MPI
# leaves allocated at MPI_Finalize (its op tables, its plugins): the ranks run
# without leak detection; ckpt-tool's own leaks are the one-process tests'.
MPI_ENV = dict(os.environ)
if "ASAN_OPTIONS" in MPI_ENV:
    MPI_ENV["ASAN_OPTIONS"] += ":detect_leaks=0"


def mpi_run(ranks, args, expect=0, rank_env=None):
    """`mpirun -np ranks ckpt-tool args`; with rank_env, the last rank runs with those
    variables (MPMD: the others as given). Returns (stdout, stderr)."""
    tool = [harness.TOOL] + [str(a) for a in args]
    if rank_env is None:
        command = MPI + ["-np", str(ranks)] + tool
    else:
        env = ["env"] + [f"{k}={v}" for k, v in rank_env.items()]
        command = MPI + ["-np", str(ranks - 1)] + tool + [":", "-np", "1"] + env + tool
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=MPI_ENV)
    if proc.returncode != expect:
        raise AssertionError(f"{' '.join(command)}: exit {proc.returncode}, expected {expect}\n"
                             f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr


def shim_env(name, value):
    """The variables of one rank that runs with the fault shim (tests/e2e/faults.cpp)
    and the fault `name`=`value`; under ASan the shim comes before ASan's runtime."""
    env = {"LD_PRELOAD": os.environ["CKPT_FAULTS"], name: value}
    if "ASAN_OPTIONS" in MPI_ENV:
        env["ASAN_OPTIONS"] = MPI_ENV["ASAN_OPTIONS"] + ":verify_asan_link_order=0"
    return env


def tool_lines(stderr):
    """The lines ckpt-tool wrote (mpirun adds blocks of its own on failure)."""
    return [line for line in stderr.splitlines() if line.startswith("ckpt-tool:")]


def nothing_written(folder):
    left = os.listdir(folder) if os.path.isdir(folder) else []
    assert left == [], f"{folder}: {left}"


JOBS = [
    ("stitch", ["stitch", "{in}", "-o", "{out}/model.pt"]),
    ("reshard", ["reshard", "{in}", "--mp", "1", "--dp", "3", "-o", "{out}/r-{{m}}-{{d}}.pt"]),
    ("safetensors", ["stitch", "{in}", "--max-shard-size", "20KB", "-o", "{out}/model.safetensors"]),
    ("dcp", ["stitch", "{in}", "--format", "dcp", "--max-shard-size", "20KB", "-o", "{out}/dcp"]),
    ("hf", ["stitch", "{in}", "--format", "hf", "-o", "{out}/hf"]),
]


def job_args(template, folder, out):
    return [a.replace("{in}", folder).replace("{out}", out).replace("{{", "{").replace("}}", "}") for a in template]


def alone_then_ranks(name, template, folder, rank_counts):
    """Runs the job alone, then with each rank count into a folder of the same
    name (archive names inside a torch file come from it), comparing bytes."""
    alone = harness.scratch(f"mpi-{name}-alone")
    harness.run(job_args(template, folder, alone) + ["-q"])
    for ranks in rank_counts:
        out = harness.scratch(f"mpi-{name}-np")
        mpi_run(ranks, job_args(template, folder, out) + ["-q"])
        harness.same_tree(alone, out)


def test_every_fixture_same_bytes_with_2_and_3_ranks():
    if not MPIRUN:
        return
    for case, folder in harness.fixtures().items():
        for job, template in JOBS[:2]:
            # Cases the job refuses alone (not a training checkpoint) are refused the same way.
            probe = harness.scratch(f"mpi-probe-{case}")
            proc = subprocess.run([harness.TOOL] + job_args(template, folder, probe) + ["-q"], capture_output=True)
            if proc.returncode != 0:
                _, err = mpi_run(2, job_args(template, folder, harness.scratch(f"mpi-probe-{case}-np")) + ["-q"],
                                 expect=proc.returncode)
                assert tool_lines(err) == tool_lines(proc.stderr.decode()), (case, err)
                continue
            alone_then_ranks(f"{case}-{job}", template, folder, [2, 3])


def test_every_output_kind_same_bytes_with_1_to_4_ranks():
    if not MPIRUN:
        return
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    for job, template in JOBS:
        alone_then_ranks(f"kinds-{job}", template, folder, [1, 2, 3, 4])


def test_a_deepspeed_checkpoint_same_bytes_with_2_and_3_ranks():
    """A DeepSpeed ZeRO-3 folder (issue 28) stitched by one job: the same files as alone."""
    if not MPIRUN:
        return
    import deepspeed_sets
    root = harness.scratch("mpi-deepspeed-set")
    deepspeed_sets.write_set(root, deepspeed_sets.Model(seed=4), 3, 4, bf16=True)
    for job, template in (("ds-torch", ["stitch", "{in}", "-o", "{out}/model.pt"]),
                          ("ds-optimizer", ["stitch", "{in}", "--optimizer-state", "-o", "{out}/model.pt"]),
                          ("ds-safetensors", ["stitch", "{in}", "--max-shard-size", "4KB", "-o",
                                              "{out}/model.safetensors"])):
        alone_then_ranks(job, template, root, [2, 3])


def large_set():
    """A training checkpoint whose stitched output (about 70 MiB) spans several
    8 MiB units: with 2..4 ranks it is one file written in parts."""
    folder = os.path.join(harness.WORK, "mpi-large-set")
    if not os.path.exists(os.path.join(folder, "done")):
        shutil.rmtree(folder, ignore_errors=True)
        harness.run(["synth", "-o", folder, "--mp", "2", "--dp", "3", "--layers", "2", "--embed-dim", "1024",
                     "--ffn-dim", "4096", "--vocab", "4096", "--optimizer-state", "-q"])
        open(os.path.join(folder, "done"), "w").close()
    return folder


def test_one_large_output_written_in_parts_is_the_same_file():
    if not MPIRUN:
        return
    folder = large_set()
    for job, template in [
        ("stitch", ["stitch", "{in}", "-o", "{out}/model.pt"]),
        ("bf16-safetensors", ["stitch", "{in}", "--dtype", "bf16", "-o", "{out}/model.safetensors"]),
        ("buffered-threads", ["stitch", "{in}", "--buffered-io", "--threads", "1", "-o", "{out}/model.pt"]),
        ("reshard", ["reshard", "{in}", "--mp", "1", "--dp", "2", "-o", "{out}/r-{{m}}-{{d}}.pt"]),
    ]:
        alone_then_ranks(f"large-{job}", template, folder, [2, 3, 4])
    # --stats names every rank and what it wrote: the one file in parts.
    out = harness.scratch("mpi-large-stats")
    _, err = mpi_run(3, ["stitch", folder, "-o", os.path.join(out, "model.pt"), "--stats"])
    for rank in range(3):
        assert f"stats: rank {rank} of 3:" in err and "1 part(s) of shared files" in err, err


def test_a_rank_out_of_space_fails_the_job_in_one_line_and_writes_nothing():
    if not MPIRUN:
        return
    folder = large_set()
    for name, args in [("stitch", ["stitch", folder, "-o", "{out}/model.pt"]),
                       ("reshard", ["reshard", folder, "--mp", "2", "--dp", "4", "-o", "{out}/r-{{m}}-{{d}}.pt"])]:
        out = harness.scratch(f"mpi-enospc-{name}")
        args = [a.replace("{out}", out).replace("{{", "{").replace("}}", "}") for a in args]
        env = shim_env("CKPT_FAIL_WRITES_AFTER_BYTES", "1000000")
        _, err = mpi_run(3, args, expect=73, rank_env=env)
        lines = tool_lines(err)
        assert len(lines) == 1 and lines[0].startswith("ckpt-tool: error: rank 2 of 3: ") and \
            "No space left on device" in lines[0], err
        nothing_written(out)


def test_a_failed_job_leaves_no_folder_it_made():
    """The folders made for a DCP set or a Hugging Face folder go too: after every
    rank removed its temporary files in them (a stranger found them left, empty)."""
    if not MPIRUN:
        return
    folder = large_set()
    parent = harness.scratch("mpi-made-folders")
    env = shim_env("CKPT_FAIL_WRITES_AFTER_BYTES", "1000000")
    for fmt, extra in [("dcp", ["--max-shard-size", "20MB"]), ("hf", ["--max-shard-size", "20MB"])]:
        out = os.path.join(parent, fmt)
        _, err = mpi_run(3, ["stitch", folder, "--format", fmt, "-o", out] + extra, expect=73, rank_env=env)
        assert len(tool_lines(err)) == 1, err
        nothing_written(parent)


def test_ranks_started_with_another_command_line_fail_the_job():
    if not MPIRUN:
        return
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    out = harness.scratch("mpi-mpmd")
    tool = harness.TOOL
    command = MPI + ["-np", "1", tool, "stitch", folder, "-o", os.path.join(out, "a.pt"), ":", "-np", "1", tool,
                     "stitch", folder, "-o", os.path.join(out, "b.pt")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=MPI_ENV)
    assert proc.returncode == 2, proc.stderr
    lines = tool_lines(proc.stderr)
    assert len(lines) == 1 and "rank 1 of 2: started as" in lines[0], proc.stderr
    nothing_written(out)
    # Checked before any rank runs its command: also where rank 0 alone would
    # run it (a dry run, --save-plan), and argument by argument (one path with
    # a space is not two arguments).
    plan = os.path.join(out, "p.plan")
    spaced = os.path.join(out, "a b.pt")
    for left, right in [(["--save-plan", plan], []), (["--dry-run"], []), (["-o", spaced], ["-o", spaced[:-5], "b.pt"])]:
        base = ["stitch", folder] + (["-o", os.path.join(out, "a.pt")] if "-o" not in left else [])
        command = MPI + ["-np", "1", tool] + base + left + [":", "-np", "1", tool] + base + right
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=MPI_ENV)
        assert proc.returncode == 2 and proc.stdout == "", (left, right, proc.stdout, proc.stderr)
        assert len(tool_lines(proc.stderr)) == 1 and "every rank of a job runs one command line" in proc.stderr
        nothing_written(out)


def test_a_corrupt_input_fails_the_job_naming_the_file():
    if not MPIRUN:
        return
    source = large_set()
    folder = harness.scratch("mpi-corrupt-set")
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), folder)
    # A byte in the middle of one shard's largest model storage (a flat
    # parameter, which stitch copies): its CRC-32 no longer matches, found by
    # the copy's check, not while planning.
    victim = os.path.join(folder, "checkpoint_last-model_part-1-shard2.pt")
    model = torch.load(victim)["model"]
    largest = max((t for t in model.values() if torch.is_tensor(t)), key=lambda t: t.numel())
    with zipfile.ZipFile(victim) as z:
        key = next(k for k, t in model.items() if torch.is_tensor(t) and t is largest)
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
                   if i.file_size == largest.numel() * largest.element_size() else -1)
        assert info.file_size == largest.numel() * largest.element_size(), key
    with open(victim, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_length + extra_length + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    out = harness.scratch("mpi-corrupt-out")
    _, err = mpi_run(3, ["stitch", folder, "-o", os.path.join(out, "model.pt")], expect=65)
    lines = tool_lines(err)
    assert len(lines) == 1 and " of 3: " in lines[0] and victim in lines[0] and "CRC-32" in lines[0], err
    nothing_written(out)


def test_verify_splits_its_crc_pass_between_the_ranks():
    """verify's CRC pass is cut between the ranks by bytes (each file whole); the
    counts and the problems are those of one process, said once by rank 0."""
    if not MPIRUN:
        return
    folder = large_set()
    alone, _ = harness.run(["verify", folder])
    for ranks in (2, 3):
        out, _ = mpi_run(ranks, ["verify", folder])
        assert out.split(" in ")[0] == alone.split(" in ")[0], (out, alone)  # files, records, bytes
    corrupt = harness.scratch("mpi-verify-corrupt")
    for name in os.listdir(folder):
        shutil.copy(os.path.join(folder, name), corrupt)
    victim = os.path.join(corrupt, "checkpoint_last-model_part-1-shard2.pt")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    # Files that are no checkpoint at all: one problem each, as alone (not one
    # from the rank that checked its CRCs and one from rank 0's set check).
    open(os.path.join(corrupt, "empty.pt"), "wb").close()
    with open(os.path.join(corrupt, "random.pt"), "wb") as f:
        f.write(os.urandom(5000))
    alone, _ = harness.run(["verify", corrupt], expect=1)
    out, _ = mpi_run(3, ["verify", corrupt], expect=1)
    problems = [line for line in out.splitlines() if "CRC-32" in line]
    assert len(problems) == 1 and victim in problems[0], out
    assert out.splitlines()[-1].split(" in ")[0] == alone.splitlines()[-1].split(" in ")[0], (out, alone)


def test_a_rank_killed_mid_copy_leaves_no_output_and_the_next_run_cleans_up():
    if not MPIRUN:
        return
    folder = large_set()
    out = harness.scratch("mpi-killed")
    target = os.path.join(out, "model.pt")
    env = shim_env("CKPT_SLOW_WRITES_MS", "300")
    command = MPI + ["-np", "2", "env"] + [f"{k}={v}" for k, v in env.items()] + \
        [harness.TOOL, "stitch", folder, "-o", target, "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=MPI_ENV)
    # Once a temporary file exists the copy has begun: kill a rank that is not rank 0.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(".ckpt-tmp-" in n for n in os.listdir(out)):
        time.sleep(0.05)
    time.sleep(0.5)
    ranks = subprocess.run(["pgrep", "-f", f"^{harness.TOOL} stitch {folder} -o {target}"], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(max(ranks, key=int)), signal.SIGKILL)  # the later pid: rank 1 (rank 0 starts first)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err
    assert not os.path.exists(target), os.listdir(out)
    # What the killed job left is stale: the next run removes it, says so, and writes.
    left = [n for n in os.listdir(out) if ".ckpt-tmp-" in n]
    _, err = mpi_run(2, ["stitch", folder, "-o", target])
    if left:
        assert "removed" in err or "stale" in err, err
    assert sorted(os.listdir(out)) == ["model.pt"], os.listdir(out)
    alone = harness.scratch("mpi-killed-alone")
    harness.run(["stitch", folder, "-o", os.path.join(alone, "model.pt"), "-q"])
    assert filecmp.cmp(target, os.path.join(alone, "model.pt"), shallow=False)


def test_ranks_in_other_working_directories_write_one_output():
    if not MPIRUN:
        return
    folder = large_set()
    out = harness.scratch("mpi-wdir")
    elsewhere = harness.scratch("mpi-wdir-elsewhere")
    args = ["stitch", os.path.relpath(folder, out), "-o", "model.pt", "-q"]
    command = MPI + ["-np", "1", "-wdir", out, harness.TOOL] + args + [":", "-np", "1", "-wdir", elsewhere,
                                                                          harness.TOOL] + args
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=MPI_ENV)
    assert proc.returncode == 0, proc.stderr
    alone = harness.scratch("mpi-wdir-alone")
    harness.run(["stitch", folder, "-o", os.path.join(alone, "model.pt"), "-q"])
    assert filecmp.cmp(os.path.join(out, "model.pt"), os.path.join(alone, "model.pt"), shallow=False)
    nothing_written(elsewhere)


def test_commands_without_a_plan_end_the_job_as_one_process():
    if not MPIRUN:
        return
    folder = harness.fixtures()["mp2_dp2_fp16_omega_opt"]
    out, err = mpi_run(3, ["inspect", folder])
    alone, _ = harness.run(["inspect", folder])
    assert out == alone
    _, err = mpi_run(3, ["stitch", folder, "--no-such-flag"], expect=2)
    assert len(tool_lines(err)) == 1, err
    out, _ = mpi_run(3, ["stitch", folder, "-o", "/nonexistent-dir/x.pt", "--dry-run"])
    assert out.count("output ") == harness.run(["stitch", folder, "-o", "/nonexistent-dir/x.pt", "--dry-run"])[0] \
        .count("output ")
    exists = harness.scratch("mpi-exists")
    open(os.path.join(exists, "model.pt"), "w").close()
    _, err = mpi_run(2, ["stitch", folder, "-o", os.path.join(exists, "model.pt")], expect=1)
    assert len(tool_lines(err)) == 1 and "--force" in err, err
    assert os.path.getsize(os.path.join(exists, "model.pt")) == 0
    mpi_run(2, ["verify", folder, "-q"])


if __name__ == "__main__":
    harness.main([
        test_every_output_kind_same_bytes_with_1_to_4_ranks,
        test_a_deepspeed_checkpoint_same_bytes_with_2_and_3_ranks,
        test_one_large_output_written_in_parts_is_the_same_file,
        test_a_rank_out_of_space_fails_the_job_in_one_line_and_writes_nothing,
        test_a_failed_job_leaves_no_folder_it_made,
        test_ranks_started_with_another_command_line_fail_the_job,
        test_a_corrupt_input_fails_the_job_naming_the_file,
        test_verify_splits_its_crc_pass_between_the_ranks,
        test_a_rank_killed_mid_copy_leaves_no_output_and_the_next_run_cleans_up,
        test_ranks_in_other_working_directories_write_one_output,
        test_commands_without_a_plan_end_the_job_as_one_process,
        test_every_fixture_same_bytes_with_2_and_3_ranks,
    ])
