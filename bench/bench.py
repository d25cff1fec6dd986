#!/usr/bin/python3
"""ckpt-tool's benchmark, all in one run on this machine, warm page cache:

  (a) cp of the input files (the physical limit), and cp + sync (a durable copy:
      ckpt-tool fsyncs its outputs);
  (b) ckpt-tool stitch (the default I/O mode) and stitch --buffered-io, run in
      rounds with cp + sync: each round runs each of the three once, so every
      stitch run has a cp + sync beside it, and each is reported by the median and
      the worst of its runs (5); stitch --no-crc-check, and stitch --format hf (a
      Hugging Face folder, 1 GB safetensors shards);
  (c) the Python pipeline (bench/baseline_stitch.py: torch.load every shard,
      torch.cat, torch.save), checked equal to (b) with ckpt-tool diff;
  (d) ckpt-tool reshard to another grid;
  (e) ckpt-tool diff of the stitched output against itself (equal data: memcmp), and
      against its bfloat16 copy with --atol 1e-2 --rtol 1e-2 (every element differs a
      little: the element-wise path).

And two metadata-bound cases: grids of OPT-175B's shape (hundreds of shards,
--grids), and one state dict of 200,000 two-element tensors, an MoE model's tensor
count (--tensors): stitch, inspect, manifest and inspect of that manifest, beside
torch.load + torch.save of the same file.

Steps outside the rounds run 3 times (the median is reported), once where the
first run takes over 10 s.
Wall time, throughput and peak RSS (/usr/bin/time -v) for each, the ratios
stitch/(cp + sync) (median and worst) and baseline/stitch, written as markdown
tables to bench/RESULTS.md.

usage: bench.py [--sizes 0.25,1,4,16] [--grids 8x16,8x124|none] [--tensors 200000|none]
                [--mp 2] [--dp 4] [--work DIR] [--tool PATH]
"""
import argparse
import filecmp
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 1 << 30
PYTHON = "/usr/bin/python3"  # Debian's, with torch
# A step outside the rounds whose first run takes longer runs once: its noise is a
# small part of it, and repeating the 16 GiB steps would double the benchmark's time.
ONE_RUN_OVER_SECONDS = 10


def run_timed(args, env=None):
    """Runs a command under /usr/bin/time -v; returns (seconds, peak RSS in bytes, stdout)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v"] + args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return seconds, rss_kib * 1024, proc.stdout


def sync():
    subprocess.run(["sync"], check=True)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def meminfo(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024


def total_memory():
    return meminfo("MemTotal")


def available_memory():
    return meminfo("MemAvailable")


def machine():
    cpu = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}), {total_memory() / GIB:.0f} GiB RAM, Linux {platform.release()}"


def remove(path):
    """A step's cleanup: removes its output (a file or a folder), if there."""
    def cleanup():
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return cleanup


def warm(folder):
    """Reads every input file: this VM reclaims page cache eagerly."""
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), "rb") as handle:
            while handle.read(1 << 24):
                pass


class Step:
    """One command to time: `cleanup` removes its output; `durable` adds a timed `sync` after it (cp + sync)."""

    def __init__(self, name, cmd, cleanup=None, durable=False, prepare=None):
        self.name, self.cmd, self.cleanup, self.durable, self.prepare = name, cmd, cleanup, durable, prepare
        self.runs = []  # (seconds, peak RSS in bytes)


def run_rounds(steps, repeats, inputs=None):
    """Runs `repeats` rounds of `steps`, each step once per round in order, so that
    every run has its neighbours' runs beside it in time (this VM's page cache and
    writeback are noisy, and other processes come and go). Before each run, untimed:
    the previous run's output is removed (no run pays for discarding another's
    blocks); with `inputs`, they are read and given half a second after `sync`.
    The last step's last output is kept."""
    pending = None
    for attempt in range(repeats):
        for step in steps:
            if pending:
                pending()
            if step.prepare:
                step.prepare()
            if inputs:
                warm(inputs)
            sync()
            if inputs:
                time.sleep(0.5)
            seconds, rss, _ = run_timed(step.cmd)
            if step.durable:
                sync_start = time.perf_counter()
                sync()
                seconds += time.perf_counter() - sync_start
            step.runs.append((seconds, rss))
            pending = step.cleanup


def time_step(step, repeats, inputs=None, keep=False):
    """Runs one step `repeats` times, or once when that run takes over
    ONE_RUN_OVER_SECONDS; its output is removed after, unless `keep`."""
    run_rounds([step], 1, inputs)
    if step.runs[0][0] <= ONE_RUN_OVER_SECONDS and repeats > 1:
        if step.cleanup:
            step.cleanup()
        run_rounds([step], repeats - 1, inputs)
    if step.cleanup and not keep:
        step.cleanup()
    return summary(step)


def in_folder(folder):
    """The Step arguments of a command that writes into `folder`: created before each run, removed after."""
    if folder is None:
        return {}
    return {"cleanup": remove(folder), "prepare": lambda: os.makedirs(folder, exist_ok=True)}


