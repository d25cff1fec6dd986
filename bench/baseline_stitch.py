#!/usr/bin/python3
"""The Python pipeline ckpt-tool replaces, as metaseq's scripts do it: torch.load
every shard into memory, consolidate each model part with fairscale's rule
(unpad, torch.cat, split, view), glue the Megatron parts (qkv split into k, v, q;
column- and row-parallel concatenation; replicated tensors from part 0), and
torch.save the result. Its output equals `ckpt-tool stitch` (checked by the
benchmark with `ckpt-tool diff`).

usage: baseline_stitch.py SHARD_DIR OUT.pt
"""
import glob
import os
import re
import sys
from collections import OrderedDict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
from fairscale_rule import consolidate_shard_weights  # noqa: E402  (the one copy of fairscale's rule)


def glue(parts):
    out = OrderedDict()
    aliases = {}
    for key, tensor in parts[0].items():
        same = [k for k, t in parts[0].items() if t is tensor]
        if same[0] != key:  # a tie: keep it one tensor
            aliases[key] = same[0]
            continue
        pieces = [p[key] for p in parts]
        if "qkv" in key:
            ks, vs, qs = zip(*[torch.split(p, p.shape[0] // 3) for p in pieces])
            for name, group in (("k_proj", ks), ("v_proj", vs), ("q_proj", qs)):
                out[key.replace("qkv_proj", name)] = torch.cat(group, dim=0)
        elif "ffn_layernorm" in key:
            out[key] = torch.cat(pieces, dim=0)
        elif "layer_norm" in key:
            out[key] = pieces[0]
        elif "fc1" in key or "k_proj" in key or "q_proj" in key or "v_proj" in key:
            out[key] = torch.cat(pieces, dim=0)
        elif "fc2" in key or "out_proj" in key:
            out[key] = pieces[0] if key.endswith("bias") else torch.cat(pieces, dim=1)
        elif "embed_tokens.weight" in key:
            out[key] = torch.cat(pieces, dim=0)
        else:
            out[key] = pieces[0]
    for key, target in aliases.items():
        out[key] = out[target]
    # ties come before buffers, as in the consolidated part
    ordered = OrderedDict()
    for key in parts[0]:
        if "qkv" in key:
            for name in ("k_proj", "v_proj", "q_proj"):
                ordered[key.replace("qkv_proj", name)] = out[key.replace("qkv_proj", name)]
        else:
            ordered[key] = out[key]
    return ordered


def main():
    shard_dir, out_path = sys.argv[1], sys.argv[2]
    files = sorted(glob.glob(os.path.join(shard_dir, "*.pt")))
    grid = {}
    for f in files:
        m = int(re.search(r"model_part-(\d+)", f).group(1))
        d = int(re.search(r"shard(\d+)\.pt$", f).group(1))
        grid.setdefault(m, {})[d] = torch.load(f, map_location="cpu")  # every shard in memory, like metaseq
    parts = [consolidate_shard_weights([grid[m][d] for d in sorted(grid[m])]) for m in sorted(grid)]
    first = grid[0][0]
    model = glue(parts)
    del parts
    out = {k: v for k, v in first.items() if k not in ("shard_metadata", "last_optimizer_state")}
    out["model"] = model
    out["cfg"]["model"]["model_parallel_size"] = 1
    torch.save(out, out_path)


if __name__ == "__main__":
    main()
