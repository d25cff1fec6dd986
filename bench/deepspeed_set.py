#!/usr/bin/python3
"""Writes a DeepSpeed ZeRO-3 checkpoint for the benchmark as DeepSpeed's save code lays it
out (tests/e2e/deepspeed_sets.py): `world` ranks, fp32 master weights of TOTAL_GIB in
4096 x 4096 matrices (64 MiB each) plus one odd-sized bias each, two param groups, and
Adam's two moments over the same partitions (so the folder is about 3 x TOTAL_GIB).

    bench/deepspeed_set.py SAVE_DIR TOTAL_GIB [WORLD]
"""
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import deepspeed_sets  # noqa: E402

import torch  # noqa: E402

ROWS, COLS = 4096, 4096


def main():
    out, total_gib = sys.argv[1], float(sys.argv[2])
    world = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    count = max(2, int(total_gib * (1 << 30) // (ROWS * COLS * 4)))
    g = torch.Generator().manual_seed(28)
    model = deepspeed_sets.Model(seed=28, frozen=False, shared=False)
    groups = [OrderedDict(), OrderedDict()]
    for i in range(count):
        groups[i % 2][f"layers.{i}.weight"] = torch.randn(ROWS, COLS, generator=g)
        groups[i % 2][f"layers.{i}.bias"] = torch.randn(COLS + 3, generator=g)  # odd: padding on the last rank
    model.groups = groups
    deepspeed_sets.write_set(out, model, 3, world, tag="global_step1200", step=1200)


if __name__ == "__main__":
    main()
