"""fairscale's FSDP consolidation rule, written once for the tests
(test_reshard.py) and the benchmark's Python baseline (bench/baseline_stitch.py):
torch.load'ed shards of one model part in, the part's full state dict out.

    consolidate_shard_weights(shards)          the model, as fairscale's
                                               consolidate_shard_weights
    consolidate_optimizer_state(shards, name)  one per-parameter optimizer state
                                               ("exp_avg"), flat per parameter
"""
from collections import OrderedDict

import torch


def _key(meta, name):
    return f"{meta['fsdp_path']}.{name}" if meta["fsdp_path"] else name


def _unpadded(shards, i, name, tensor_of):
    """Flat parameter `name` of instance i, each rank unpadded by its recorded padding,
    the ranks one after the other; tensor_of(rank, shard) gives a rank's flat tensor."""
    pieces = []
    for rank, shard in enumerate(shards):
        pad = shard["shard_metadata"]["param_metadata"][i]["params"][name]["padding"]
        t = tensor_of(rank, shard)
        pieces.append(t[: t.numel() - pad])
    return torch.cat(pieces)


def consolidate_shard_weights(shards):
    """Unpad each rank by its recorded padding, concatenate, split into names and
    shapes; ties from every instance; buffers from rank 0."""
    metas = [s["shard_metadata"] for s in shards]
    out = OrderedDict()
    for i, meta in enumerate(metas[0]["param_metadata"]):
        for name, v in meta["params"].items():
            key = _key(meta, name)
            full = _unpadded(shards, i, name, lambda rank, shard: shard["model"][key])
            assert sum(v["numels"]) == full.numel(), (key, sum(v["numels"]), full.numel())
            for n, t, s in zip(v["names"], full.split(v["numels"]), v["shapes"]):
                out[_key(meta, n)] = t.view(s)
    for meta in metas[0]["param_metadata"]:
        for src, dst in meta["shared_param_info"]:
            out[dst] = out[src]
    for b in metas[0]["buffer_names"]:
        out[b] = shards[0]["model"][b]
    return out


def consolidate_optimizer_state(shards, state_name):
    """The same rule applied to last_optimizer_state: state k belongs to the k-th flat
    parameter and is unpadded with the weights' padding. One flat tensor per parameter."""
    out = []
    k = 0
    for i, meta in enumerate(shards[0]["shard_metadata"]["param_metadata"]):
        for name in meta["params"]:
            out.append(_unpadded(shards, i, name,
                                 lambda rank, shard, k=k: shard["last_optimizer_state"]["state"][k][state_name]))
            k += 1
    return out
