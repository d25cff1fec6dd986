"""A second writer of metaseq training sets, independent of fixtures/generate.py.

The fixture generator and ckpt-tool were written by the same hands; checkpoints a
stranger wrote broke ckpt-tool where the fixtures did not (issue 24: a shard_metadata
whose shapes were torch.Size, tuples or lists; separate k/v/q projections; an untied
output projection cut on the vocabulary; renamed files). This module writes such sets
from a full model it keeps, so a test compares ckpt-tool's output with the model the
set was cut from, not with a second computation of the same rule.

    write_set(out_dir, **options) -> StrangerSet   the files, the full model, the parts

Options (all with defaults): layers, mp, dp, embed (E), ffn (F), vocab (V), positions
(P), dtype, shapes ("size", "tuple" or "list": how shard_metadata spells a shape),
tied (output projection tied to embed_tokens, else its own vocab-parallel weight),
root_first (the root FSDP instance before or after the layers), prefix (the file
names' stem), seed.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

# Megatron's cut of each weight over the model parts: 0 or 1 the dim, None replicated.
_ROOT = [("decoder.embed_tokens.weight", "VE", 0), ("decoder.embed_positions.weight", "PE", None),
         ("decoder.layer_norm.weight", "E", None), ("decoder.layer_norm.bias", "E", None)]
_UNTIED = ("decoder.output_projection.weight", "VE", 0)
_LAYER = [("self_attn.k_proj.weight", "EE", 0), ("self_attn.k_proj.bias", "E", 0),
          ("self_attn.v_proj.weight", "EE", 0), ("self_attn.v_proj.bias", "E", 0),
          ("self_attn.q_proj.weight", "EE", 0), ("self_attn.q_proj.bias", "E", 0),
          ("self_attn.out_proj.weight", "EE", 1), ("self_attn.out_proj.bias", "E", None),
          ("self_attn_layer_norm.weight", "E", None), ("self_attn_layer_norm.bias", "E", None),
          ("fc1.weight", "FE", 0), ("fc1.bias", "F", 0), ("fc2.weight", "EF", 1), ("fc2.bias", "E", None),
          ("final_layer_norm.weight", "E", None), ("final_layer_norm.bias", "E", None)]
TIED = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")


@dataclass
class StrangerSet:
    files: list                       # paths, part-major
    full: OrderedDict                 # the whole model (tied keys share one tensor)
    parts: list                       # [m] the part's consolidated state dict
    order: list = field(default_factory=list)  # instance order: fsdp paths


def _shape(kind, shape):
    return {"size": torch.Size, "tuple": tuple, "list": list}[kind](shape)


def _instances(layers, tied, root_first):
    root = ("", _ROOT + ([] if tied else [_UNTIED]))
    body = [(f"decoder.layers.{i}", _LAYER) for i in range(layers)]
    return [root] + body if root_first else body + [root]


def _cut(tensor, dim, mp, m):
    return tensor if dim is None else tensor.chunk(mp, dim=dim)[m].clone()


def _shard(flat, dp, d):
    """fairscale's FSDP rule: chunk into dp pieces (fewer when short), pad every rank to
    chunk 0's length."""
    chunks = list(flat.chunk(dp))
    chunks += [flat.new_empty(0)] * (dp - len(chunks))
    pad = chunks[0].numel() - chunks[d].numel()
    return torch.cat([chunks[d], flat.new_zeros(pad)]), pad


def write_set(out_dir, layers=2, mp=1, dp=1, embed=8, ffn=16, vocab=16, positions=6, dtype=torch.float16,
              shapes="size", tied=True, root_first=True, prefix="checkpoint_last", seed=0):
    gen = torch.Generator().manual_seed(seed)
    dims = {"E": embed, "F": ffn, "V": vocab, "P": positions + 2}
    instances = _instances(layers, tied, root_first)
    full = OrderedDict()
    for path, names in instances:
        for name, dims_of, _ in names:
            key = f"{path}.{name}" if path else name
            full[key] = torch.randn([dims[c] for c in dims_of], generator=gen).to(dtype)
    if tied:
        full[TIED[1]] = full[TIED[0]]
    full["decoder.version"] = torch.tensor([3.0])
    os.makedirs(out_dir, exist_ok=True)
    files, parts = [], []
    for m in range(mp):
        part = OrderedDict()
        flats = []
        for path, names in instances:
            local = OrderedDict()
            for name, _, dim in names:
                key = f"{path}.{name}" if path else name
                local[name] = _cut(full[key], dim, mp, m)
                part[key] = local[name]
            flats.append((path, local))
        if tied:
            part[TIED[1]] = part[TIED[0]]
        part["decoder.version"] = full["decoder.version"]
        parts.append(part)
        for d in range(dp):
            model, metadata = OrderedDict(), []
            for path, local in flats:
                flat = torch.cat([t.reshape(-1) for t in local.values()])
                shard, pad = _shard(flat, dp, d)
                model[f"{path}.flat_param_0" if path else "flat_param_0"] = shard
                metadata.append({"fsdp_path": path, "params": {"flat_param_0": {
                    "names": list(local), "shapes": [_shape(shapes, t.shape) for t in local.values()],
                    "numels": [t.numel() for t in local.values()], "padding": pad}},
                    "no_broadcast_optim_state": False,
                    "shared_param_info": [TIED] if tied and path == "" else []})
            model["decoder.version"] = full["decoder.version"]
            cfg = {"model": {"_name": "transformer_lm_megatron", "decoder_layers": layers,
                             "decoder_embed_dim": embed, "decoder_ffn_embed_dim": ffn,
                             "decoder_attention_heads": 2, "share_decoder_input_output_embed": tied,
                             "model_parallel_size": mp, "max_target_positions": positions},
                   "common": {"model_parallel_size": mp}, "distributed_training": {"distributed_world_size": mp * dp}}
            path = os.path.join(out_dir, f"{prefix}-model_part-{m}-shard{d}.pt")
            torch.save({"cfg": cfg, "model": model, "criterion": None, "optimizer_history": [],
                        "extra_state": {"rank": (m, d)},
                        "shard_metadata": {"param_metadata": metadata, "buffer_names": ["decoder.version"]}}, path)
            files.append(path)
    return StrangerSet(files, full, parts, [p for p, _ in instances])
