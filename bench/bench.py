#!/usr/bin/python3
"""ckpt-tool's benchmark, all in one run on this machine, warm page cache:

  (a) cp of the input files (the physical limit), and cp + sync (a durable copy:
      ckpt-tool fsyncs its outputs);
  (b) ckpt-tool stitch (direct I/O, the default) and stitch --buffered-io, and
      stitch --format hf (a Hugging Face folder, 1 GB safetensors shards);
  (c) the Python pipeline (bench/baseline_stitch.py: torch.load every shard,
      torch.cat, torch.save), checked equal to (b) with ckpt-tool diff;
  (d) ckpt-tool reshard to another grid;
  (e) ckpt-tool diff of the stitched output against itself (equal data: memcmp), and
      against its bfloat16 copy with --atol 1e-2 --rtol 1e-2 (every element differs a
      little: the element-wise path).

Wall time, throughput and peak RSS (/usr/bin/time -v) for each, the ratios
stitch/cp and baseline/stitch, written as a markdown table to bench/RESULTS.md.

usage: bench.py [--sizes 1,4] [--mp 2] [--dp 4] [--work DIR] [--tool PATH]
"""
import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 1 << 30


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4", help="input sizes in GiB, comma-separated (default 1,4)")
    parser.add_argument("--mp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "bench"))
    parser.add_argument("--tool", default=os.path.join(ROOT, "build", "ckpt-tool"))
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--repeats", type=int, default=5, help="runs per step; the median is reported (default 5)")
    parser.add_argument("--baseline-repeats", type=int, default=3,
                        help="runs of the (slow, noisy) Python baseline; the median is reported (default 3)")
    parser.add_argument("--grids", default="8x16,8x124",
                        help="metadata-bound grids MPxDP at OPT-175B's shape (96 layers, Adam state, tiny widths): "
                             "8x124 is OPT-175B's 992 shards; 'none' to skip (default 8x16,8x124)")
    parser.add_argument("--grid-repeats", type=int, default=3, help="runs per grid step (default 3)")
    args = parser.parse_args()
    tool = args.tool
    grid_rows = [] if args.grids == "none" else measure_grids(args, tool)
    rows = []
    for size in [] if args.sizes == "none" else [float(s) for s in args.sizes.split(",")]:
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
        def warm():
            for f in sorted(os.listdir(src)):
                with open(os.path.join(src, f), "rb") as handle:
                    while handle.read(1 << 24):
                        pass

        def measure(name, cmd, nbytes, prepare=None, repeats=args.repeats):
            # The median of `repeats` runs: this VM's page cache and writeback are noisy.
            # `prepare` removes the previous run's output, untimed, so no run pays for
            # deleting (and discarding) another's blocks.
            runs = []
            for attempt in range(repeats):
                if prepare:
                    prepare()
                warm()  # this VM reclaims page cache eagerly: re-read the inputs before each run
                sync()
                time.sleep(0.5)
                seconds, rss, out = run_timed(cmd)
                if name == "cp + sync":
                    sync_start = time.perf_counter()
                    sync()
                    seconds += time.perf_counter() - sync_start
                runs.append((seconds, rss, out))
            runs.sort(key=lambda run: run[0])
            seconds, rss, out = runs[len(runs) // 2]
            rss = max(run[1] for run in runs)
            row = {"size": size, "step": name, "seconds": seconds, "rss": rss, "gbps": nbytes / seconds / 1e9}
            rows.append(row)
            print(f"  {name:<30} {seconds:8.2f} s  {row['gbps']:6.2f} GB/s  peak RSS {rss / (1 << 20):8.0f} MiB",
                  flush=True)
            return row, out

        def remove(path):
            def prepare():
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
            return prepare

        cp_dir = os.path.join(work, "cp")
        measure("cp", ["cp", "-r", src, cp_dir], in_bytes, remove(cp_dir))
        measure("cp + sync", ["cp", "-r", src, cp_dir], in_bytes, remove(cp_dir))
        remove(cp_dir)()
        stitched = os.path.join(work, "stitched.pt")
        measure("ckpt-tool stitch --buffered-io", [tool, "stitch", "-q", "--buffered-io", src, "-o", stitched], in_bytes,
                remove(stitched))
        measure("ckpt-tool stitch", [tool, "stitch", "-q", src, "-o", stitched], in_bytes, remove(stitched))
        # What checking every input byte against its record's CRC-32 costs.
        measure("ckpt-tool stitch --no-crc-check", [tool, "stitch", "-q", "--no-crc-check", src, "-o", stitched],
                in_bytes, remove(stitched))
        # The Hugging Face folder (safetensors under transformers' names, 1 GB shards), from the same
        # plan: the same copies, another header; proven equal to the shards by value.
        hf = os.path.join(work, "hf")
        measure("ckpt-tool stitch --format hf", [tool, "stitch", "-q", src, "--format", "hf", "--max-shard-size", "1GB",
                                                 "-o", hf], in_bytes, remove(hf))
        proof = subprocess.run([tool, "diff", hf, src, "--names", "hf-opt"], capture_output=True, text=True)
        if proof.returncode != 0:
            sys.exit(f"bench: the hf folder and its shards differ:\n{proof.stdout[-3000:]}{proof.stderr}")
        remove(hf)()
        baseline = os.path.join(work, "baseline.pt")
        # The baseline holds every shard and the stitched model in memory at once:
        # measured peaks are 3.3x the input (3.4 GiB for 1 GiB, 12.7 GiB for 4 GiB).
        if 3.5 * in_bytes > available_memory():
            print(f"  python baseline: skipped (needs about {3.5 * in_bytes / GIB:.0f} GiB of RAM)", flush=True)
        else:
            measure("python baseline", ["/usr/bin/python3", os.path.join(HERE, "baseline_stitch.py"), src, baseline],
                    in_bytes, remove(baseline), repeats=args.baseline_repeats)
            diff = subprocess.run([tool, "diff", stitched, baseline], capture_output=True, text=True)
            if diff.returncode != 0:
                sys.exit(f"bench: stitch and the Python baseline differ:\n{diff.stdout[-3000:]}{diff.stderr}")
            os.remove(baseline)
        resharded = os.path.join(work, "resharded")
        measure(f"ckpt-tool reshard {args.mp}x{args.dp}->1x{args.dp * 2}",
                [tool, "reshard", "-q", src, "--mp", "1", "--dp", str(args.dp * 2), "-o",
                 os.path.join(resharded, "checkpoint_last-model_part-{m}-shard{d}.pt")], in_bytes,
                lambda: remove(resharded)() or os.makedirs(resharded))
        measure("ckpt-tool diff (self)", [tool, "diff", stitched, stitched], os.path.getsize(stitched))
        as_bf16 = os.path.join(work, "stitched-bf16.pt")
        run_timed([tool, "stitch", "-q", src, "--dtype", "bf16", "-o", as_bf16])
        measure("ckpt-tool diff fp16 vs bf16 copy", [tool, "diff", stitched, as_bf16, "--atol", "1e-2", "--rtol", "1e-2"],
                os.path.getsize(stitched))
        os.remove(as_bf16)
        shutil.rmtree(work)

    write_results(rows, grid_rows, args)


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

        def step(name, cmd, prepare=None):
            runs = []
            for attempt in range(args.grid_repeats):
                if prepare:
                    prepare()
                sync()
                runs.append(run_timed(cmd)[:2])
            runs.sort()
            seconds = runs[len(runs) // 2][0]
            rss = max(run[1] for run in runs)
            rows.append({"grid": shape, "files": files, "step": name, "seconds": seconds, "rss": rss})
            print(f"  {name:<40} {seconds:8.2f} s  peak RSS {rss / (1 << 20):6.0f} MiB", flush=True)

        def clean(path):
            return lambda: shutil.rmtree(path, ignore_errors=True) or os.makedirs(path)

        rows.append({"grid": shape, "files": files, "step": "synth", "seconds": synth_s, "rss": synth_rss})
        step("manifest -o m.json.zst", [tool, "manifest", src, "-o", manifest, "--force"])
        run_timed([tool, "manifest", src, "-o", plain, "--force"])
        rows[-1]["note"] = (f"{os.path.getsize(plain) / (1 << 20):.1f} MiB of JSON, "
                            f"{os.path.getsize(manifest) / (1 << 20):.2f} MiB compressed")
        step("inspect DIR", [tool, "inspect", src])
        step("inspect m.json.zst", [tool, "inspect", manifest])
        step("verify DIR", [tool, "verify", src])
        out = os.path.join(work, "out")
        step("stitch DIR", [tool, "stitch", "-q", src, "-o", os.path.join(out, "s.pt")], clean(out))
        step("stitch m.json.zst", [tool, "stitch", "-q", manifest, "-o", os.path.join(out, "s.pt")], clean(out))
        half = 1 << (max(1, dp // 2) - 1).bit_length()  # 124 -> 64 (the 8 x 64), 16 -> 8
        step(f"reshard DIR --mp {mp} --dp {half}",
             [tool, "reshard", "-q", src, "--mp", str(mp), "--dp", str(half), "-o", os.path.join(out, "r-{m}-{d}.pt")],
             clean(out))
        # the way back: a singleton with Adam's state, split into training shards on the template's layout
        single_dir = os.path.join(work, "single")
        single = os.path.join(single_dir, "s.pt")
        step("stitch DIR --optimizer-state", [tool, "stitch", "-q", src, "--optimizer-state", "-o", single],
             clean(single_dir))
        step(f"reshard s.pt --mp {mp} --dp {half} --layout-from DIR",
             [tool, "reshard", "-q", single, "--mp", str(mp), "--dp", str(half), "--layout-from", src, "-o",
              os.path.join(out, "r-{m}-{d}.pt")], clean(out))
        shutil.rmtree(work)
    return rows


def write_results(rows, grid_rows, args):
    by = {(r["size"], r["step"]): r for r in rows}
    lines = ["# ckpt-tool benchmark", "",
             f"Machine: {machine()}. Written by `make bench` (bench/bench.py) on "
             f"{time.strftime('%Y-%m-%d')}; one run of the benchmark, each step the median of {args.repeats} (the Python "
             f"baseline: {args.baseline_repeats}, skipped where it would not fit in memory), warm page cache, `sync` before each, the previous output removed "
             "before each (untimed). "
             "ckpt-tool fsyncs its outputs (direct I/O above the kernel's background writeback threshold, buffered below), so its durable peer is cp + sync. Input: a synthetic "
             f"{args.mp} x {args.dp} metaseq checkpoint (`ckpt-tool synth`, fp16, no optimizer state), so the "
             "stitched output is as large as the input. Throughput is input bytes per second (diff: the left side's bytes).", "",
             "| input | step | wall s | GB/s | peak RSS MiB |", "|---|---|---:|---:|---:|"] if rows else [
                 "# ckpt-tool benchmark", "", f"Machine: {machine()}. Written by `make bench` (bench/bench.py) on "
                 f"{time.strftime('%Y-%m-%d')}."]
    for r in rows:
        lines.append(f"| {r['size']:g} GiB | {r['step']} | {r['seconds']:.2f} | {r['gbps']:.2f} | {r['rss'] / (1 << 20):.0f} |")
    lines += [] if not rows else ["", "| input | stitch / cp | stitch / (cp + sync) | reshard / cp | reshard / (cp + sync) | "
              "baseline / stitch | buffered / direct stitch | CRC check / none | diff by value / diff equal | "
              "hf / stitch |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sorted({r["size"] for r in rows}):
        stitch = by[(size, "ckpt-tool stitch")]["seconds"]
        cp = by[(size, "cp")]["seconds"]
        cp_sync = by[(size, "cp + sync")]["seconds"]
        base = by.get((size, "python baseline"))
        speedup = f"{base['seconds'] / stitch:.1f}" if base else "skipped"
        reshard = [r for r in rows if r["size"] == size and r["step"].startswith("ckpt-tool reshard")][0]["seconds"]
        buffered = by[(size, "ckpt-tool stitch --buffered-io")]["seconds"]
        unchecked = by[(size, "ckpt-tool stitch --no-crc-check")]["seconds"]
        by_value = by[(size, "ckpt-tool diff fp16 vs bf16 copy")]["seconds"] / by[(size, "ckpt-tool diff (self)")]["seconds"]
        lines.append(f"| {size:g} GiB | {stitch / cp:.2f} | {stitch / cp_sync:.2f} | {reshard / cp:.2f} | "
                     f"{reshard / cp_sync:.2f} | {speedup} | {buffered / stitch:.2f} | {stitch / unchecked:.2f} | "
                     f"{by_value:.2f} | {by[(size, 'ckpt-tool stitch --format hf')]['seconds'] / stitch:.2f} |")
    if grid_rows:
        lines += ["", "Grids at OPT-175B's shape (`ckpt-tool synth --layers 96 --embed-dim 128 --ffn-dim 512 --vocab "
                  "1024 --optimizer-state`): 96 layers with Adam state, so each shard's pickle, shard_metadata and "
                  "optimizer entries are those of the real checkpoint, at tiny widths. 8 x 124 is OPT-175B's 992 "
                  f"shards. Median of {args.grid_repeats}, `sync` before each.", "",
                  "| grid | files | step | wall s | peak RSS MiB | note |", "|---|---:|---|---:|---:|---|"]
        for r in grid_rows:
            lines.append(f"| {r['grid']} | {r['files']} | {r['step']} | {r['seconds']:.2f} | "
                         f"{r['rss'] / (1 << 20):.0f} | {r.get('note', '')} |")
    text = "\n".join(lines) + "\n"
    open(args.results, "w").write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