def summary(step):
    """The median and the worst (largest) wall time of a step's runs, and its peak RSS."""
    times = sorted(seconds for seconds, _ in step.runs)
    return {"step": step.name, "seconds": statistics.median(times), "worst": times[-1], "runs": times,
            "rss": max(rss for _, rss in step.runs)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.25,1", help="input sizes in GiB, comma-separated, or 'none' (default 0.25,1)")
    parser.add_argument("--mp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "bench"))
    parser.add_argument("--tool", default=os.path.join(ROOT, "build", "ckpt-tool"))
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of cp + sync, stitch and stitch --buffered-io; the median and the worst are "
                             "reported (default 5)")
    parser.add_argument("--other-repeats", type=int, default=3,
                        help=f"runs of cp, stitch --no-crc-check, hf, reshard and diff at each size, once when the "
                             f"first takes over {ONE_RUN_OVER_SECONDS} s; the median is reported (default 3)")
    parser.add_argument("--baseline-repeats", type=int, default=3,
                        help="runs of the (slow, noisy) Python baseline; the median is reported (default 3)")
    parser.add_argument("--grids", default="8x16,8x124",
                        help="metadata-bound grids MPxDP at OPT-175B's shape (96 layers, Adam state, tiny widths): "
                             "8x124 is OPT-175B's 992 shards; 'none' to skip (default 8x16,8x124)")
    parser.add_argument("--tensors", default="200000",
                        help="tensors in the one-file state dict of tiny tensors (MoE-sized); 'none' to skip "
                             "(default 200000)")
    parser.add_argument("--mpi", default="4",
                        help="the stitch size in GiB of the MPI rows (1, 2 and 4 ranks beside one process), or 'none'")
    parser.add_argument("--dcp", default="1",
                        help="GiB of a DCP directory (torch's writer, 2 ranks) converted to each output; 'none' to "
                             "skip (default 1)")
    parser.add_argument("--deepspeed", default="1",
                        help="GiB of fp32 weights of the DeepSpeed ZeRO-3 world-4 checkpoint (3x that on disk with "
                             "Adam's moments), or 'none' (default 1)")
    parser.add_argument("--python-load", default="1,4",
                        help="GiB of each consolidated torch file ckpt_tool.load reads beside torch.load (then the "
                             "992-shard grid), or 'none' (default 1,4; needs the Python module, build/src/python)")
    parser.add_argument("--grid-repeats", type=int, default=3,
                        help=f"runs per step of the grids and of the many-tensors file, once when the first takes "
                             f"over {ONE_RUN_OVER_SECONDS} s (default 3)")
    args = parser.parse_args()
    tool = args.tool
    sizes = [] if args.sizes == "none" else [float(s) for s in args.sizes.split(",")]
    # At most on disk at once: an input, its stitched output and that output's bfloat16 copy.
    os.makedirs(args.work, exist_ok=True)
    needed, free = 2.6 * max(sizes, default=0) * GIB, shutil.disk_usage(args.work).free
    if free < needed:
        sys.exit(f"bench: --sizes {args.sizes} needs about {needed / GIB:.0f} GiB free in {args.work}, "
                 f"{free / GIB:.0f} GiB there")
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    grid_rows = [] if args.grids == "none" else measure_grids(args, tool)
    tensor_rows = [] if args.tensors == "none" else measure_many_tensors(args, tool)
    dcp_rows = [] if args.dcp == "none" else measure_dcp(args, tool)
    mpi_rows = [] if args.mpi == "none" or not shutil.which("mpirun") else measure_mpi(args, tool)
    ds_rows = [] if args.deepspeed == "none" else measure_deepspeed(args, tool)
    load_rows = [] if args.python_load == "none" else measure_python_load(args, tool)
    rows = []
    for size in sizes:
        rows += measure_size(args, tool, size)
    write_results(rows, grid_rows, tensor_rows, dcp_rows, mpi_rows, ds_rows, load_rows, args,
                  time.perf_counter() - started, load_at_start)


def measure_size(args, tool, size):
    """cp, stitch in each I/O mode, hf, the Python baseline, reshard and diff on one synthetic checkpoint."""
    rows = []
    work = os.path.join(args.work, f"{size:g}GiB")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src = os.path.join(work, "input")
    params = size * GIB / 2  # fp16 weights, no optimizer state: the stitched output is as large as the input
    synth_s, _, _ = run_timed([tool, "synth", "-q", "--params", f"{params:.0f}", "--mp", str(args.mp), "--dp",
                               str(args.dp), "--dtype", "fp16", "-o", src])
    in_bytes = dir_bytes(src)
    print(f"== {size:g} GiB: {args.mp} x {args.dp} shards, {in_bytes / GIB:.2f} GiB written by synth in {synth_s:.1f} s",
          flush=True)

    def report(row, nbytes=in_bytes, at=None):
        row.update(size=size, gbps=nbytes / row["seconds"] / 1e9)
        rows.insert(len(rows) if at is None else at, row)
        print(f"  {row['step']:<34} median {row['seconds']:7.2f} s  worst {row['worst']:7.2f} s  "
              f"{row['gbps']:6.2f} GB/s  peak RSS {row['rss'] / (1 << 20):6.0f} MiB", flush=True)

    def measure(name, cmd, cleanup=None, repeats=args.other_repeats, nbytes=in_bytes, keep=False, **more):
        report(time_step(Step(name, cmd, cleanup, **more), repeats, src, keep), nbytes)

    # Outputs one at a time (at 16 GiB each is as large as the input), the rounds'
    # last (the default stitch) kept for the baseline and diff to compare against.
    cp_dir = os.path.join(work, "cp")
    stitched = os.path.join(work, "stitched.pt")
    measure("cp", ["cp", "-r", src, cp_dir], remove(cp_dir))
    # What checking every input byte against its record's CRC-32 costs.
    measure("ckpt-tool stitch --no-crc-check", [tool, "stitch", "-q", "--no-crc-check", src, "-o", stitched],
            remove(stitched))
    # The Hugging Face folder (safetensors under transformers' names, 1 GB shards), from the same
    # plan: the same copies, another header; proven equal to the shards by value.
    hf = os.path.join(work, "hf")
    measure("ckpt-tool stitch --format hf",
            [tool, "stitch", "-q", src, "--format", "hf", "--max-shard-size", "1GB", "-o", hf], remove(hf), keep=True)
    proof = subprocess.run([tool, "diff", hf, src, "--names", "hf-opt"], capture_output=True, text=True)
    if proof.returncode != 0:
        sys.exit(f"bench: the hf folder and its shards differ:\n{proof.stdout[-3000:]}{proof.stderr}")
    remove(hf)()
    resharded = os.path.join(work, "resharded")
    measure(f"ckpt-tool reshard {args.mp}x{args.dp}->1x{args.dp * 2}",
            [tool, "reshard", "-q", src, "--mp", "1", "--dp", str(args.dp * 2), "-o",
             os.path.join(resharded, "checkpoint_last-model_part-{m}-shard{d}.pt")], **in_folder(resharded))

    # The I/O modes, with a cp + sync beside every default stitch: the durable copy it must not be slower than.
    rounds = [Step("ckpt-tool stitch --buffered-io", [tool, "stitch", "-q", "--buffered-io", src, "-o", stitched],
                   remove(stitched)),
              Step("cp + sync", ["cp", "-r", src, cp_dir], remove(cp_dir), durable=True),
              Step("ckpt-tool stitch", [tool, "stitch", "-q", src, "-o", stitched], remove(stitched))]
    run_rounds(rounds, args.repeats, src)
    for at, step in ((1, rounds[1]), (2, rounds[2]), (3, rounds[0])):  # after cp in the table
        report(summary(step), at=at)

    baseline = os.path.join(work, "baseline.pt")
    # The baseline holds every shard and the stitched model in memory at once:
    # measured peaks are 3.3x the input (3.4 GiB for 1 GiB, 12.7 GiB for 4 GiB).
    if 3.5 * in_bytes > available_memory():
        print(f"  python baseline: skipped (needs about {3.5 * in_bytes / GIB:.0f} GiB of RAM)", flush=True)
    else:
        measure("python baseline", [PYTHON, os.path.join(HERE, "baseline_stitch.py"), src, baseline],
                remove(baseline), repeats=args.baseline_repeats, keep=True)
        diff = subprocess.run([tool, "diff", stitched, baseline], capture_output=True, text=True)
        if diff.returncode != 0:
            sys.exit(f"bench: stitch and the Python baseline differ:\n{diff.stdout[-3000:]}{diff.stderr}")
        os.remove(baseline)
    measure("ckpt-tool diff (self)", [tool, "diff", stitched, stitched], nbytes=os.path.getsize(stitched))
    as_bf16 = os.path.join(work, "stitched-bf16.pt")
    run_timed([tool, "stitch", "-q", src, "--dtype", "bf16", "-o", as_bf16])
    measure("ckpt-tool diff fp16 vs bf16 copy", [tool, "diff", stitched, as_bf16, "--atol", "1e-2", "--rtol", "1e-2"],
            nbytes=os.path.getsize(stitched))
    shutil.rmtree(work)
    return rows


def measure_grids(args, tool):
    """The metadata path at OPT-175B's real shape: hundreds of shards whose pickles,
    shard_metadata and optimizer state entries do not depend on the widths."""
    rows = []
    for shape in args.grids.split(","):
        mp, dp = (int(x) for x in shape.split("x"))
        work = os.path.join(args.work, f"grid-{shape}")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        src = os.path.join(work, "input")
        synth_s, synth_rss, _ = run_timed([tool, "synth", "-q", "-o", src, "--mp", str(mp), "--dp", str(dp), "--layers",
                                           "96", "--embed-dim", "128", "--ffn-dim", "512", "--vocab", "1024",
                                           "--optimizer-state"])
        files = len(os.listdir(src))
        print(f"== grid {shape}: {files} files, {dir_bytes(src) / (1 << 20):.0f} MiB written by synth in {synth_s:.1f} s",
              flush=True)
        manifest = os.path.join(work, "m.json.zst")
        plain = os.path.join(work, "m.json")

        def step(name, cmd, output=None, keep=False, durable=False):
            row = time_step(Step(name, cmd, durable=durable, **in_folder(output)), args.grid_repeats, keep=keep)
            row.update(grid=shape, files=files)
            rows.append(row)
            print(f"  {name:<40} {row['seconds']:8.2f} s  peak RSS {row['rss'] / (1 << 20):6.0f} MiB", flush=True)

        rows.append({"grid": shape, "files": files, "step": "synth", "seconds": synth_s, "rss": synth_rss})
        step("manifest -o m.json.zst", [tool, "manifest", src, "-o", manifest, "--force"])
        run_timed([tool, "manifest", src, "-o", plain, "--force"])
        rows[-1]["note"] = (f"{os.path.getsize(plain) / (1 << 20):.1f} MiB of JSON, "
                            f"{os.path.getsize(manifest) / (1 << 20):.2f} MiB compressed")
        step("inspect DIR", [tool, "inspect", src])
        step("inspect m.json.zst", [tool, "inspect", manifest])
        step("verify DIR", [tool, "verify", src])
        out = os.path.join(work, "out")
        # the per-file cost's reference: copying the directory, made durable
        step("cp -r DIR + sync", ["cp", "-r", src, os.path.join(out, "copy")], out, durable=True)
        step("stitch DIR", [tool, "stitch", "-q", src, "-o", os.path.join(out, "s.pt")], out)
        step("stitch m.json.zst", [tool, "stitch", "-q", manifest, "-o", os.path.join(out, "s.pt")], out)
        half = 1 << (max(1, dp // 2) - 1).bit_length()  # 124 -> 64 (the issue's 8 x 64), 16 -> 8
        step(f"reshard DIR --mp {mp} --dp {half}",
             [tool, "reshard", "-q", src, "--mp", str(mp), "--dp", str(half), "-o", os.path.join(out, "r-{m}-{d}.pt")],
             out)
        # the way back: a singleton with Adam's state, split into training shards on the template's layout
        single_dir = os.path.join(work, "single")
        single = os.path.join(single_dir, "s.pt")
        step("stitch DIR --optimizer-state", [tool, "stitch", "-q", src, "--optimizer-state", "-o", single], single_dir,
             keep=True)
        step(f"reshard s.pt --mp {mp} --dp {half} --layout-from DIR",
             [tool, "reshard", "-q", single, "--mp", str(mp), "--dp", str(half), "--layout-from", src, "-o",
              os.path.join(out, "r-{m}-{d}.pt")], out)
        shutil.rmtree(work)
    return rows


# One state dict of `count` two-element fp32 tensors named as an MoE model's experts
# (1000 experts per layer, two matrices each), written by torch.save.
MANY_TENSORS = """
import itertools, sys, torch
path, count = sys.argv[1], int(sys.argv[2])
names = (f"decoder.layers.{layer}.experts.{expert}.w{k}"
         for layer in itertools.count() for expert in range(1000) for k in (1, 2))
torch.manual_seed(0)
torch.save({"model": {name: torch.randn(2) for name in itertools.islice(names, count)}}, path)
"""

# What a user without ckpt-tool runs on such a file: load it whole, save it again.
LOAD_AND_SAVE = "import sys, torch; torch.save(torch.load(sys.argv[1]), sys.argv[2])"


def measure_many_tensors(args, tool):
    """Per-tensor costs: every command on one file of many tiny tensors (200,000 is
    an MoE model's count), beside torch.load + torch.save of the same file."""
    count = int(args.tensors)
    work = os.path.join(args.work, f"tensors-{count}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src = os.path.join(work, "state.pt")
    made_s, _, _ = run_timed([PYTHON, "-c", MANY_TENSORS, src, str(count)])
    print(f"== {count} tensors: one state dict, {os.path.getsize(src) / 1e6:.0f} MB written by torch.save in "
          f"{made_s:.1f} s", flush=True)
    manifest = os.path.join(work, "m.json.zst")
    out = os.path.join(work, "out")
    rows = []
    for name, cmd, output in (
            ("ckpt-tool stitch F -o out.pt", [tool, "stitch", "-q", src, "-o", os.path.join(out, "out.pt")], out),
            ("ckpt-tool inspect F", [tool, "inspect", src], None),
            ("ckpt-tool manifest F -o m.json.zst", [tool, "manifest", src, "-o", manifest, "--force"], None),
            ("ckpt-tool inspect m.json.zst", [tool, "inspect", manifest], None),
            ("torch.load + torch.save", [PYTHON, "-c", LOAD_AND_SAVE, src, os.path.join(out, "torch.pt")], out)):
        row = time_step(Step(name, cmd, **in_folder(output)), args.grid_repeats)
        row.update(count=count, file_bytes=os.path.getsize(src))
        rows.append(row)
        print(f"  {name:<40} median {row['seconds']:8.2f} s  worst {row['worst']:8.2f} s  "
              f"peak RSS {row['rss'] / (1 << 20):6.0f} MiB", flush=True)
    torch_row = rows[-1]
    for row in rows[:-1]:
        row["torch_ratio"] = torch_row["seconds"] / row["seconds"]
        row["torch_rss_ratio"] = torch_row["rss"] / row["rss"]
    print(f"  torch / stitch: {rows[0]['torch_ratio']:.2f}x the time, {rows[0]['torch_rss_ratio']:.2f}x the peak RSS",
          flush=True)
    shutil.rmtree(work)
    return rows


# What dcp_to_torch_save does, with torch 1.13's reader (torch 2.x's function is not in
# this torch): every tensor allocated whole, filled by load_state_dict, nested, saved.
DCP_TO_TORCH_SAVE = """
import sys
sys.path.insert(0, sys.argv[3])
import dcp_sets, torch
md = dcp_sets.read_metadata(sys.argv[1])
torch.save(dcp_sets.nested_state_dict(dcp_sets.reference_state_dict(sys.argv[1]), getattr(md, "planner_data", None)),
           sys.argv[2])
"""


def timed_steps(steps, args, inputs):
    """Each step timed (time_step, --grid-repeats runs) and printed as it ends."""
    rows = []
    for step in steps:
        row = time_step(step, args.grid_repeats, inputs=inputs)
        rows.append(row)
        print(f"  {step.name:<44} median {row['seconds']:8.2f} s  worst {row['worst']:8.2f} s  "
              f"peak RSS {row['rss'] / (1 << 20):6.0f} MiB", flush=True)
    return rows


def between_copy_and_python(steps, args, inputs):
    """Times `steps` (a copy first, Python's way last, ckpt-tool's between); each
    ckpt-tool row gets its time over the copy's and Python's time and peak RSS over its own."""
    rows = timed_steps(steps, args, inputs)
    cp_row, torch_row = rows[0], rows[-1]
    for row in rows[1:-1]:
        row["cp_ratio"] = row["seconds"] / cp_row["seconds"]
        row["torch_ratio"] = torch_row["seconds"] / row["seconds"]
        row["torch_rss_ratio"] = torch_row["rss"] / row["rss"]
    return rows


def measure_dcp(args, tool):
    """A DCP directory written by torch's own writer (two ranks, Shard(0)) to each output,
    beside cp -r + sync of the directory and torch's reader + torch.save."""
    size = float(args.dcp)
    work = os.path.join(args.work, f"dcp-{size:g}")
    shutil.rmtree(work, ignore_errors=True)
    src = os.path.join(work, "set")
    made_s, _, _ = run_timed([PYTHON, os.path.join(HERE, "dcp_set.py"), src, str(size), "2"])
    nbytes = dir_bytes(src)
    print(f"== DCP {size:g} GiB: {nbytes / GIB:.2f} GiB in {len(os.listdir(src))} files, written by torch's DCP "
          f"writer in {made_s:.1f} s", flush=True)
    out = os.path.join(work, "out")
    e2e = os.path.join(ROOT, "tests", "e2e")
    steps = [Step("cp -r + sync", ["cp", "-r", src, os.path.join(out, "copy")], durable=True, **in_folder(out)),
             Step("ckpt-tool stitch DCP -o out.pt", [tool, "stitch", "-q", src, "-o", os.path.join(out, "o.pt")],
                  **in_folder(out)),
             Step("ckpt-tool stitch DCP -o out.safetensors",
                  [tool, "stitch", "-q", src, "-o", os.path.join(out, "o.safetensors")], **in_folder(out)),
             Step("ckpt-tool stitch DCP --format dcp",
                  [tool, "stitch", "-q", src, "--format", "dcp", "-o", os.path.join(out, "dcp")], **in_folder(out)),
             Step("torch's DCP reader + torch.save", [PYTHON, "-c", DCP_TO_TORCH_SAVE, src, os.path.join(out, "t.pt"),
                                                      e2e], **in_folder(out))]
    rows = between_copy_and_python(steps, args, src)
    for row in rows:
        row.update(bytes=nbytes)
    shutil.rmtree(work)
    return rows


ZERO_TO_FP32 = """
import sys
sys.path.insert(0, sys.argv[3])
import deepspeed_sets, torch
torch.save(deepspeed_sets.reference_zero_to_fp32(sys.argv[1]), sys.argv[2])
"""


def bytes_read_from_disk(cmd, folder):
    """Bytes the command read from the disk, its input's pages evicted first
    (posix_fadvise DONTNEED after sync): block input operations of the child
    (getrusage ru_inblock, 512-byte units), page faults of mapped files included."""
    sync()
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    subprocess.run(cmd, check=True, capture_output=True)
    return (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before) * 512


def measure_deepspeed(args, tool):
    """A DeepSpeed ZeRO-3 checkpoint over 4 ranks (fp32 weights plus Adam's two moments)
    stitched to one torch file, beside a durable cp of the weights' bytes (the stitched
    file copied) and zero_to_fp32's way (torch.load every optimizer file, cat, torch.save)."""
    size = float(args.deepspeed)
    work = os.path.join(args.work, f"deepspeed-{size:g}")
    shutil.rmtree(work, ignore_errors=True)
    root = os.path.join(work, "save")
    made_s, _, _ = run_timed([PYTHON, os.path.join(HERE, "deepspeed_set.py"), root, str(size), "4"])
    folder = os.path.join(root, "global_step1200")
    nbytes = dir_bytes(folder)
    out = os.path.join(work, "out")
    os.makedirs(out)
    stitched = os.path.join(work, "weights.pt")
    stitch_cmd = [tool, "stitch", "-q", root, "-o", stitched]
    read_bytes = bytes_read_from_disk(stitch_cmd, folder)
    weights = os.path.getsize(stitched)
    print(f"== DeepSpeed ZeRO-3, 4 ranks: {nbytes / GIB:.2f} GiB in {len(os.listdir(folder))} files (weights "
          f"{weights / GIB:.2f} GiB), written in {made_s:.1f} s; stitch read {read_bytes / GIB:.2f} GiB from disk "
          f"({read_bytes / nbytes:.2f} of the folder)", flush=True)
    e2e = os.path.join(ROOT, "tests", "e2e")
    steps = [Step("cp weights.pt + sync", ["cp", stitched, os.path.join(out, "copy.pt")], durable=True,
                  **in_folder(out)),
             Step("ckpt-tool stitch ZeRO-3 -o out.pt", [tool, "stitch", "-q", root, "-o", os.path.join(out, "o.pt")],
                  **in_folder(out)),
             Step("ckpt-tool stitch ZeRO-3 -o out.safetensors",
                  [tool, "stitch", "-q", root, "-o", os.path.join(out, "o.safetensors")], **in_folder(out)),
             Step("zero_to_fp32 (torch.load, cat, torch.save)",
                  [PYTHON, "-c", ZERO_TO_FP32, folder, os.path.join(out, "z.pt"), e2e], **in_folder(out))]
    rows = between_copy_and_python(steps, args, folder)
    rows[1]["read"] = f"{read_bytes / GIB:.2f} GiB of {nbytes / GIB:.2f} GiB ({read_bytes / nbytes:.2f})"
    rows[0]["bytes"] = weights
    shutil.rmtree(work)
    return rows


# Each reads a torch file's state dict and then every byte of it (the largest byte of
# each tensor), so that a mapping's pages are read as torch.load reads them.
LOAD_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
how, path = sys.argv[3], sys.argv[1]
if how == "torch":
    sd = torch.load(path)["model"]
else:
    import ckpt_tool
    sd = ckpt_tool.load(path, check_crc=how == "ckpt")
if len(sys.argv) > 4:
    top = max(int(t.reshape(-1).view(torch.uint8).max()) for t in sd.values() if t.numel())
"""


def measure_python_load(args, tool):
    """ckpt_tool.load of a consolidated torch file of each size beside torch.load of it
    (torch 1.13 has no mmap=True), each alone and then reading every byte of the state
    dict; then the 992-shard grid: ckpt_tool.load of the shards beside stitch to a
    file followed by torch.load of it."""
    python_path = os.path.join(ROOT, "build", "src", "python")
    if not os.path.isdir(os.path.join(python_path, "ckpt_tool")):
        print("== Python load: no module in build/src/python (configure with -Dpython=enabled): skipped")
        return []
    rows = []
    for size in [float(text) for text in args.python_load.split(",")]:
        work = os.path.join(args.work, f"load-{size:g}")
        shutil.rmtree(work, ignore_errors=True)
        shards = os.path.join(work, "shards")
        params = int(size * GIB / 2)  # fp16
        run_timed([tool, "synth", "-o", shards, "--params", str(params), "--mp", "1", "--dp", "2", "-q"])
        path = os.path.join(work, "consolidated.pt")
        run_timed([tool, "stitch", "-q", shards, "-o", path])
        shutil.rmtree(shards)
        nbytes = os.path.getsize(path)
        print(f"== Python load: one consolidated torch file of {nbytes / GIB:.2f} GiB", flush=True)
        steps = [Step(f"{nbytes / GIB:.1f} GiB: {name}", [PYTHON, "-c", LOAD_SCRIPT, path, python_path, how] + extra)
                 for name, how, extra in (("ckpt_tool.load", "ckpt", []),
                                          ("ckpt_tool.load(check_crc=False)", "ckpt-nocrc", []),
                                          ("torch.load", "torch", []),
                                          ("ckpt_tool.load + read every byte", "ckpt", ["all"]),
                                          ("torch.load + read every byte", "torch", ["all"]))]
        timed = timed_steps(steps, args, work)
        for mine, theirs in ((timed[0], timed[2]), (timed[1], timed[2]), (timed[3], timed[4])):
            mine["torch_ratio"] = theirs["seconds"] / mine["seconds"]
            mine["torch_rss_ratio"] = theirs["rss"] / mine["rss"]
        rows += timed
        shutil.rmtree(work)
    # The 992-shard grid (8 x 124, OPT-175B's): load it where it lies, or stitch it
    # first; as the other rows make it (small weights, Adam state), then with 16x
    # the weights and no optimizer state.
    for embed, extra in ((128, ["--optimizer-state"]), (512, [])):
        work = os.path.join(args.work, "load-grid")
        shutil.rmtree(work, ignore_errors=True)
        grid = os.path.join(work, "grid")
        run_timed([tool, "synth", "-q", "-o", grid, "--mp", "8", "--dp", "124", "--layers", "96", "--embed-dim",
                   str(embed), "--ffn-dim", str(4 * embed), "--vocab", "1024"] + extra)
        out = os.path.join(work, "stitched.pt")
        run_timed([tool, "stitch", "-q", grid, "-o", out])
        label = f"992 shards, {dir_bytes(grid) / GIB:.2f} GiB ({os.path.getsize(out) / GIB:.2f} GiB of weights)"
        os.remove(out)
        print(f"== Python load: {label}", flush=True)
        steps = [Step(f"{label}: ckpt_tool.load", [PYTHON, "-c", LOAD_SCRIPT, grid, python_path, "ckpt"]),
                 Step(f"{label}: stitch, then torch.load",
                      ["sh", "-c", '"$1" stitch -q "$2" -o "$3" && "$4" -c "$5" "$3" "$6" torch',
                       "sh", tool, grid, out, PYTHON, LOAD_SCRIPT, python_path],
                      cleanup=lambda: os.path.exists(out) and os.remove(out))]
        timed = timed_steps(steps, args, grid)
        timed[0]["torch_ratio"] = timed[1]["seconds"] / timed[0]["seconds"]
        timed[0]["torch_rss_ratio"] = timed[1]["rss"] / timed[0]["rss"]
        rows += timed
        shutil.rmtree(work)
    return rows


MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
RANK_LINE = re.compile(r"stats: rank (\d+) of \d+: ([\d.]+ \w+) written \((\d+) whole file\(s\), (\d+) part\(s\) "
                       r"of shared files\) in ([\d.]+) s, peak RSS ([\d.]+ \w+)")


def measure_mpi(args, tool):
    """One job over 1, 2 and 4 ranks (mpirun) beside one process, in the same run: the
    992-shard grid resharded to 8 x 64 (many outputs, each rank its own) and a stitch
    of one large output (written in parts by every rank). The ranks share this
    machine's 2 cores and one disk: what a rank writes and holds is the figure that
    carries to a cluster, not the wall time."""
    rows = []
    work = os.path.join(args.work, "mpi")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    grid = os.path.join(work, "grid")
    run_timed([tool, "synth", "-q", "-o", grid, "--mp", "8", "--dp", "124", "--layers", "96", "--embed-dim", "128",
               "--ffn-dim", "512", "--vocab", "1024", "--optimizer-state"])
    size = float(args.mpi)
    big = os.path.join(work, "big")
    # 2 x 4 shards of 8 layers, fp16, no optimizer state: the stitched output is as large as the input.
    embed = int(round((size * GIB / (8 * 12 * 2)) ** 0.5 / 64)) * 64
    run_timed([tool, "synth", "-q", "-o", big, "--mp", "2", "--dp", "4", "--layers", "8", "--embed-dim", str(embed),
               "--ffn-dim", str(4 * embed), "--vocab", "8192"])
    big_bytes = dir_bytes(big)
    print(f"== MPI: the 992-shard grid and a {big_bytes / GIB:.2f} GiB set", flush=True)
    out = os.path.join(work, "out")
    jobs = [("reshard 992 shards -> 8 x 64", grid,
             ["reshard", grid, "--mp", "8", "--dp", "64", "-o", os.path.join(out, "r-{m}-{d}.pt")]),
            (f"stitch {big_bytes / GIB:.1f} GiB -> 1 file", big, ["stitch", big, "-o", os.path.join(out, "s.pt")])]
    for name, src, job in jobs:
        cp = time_step(Step("cp -r + sync", ["cp", "-r", src, os.path.join(out, "copy")], durable=True,
                            **in_folder(out)), 1, inputs=src)
        rows.append(dict(cp, job=name, ranks="cp -r + sync", per_rank=""))
        reference = os.path.join(work, "one-process")
        for ranks in [None, 1, 2, 4]:
            cmd = ([tool] if ranks is None else MPIRUN + ["-np", str(ranks), tool]) + job + ["-q", "--stats"]
            os.makedirs(out, exist_ok=True)
            warm(src)
            sync()
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            per_rank = "; ".join(f"rank {m[0]}: {m[1]} ({m[2]} files, {m[3]} parts), peak RSS {m[5]}"
                                 for m in RANK_LINE.findall(proc.stderr))
            label = "one process" if ranks is None else f"mpirun -np {ranks}"
            # The same bytes as one process, every output file (cmp).
            if ranks is None:
                os.rename(out, reference)
                same = "reference"
            else:
                names = sorted(os.listdir(out))
                same = "yes" if names == sorted(os.listdir(reference)) and all(
                    filecmp.cmp(os.path.join(out, n), os.path.join(reference, n), shallow=False) for n in names) \
                    else "NO"
                shutil.rmtree(out)
            rows.append({"job": name, "ranks": label, "seconds": seconds, "cp_ratio": seconds / cp["seconds"],
                         "per_rank": per_rank, "same": same})
            print(f"  {name:<32} {label:<14} {seconds:7.2f} s  ({seconds / cp['seconds']:.2f} x cp)  "
                  f"same bytes: {same}  {per_rank}", flush=True)
        shutil.rmtree(reference)
    shutil.rmtree(work)
    return rows


# A hand-written section of RESULTS.md that a new run keeps: figures measured once
# while designing, quoted where code comments used to carry them.
MEASURED_WHILE_DESIGNING = "## Measured while designing"


def kept_section(path, heading):
    """The text of `path` from the line `heading` on, with a blank line before it; "" if none."""
    try:
        text = open(path).read()
    except FileNotFoundError:
        return ""
    at = text.find("\n" + heading + "\n")
    return "\n" + text[at + 1:] if at >= 0 else ""


def timed_row(r, ratios, extra=()):
    """A table line of a timed step: step, median, worst, runs, peak RSS, then its
    `ratios` (blank where the row has none: the copy and Python's rows) and `extra` cells."""
    cells = [r["step"], f"{r['seconds']:.2f}", f"{r['worst']:.2f}", str(len(r["runs"])), f"{r['rss'] / (1 << 20):.0f}"]
    cells += [f"{r[name]:.2f}" if name in r else "" for name in ratios] + list(extra)
    return "| " + " | ".join(cells) + " |"


def write_results(rows, grid_rows, tensor_rows, dcp_rows, mpi_rows, ds_rows, load_rows, args, total_seconds,
                  load_at_start):
    by = {(r["size"], r["step"]): r for r in rows}
    sizes = sorted({r["size"] for r in rows})
    lines = ["# ckpt-tool benchmark", "",
             f"Machine: {machine()}. Written by `bench/bench.py --sizes {args.sizes} --grids {args.grids} "
             f"--tensors {args.tensors}` on {time.strftime('%Y-%m-%d')} in {total_seconds / 60:.1f} min (`make bench` "
             f"passes its BENCH_SIZES, 0.25,1,4,16 by default); load average {load_at_start:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end (other processes share the 2 cores: compare within one run). One "
             "run of the benchmark, warm page cache, `sync` before each step, the previous output removed before each "
             "(untimed)."]
    if rows:
        lines += ["",
                  f"cp + sync, stitch and stitch --buffered-io ran in {args.repeats} rounds, each round running each "
                  "once, so that every stitch run has a cp + sync beside it; each reports the median and the worst of "
                  f"its {args.repeats} runs (the other steps: {args.other_repeats} runs, one where the first took over "
                  f"{ONE_RUN_OVER_SECONDS} s; the Python baseline likewise, {args.baseline_repeats} runs, skipped where "
                  "it would not fit in memory). "
                  "ckpt-tool fsyncs its outputs "
                  "(default: direct I/O where the file system allows it), so its durable peer is cp + sync. Input: a "
                  f"synthetic {args.mp} x {args.dp} metaseq checkpoint (`ckpt-tool synth`, fp16, no optimizer state), "
                  "so the stitched output is as large as the input. Throughput is input bytes per second at the median "
                  "(diff: the left side's bytes).", "",
                  "| input | step | median s | worst s | runs s | GB/s | peak RSS MiB |",
                  "|---|---|---:|---:|---|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['size']:g} GiB | {r['step']} | {r['seconds']:.2f} | {r['worst']:.2f} | "
                         f"{' '.join(f'{t:.2f}' for t in r['runs'])} | {r['gbps']:.2f} | {r['rss'] / (1 << 20):.0f} |")
        lines += ["", "| input | stitch / (cp + sync), median | worst / worst | stitch / cp | buffered / default stitch | "
                  "CRC check / none | reshard / (cp + sync) | baseline / stitch | diff by value / diff equal | "
                  "hf / stitch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for size in sizes:
            stitch, cp_sync = by[(size, "ckpt-tool stitch")], by[(size, "cp + sync")]
            median = lambda step: by[(size, step)]["seconds"]  # noqa: E731
            base = by.get((size, "python baseline"))
            speedup = f"{base['seconds'] / stitch['seconds']:.1f}" if base else "skipped"
            reshard = [r for r in rows if r["size"] == size and r["step"].startswith("ckpt-tool reshard")][0]["seconds"]
            lines.append(
                f"| {size:g} GiB | {stitch['seconds'] / cp_sync['seconds']:.2f} | {stitch['worst'] / cp_sync['worst']:.2f} | "
                f"{stitch['seconds'] / median('cp'):.2f} | "
                f"{median('ckpt-tool stitch --buffered-io') / stitch['seconds']:.2f} | "
                f"{stitch['seconds'] / median('ckpt-tool stitch --no-crc-check'):.2f} | "
                f"{reshard / cp_sync['seconds']:.2f} | {speedup} | "
                f"{median('ckpt-tool diff fp16 vs bf16 copy') / median('ckpt-tool diff (self)'):.2f} | "
                f"{median('ckpt-tool stitch --format hf') / stitch['seconds']:.2f} |")
        slower = [f"{size:g} GiB" for size in sizes
                  if by[(size, "ckpt-tool stitch")]["worst"] > by[(size, "cp + sync")]["worst"]
                  or by[(size, "ckpt-tool stitch")]["seconds"] > by[(size, "cp + sync")]["seconds"]]
        lines += ["", "Default stitch at most cp + sync (median and worst) at every size: " +
                  ("yes." if not slower else f"no, slower at {', '.join(slower)}.")]
    if grid_rows:
        lines += ["", "Grids at OPT-175B's shape (`ckpt-tool synth --layers 96 --embed-dim 128 --ffn-dim 512 --vocab "
                  "1024 --optimizer-state`): 96 layers with Adam state, so each shard's pickle, shard_metadata and "
                  "optimizer entries are those of the real checkpoint, at tiny widths. 8 x 124 is OPT-175B's 992 "
                  f"shards. Median of {args.grid_repeats} runs (one where the first took over {ONE_RUN_OVER_SECONDS} s), "
                  "`sync` before each.", "",
                  "| grid | files | step | wall s | runs | peak RSS MiB | note |", "|---|---:|---|---:|---:|---:|---|"]
        for r in grid_rows:
            lines.append(f"| {r['grid']} | {r['files']} | {r['step']} | {r['seconds']:.2f} | {len(r.get('runs', [0]))} | "
                         f"{r['rss'] / (1 << 20):.0f} | {r.get('note', '')} |")
    if tensor_rows:
        count, nbytes = tensor_rows[0]["count"], tensor_rows[0]["file_bytes"]
        lines += ["", f"{count // 1000}k tensors: one file, `torch.save({{\"model\": {{name: torch.randn(2)}}}})` of "
                  f"{count} names `decoder.layers.L.experts.E.wK` (1000 experts per layer, w1 and w2), "
                  f"{nbytes / 1e6:.0f} MB: the per-tensor cost of each command (an MoE model reaches this count), "
                  "beside what the same job costs in Python (`torch.load` then `torch.save` of the file, in one "
                  f"process; not fsynced, where stitch fsyncs its output). Median and worst of {args.grid_repeats} runs "
                  f"(one where the first took over {ONE_RUN_OVER_SECONDS} s), `sync` before each.", "",
                  "| tensors | step | median s | worst s | runs | peak RSS MiB | torch / this, time | torch / this, RSS |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in tensor_rows:
            ratios = (f"{r['torch_ratio']:.2f} | {r['torch_rss_ratio']:.2f}" if "torch_ratio" in r else " | ")
            lines.append(f"| {count // 1000}k | {r['step']} | {r['seconds']:.2f} | {r['worst']:.2f} | {len(r['runs'])} | "
                         f"{r['rss'] / (1 << 20):.0f} | {ratios} |")
    if dcp_rows:
        lines += ["", f"DCP: a {args.dcp} GiB PyTorch Distributed Checkpoint directory written by torch 1.13's own DCP "
                  "writer (2 ranks, fp32 4096 x 4096 matrices cut Shard(0), two object items, one data file per "
                  "rank), converted to each output, beside `cp -r` + `sync` of the directory and what "
                  "`dcp_to_torch_save` does (torch 1.13's DCP reader into whole tensors, then `torch.save`; not "
                  f"fsynced, where ckpt-tool fsyncs). Median and worst of {args.grid_repeats} runs (one where the "
                  f"first took over {ONE_RUN_OVER_SECONDS} s), inputs read and `sync` before each.", "",
                  "| step | median s | worst s | runs | peak RSS MiB | this / (cp -r + sync) | torch / this, time | "
                  "torch / this, RSS |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [timed_row(r, ["cp_ratio", "torch_ratio", "torch_rss_ratio"]) for r in dcp_rows]
    if mpi_rows:
        lines += ["", "MPI: one job over 1, 2 and 4 ranks (`mpirun --oversubscribe -np N`, every rank on this "
                  "machine's 2 cores and one disk) beside one process and `cp -r` + `sync` of the input, one run "
                  "each, `sync` before each: the bytes each rank wrote and its peak RSS are what carries to a "
                  "cluster (README, \"Many processes and nodes\"); the wall time here is one machine's.", "",
                  "| job | run | wall s | this / (cp -r + sync) | bytes = one process's (cmp) | per rank |",
                  "|---|---|---:|---:|---|---|"]
        for r in mpi_rows:
            ratio = f"{r['cp_ratio']:.2f}" if "cp_ratio" in r else ""
            lines.append(f"| {r['job']} | {r['ranks']} | {r['seconds']:.2f} | {ratio} | {r.get('same', '')} | "
                         f"{r['per_rank']} |")
    if ds_rows:
        lines += ["", f"DeepSpeed: a ZeRO-3 checkpoint of {args.deepspeed} GiB of fp32 weights over 4 ranks "
                  "(`bench/deepspeed_set.py`: 4096 x 4096 matrices and odd biases in two param groups, Adam's two "
                  "moments beside them, so the folder is 3x the weights) stitched to one file, beside a durable cp of "
                  "the weights' bytes (the stitched file copied, then `sync`) and zero_to_fp32's way (`torch.load` of "
                  "every optimizer file, cat, `torch.save`; not fsynced). Bytes read from disk: one more stitch with "
                  "the folder's pages evicted (posix_fadvise), its block reads (getrusage). Median and worst of "
                  f"{args.grid_repeats} runs (one where the first took over {ONE_RUN_OVER_SECONDS} s), inputs read and "
                  "`sync` before each.", "",
                  "| step | median s | worst s | runs | peak RSS MiB | this / (cp + sync) | zero_to_fp32 / this, time | "
                  "zero_to_fp32 / this, RSS | read from disk |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += [timed_row(r, ["cp_ratio", "torch_ratio", "torch_rss_ratio"], [r.get("read", "")])
                  for r in ds_rows]
    if load_rows:
        lines += ["", f"Python: `ckpt_tool.load` of one consolidated torch file of each size ({args.python_load} "
                  "GiB; fp16, `ckpt-tool synth` then `stitch`) beside `torch.load` of it, each in a fresh "
                  "`/usr/bin/python3` (the interpreter and torch's import included), alone and then reading every "
                  "byte of the state dict; `ckpt_tool.load` checks every record's CRC-32 by default. Then the "
                  "992-shard grid (8 x 124, 96 layers; embed-dim 128 with Adam state, then 512 without): "
                  "`ckpt_tool.load` of the shards beside `stitch` to a file followed by `torch.load` of it (one "
                  "shell, its time and the largest RSS of its two processes). Median and worst of "
                  f"{args.grid_repeats} runs, the input read and `sync` before each.",
                  "", "| step | median s | worst s | runs | peak RSS MiB | torch / this, time | torch / this, RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [timed_row(r, ["torch_ratio", "torch_rss_ratio"]) for r in load_rows]
    text = "\n".join(lines) + "\n" + kept_section(args.results, MEASURED_WHILE_DESIGNING)
    open(args.results, "w").write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
