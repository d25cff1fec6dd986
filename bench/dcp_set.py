#!/usr/bin/python3
"""Writes a DCP directory for the benchmark with torch's own writer: `ranks` processes
(gloo on 127.0.0.1) each save their Shard(0) boxes of a model of 64 MiB fp32 matrices
(TOTAL_GIB in all) plus a few object items, one data file per rank.

    bench/dcp_set.py OUT_DIR TOTAL_GIB [RANKS]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import dcp_sets  # noqa: E402  (patches dataclasses so torch 1.13's DCP imports; its writer's imports)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed._shard import sharded_tensor  # noqa: E402
from torch.distributed._shard.checkpoint import FileSystemWriter, save_state_dict  # noqa: E402
from torch.distributed._shard.sharding_spec import ChunkShardingSpec  # noqa: E402

ROWS, COLS = 4096, 4096  # 64 MiB of fp32


def worker(out, total_gib, rank, ranks, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(ranks)])
    state = {"train.step": 1200, "train.config": {"lr": 3e-4, "layers": 16}}
    count = max(1, int(total_gib * (1 << 30) // (ROWS * COLS * 4)))
    for i in range(count):
        tensor = sharded_tensor.empty(spec, ROWS, COLS, dtype=torch.float32)
        for shard in tensor.local_shards():
            generator = torch.Generator().manual_seed(i * 1000 + shard.metadata.shard_offsets[0])
            shard.tensor.copy_(torch.randn(shard.tensor.shape, generator=generator))
        state[f"model.layers.{i}.weight"] = tensor
    save_state_dict(state, FileSystemWriter(out, single_file_per_rank=True))
    dist.barrier()
    dist.destroy_process_group()


def main():
    if sys.argv[1] == "--_worker":
        out, total, rank, ranks, port = sys.argv[2:7]
        worker(out, float(total), int(rank), int(ranks), int(port))
        return
    out, total = sys.argv[1], sys.argv[2]
    ranks = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    os.makedirs(out, exist_ok=True)
    port = dcp_sets._free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    procs = [dcp_sets.subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", out, total, str(r),
                                        str(ranks), str(port)], env=env) for r in range(ranks)]
    if any(p.wait() != 0 for p in procs):
        sys.exit("dcp_set: a rank failed")


if __name__ == "__main__":
    main()
