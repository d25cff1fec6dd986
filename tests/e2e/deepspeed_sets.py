#!/usr/bin/python3
"""DeepSpeed ZeRO checkpoint folders, written as DeepSpeed's save code writes them, and
what `zero_to_fp32.py` makes of them, computed from the full tensors the folder was
written from (DeepSpeed itself is not installable here).

The layout follows ../shared/FORMATS.md (DeepSpeed) and DeepSpeed 0.19's engine.py,
stage_1_and_2.py, stage3.py and zero_to_fp32.py:
- `latest` holds the tag (no newline); the tag folder holds `mp_rank_00_model_states.pt`
  (ZeRO-1/2) or `zero_pp_rank_{r}_mp_rank_00_model_states.pt` per rank (ZeRO-3), and
  `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` per rank.
- ZeRO-1/2: each group flattened in `param_shapes` order, padded to a multiple of
  2 x world, cut into equal partitions; `single_partition_of_fp32_groups` drops the
  padding (only the last ranks are shorter); Adam's moments keep it.
- ZeRO-3: each parameter cut into ceil(numel / world) elements per rank, the padding at
  the last rank's end; a rank's flat group is its slices one after the other.
- The pickles hold DeepSpeed's own classes (ZeroStageEnum, DynamicLossScaler): stand-ins
  with the same module and name are registered here, so the files name them as
  DeepSpeed's do.

`expected_state_dict` is zero_to_fp32's output: buffers (fp32), frozen parameters (their
16-bit fragments, ZeRO-2 and 3 only), trainable parameters (fp32 masters) in
`param_shapes` order, then each shared parameter as the same tensor as its source.
`reference_zero_to_fp32` is that script's algorithm over the files, to check the writer.
"""
import enum
import math
import os
import sys
import types
from collections import OrderedDict

import torch


def _register(module_name, cls):
    """Makes `cls` importable as `module_name.<its name>`, as the pickles name it."""
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[name])
    cls.__module__ = module_name
    setattr(sys.modules[module_name], cls.__name__, cls)
    return cls


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3


class DynamicLossScaler:
    def __init__(self):
        self.cur_scale = 65536.0
        self.cur_iter = 7
        self.last_overflow_iter = -1
        self.scale_factor = 2.0
        self.scale_window = 1000
        self.min_scale = 1.0
        self.delayed_shift = 1
        self.cur_hysteresis = 1
        self.consecutive_hysteresis = False
        self.raise_error_at_min_scale = True
        self.dynamic = True
        self.dtype = torch.float16


class _StageByValue(int):
    """ZeroStageEnum as Python before 3.11 pickles it: the class called with its value."""

    def __reduce__(self):
        return (ZeroStageEnum, (int(self),))


_register("deepspeed.runtime.zero.config", ZeroStageEnum)
_register("deepspeed.runtime.fp16.loss_scaler", DynamicLossScaler)


class Model:
    """What a checkpoint is written from: full tensors by name, in module order."""

    def __init__(self, seed=0, dtype=torch.float16, groups=2, frozen=True, shared=True, odd=True):
        g = torch.Generator().manual_seed(seed)
        self.dtype = dtype  # the module's 16-bit dtype (fp16 or bf16 training)
        n = 37 if odd else 32  # odd numels: padding is never trivial
        self.buffers = OrderedDict([("embed.position_ids", torch.arange(n, dtype=torch.int64)),
                                    ("norm.running_mean", torch.randn(n, generator=g))])
        self.frozen = OrderedDict()
        if frozen:
            self.frozen["embed.weight"] = torch.randn(11, n, generator=g)
        trainable = [OrderedDict([("layers.0.weight", torch.randn(n, n, generator=g)),
                                  ("layers.0.bias", torch.randn(n, generator=g))]),
                     OrderedDict([("layers.1.weight", torch.randn(n + 2, n, generator=g)),
                                  ("layers.1.bias", torch.randn(n + 2, generator=g)),
                                  ("head.weight", torch.randn(5, n + 2, generator=g))])]
        if groups == 1:
            trainable = [OrderedDict(p for group in trainable for p in group.items())]
        self.groups = trainable  # fp32 masters, per param group, in flattening order
        self.shared = OrderedDict([("lm_head.weight", "head.weight")]) if shared else OrderedDict()

    def module_state_dict(self, stage):
        """`module`: the 16-bit state dict (ZeRO-3: parameters are empty placeholders)."""
        sd = OrderedDict()
        for name, t in self.frozen.items():
            sd[name] = torch.empty(0, dtype=self.dtype) if stage == 3 else t.to(self.dtype)
        for group in self.groups:
            for name, t in group.items():
                sd[name] = torch.empty(0, dtype=self.dtype) if stage == 3 else t.to(self.dtype)
        for alias, source in self.shared.items():
            sd[alias] = sd[source]
        for name, t in self.buffers.items():
            sd[name] = t
        return sd


def _zero12_partitions(flat, world):
    """A group's flat fp32 vector padded to a multiple of 2 x world, cut into `world`
    equal partitions; returns (partitions with padding, padding of each)."""
    align = 2 * world
    padded = math.ceil(flat.numel() / align) * align
    full = torch.cat([flat, torch.zeros(padded - flat.numel())])
    size = padded // world
    parts = [full[r * size:(r + 1) * size].clone() for r in range(world)]
    paddings = [max(0, min(size, (r + 1) * size - flat.numel())) for r in range(world)]
    return parts, paddings


def _zero3_slices(t, world):
    """Rank r's slice of a parameter: ceil(numel / world) elements, zero-padded at the end."""
    flat = t.reshape(-1)
    per = math.ceil(flat.numel() / world)
    full = torch.cat([flat, torch.zeros(per * world - flat.numel(), dtype=flat.dtype)])
    return [full[r * per:(r + 1) * per].clone() for r in range(world)]


def write_set(root, model, stage, world, bf16=False, tag="global_step7", step=7, write_latest=True,
              stage_form="enum", bf16_optimizer=False):
    """Writes `model` as DeepSpeed saves it at ZeRO `stage` over `world` ranks under
    `root` (`latest` and the tag folder). Returns the tag folder.
    `stage_form`: how zero_stage is pickled: "enum" (ZeroStageEnum, by name as Python
    3.11+ does), "value" (the class called with the value, Python before 3.11) or "int"
    (DeepSpeed before 0.7). `bf16_optimizer` (stage 1): DeepSpeed's BF16_Optimizer, whose
    state has no zero_stage and keeps the padding in its partitions."""
    folder = os.path.join(root, tag)
    os.makedirs(folder, exist_ok=True)
    if write_latest:
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(tag)
    ds_config = {"train_batch_size": 8, "zero_optimization": {"stage": stage},
                 "bf16" if bf16 else "fp16": {"enabled": True}}
    common = OrderedDict([
        ("buffer_names", list(model.buffers)),
        ("optimizer", None),
        ("param_shapes", [OrderedDict((n, t.shape) for n, t in g.items()) for g in model.groups]),
        ("frozen_param_shapes", OrderedDict((n, t.shape) for n, t in model.frozen.items()) if stage >= 2 else None),
        ("shared_params", dict(model.shared)),
    ])

    def frozen_fragments(rank):
        if stage < 2:
            return None
        if stage == 2:
            return OrderedDict((n, t.to(model.dtype)) for n, t in model.frozen.items())
        return OrderedDict((n, _zero3_slices(t.to(model.dtype), world)[rank]) for n, t in model.frozen.items())

    def model_states(rank):
        sd = OrderedDict([("module", model.module_state_dict(stage))])
        sd.update(common)
        if rank != 0:
            sd["shared_params"] = {}  # computed on global rank 0 only
        sd["frozen_param_fragments"] = frozen_fragments(rank)
        sd.update([("lr_scheduler", None), ("data_sampler", None), ("random_ltd", None),
                   ("sparse_tensor_module_names", set()), ("skipped_steps", 0), ("global_steps", step),
                   ("global_samples", step * 8), ("dp_world_size", world), ("mp_world_size", 1),
                   ("ds_config", ds_config), ("ds_version", "0.19.6")])
        return sd

    if stage <= 2:
        torch.save(model_states(0), os.path.join(folder, "mp_rank_00_model_states.pt"))
    else:
        for r in range(world):
            torch.save(model_states(r), os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))

    prefix = "bf16_" if bf16 else ""
    if stage <= 2:
        cut = [_zero12_partitions(torch.cat([t.reshape(-1) for t in g.values()]), world) for g in model.groups]
    else:
        # one flat fp32 partition per sub-group (here: per param group), a rank's slices side by side
        cut = [[torch.cat([_zero3_slices(t, world)[r] for t in g.values()]) for r in range(world)]
               for g in model.groups]
    for r in range(world):
        moments = {}
        for i, group in enumerate(cut):
            partition = group[0][r] if stage <= 2 else group[r]
            moments[i] = {"step": torch.tensor(float(step)), "exp_avg": partition * 0.1,
                          "exp_avg_sq": partition * partition * 0.01}
        base = {"state": moments,
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0,
                                  "amsgrad": False, "params": [i]} for i in range(len(cut))]}
        zero_stage = {"enum": ZeroStageEnum(stage), "value": _StageByValue(stage), "int": stage}[stage_form]
        if bf16_optimizer:
            assert stage == 1
            inner = OrderedDict([
                ("clip_grad", 1.0), ("base_optimizer_state", base),
                ("single_partition_of_fp32_groups", [group[0][r].clone() for group in cut]),
                ("group_paddings", [group[1][r] for group in cut]), ("partition_count", [world] * len(cut)),
                ("ds_version", "0.19.6"), ("param_slice_mappings", [OrderedDict() for _ in cut])])
        elif stage <= 2:
            inner = OrderedDict([
                ("loss_scaler", DynamicLossScaler()), ("dynamic_loss_scale", True), ("overflow", False),
                ("clip_grad", 1.0), ("base_optimizer_state", base),
                ("single_partition_of_fp32_groups",
                 [group[0][r][:group[0][r].numel() - group[1][r]].clone() for group in cut]),
                ("zero_stage", zero_stage), ("group_paddings", [group[1][r] for group in cut]),
                ("partition_count", [world] * len(cut)), ("ds_version", "0.19.6"),
                ("param_slice_mappings", [OrderedDict() for _ in cut])])
        else:
            inner = OrderedDict([
                ("zero_stage", zero_stage), ("loss_scaler", DynamicLossScaler()),
                ("dynamic_loss_scale", True), ("overflow", False), ("partition_count", world),
                ("optimizer_state_dict", base), ("fp32_flat_groups", [group[r] for group in cut])])
        torch.save({"optimizer_state_dict": inner, "ds_config": ds_config, "ds_version": "0.19.6"},
                   os.path.join(folder, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    return folder


def expected_state_dict(model, stage):
    """What zero_to_fp32 writes for `model` saved at `stage`, from the full tensors."""
    sd = OrderedDict((n, t.float()) for n, t in model.buffers.items())
    if stage >= 2:
        for n, t in model.frozen.items():
            sd[n] = t.to(model.dtype)
    for group in model.groups:
        for n, t in group.items():
            sd[n] = t.float()
    for alias, source in model.shared.items():
        if source in sd:
            sd[alias] = sd[source]
    return sd


def reference_zero_to_fp32(folder):
    """zero_to_fp32's algorithm (DeepSpeed 0.19) over the files in the tag folder `folder`."""
    import re

    def natural(name):
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

    names = sorted(os.listdir(folder), key=natural)
    models = [torch.load(os.path.join(folder, n)) for n in names if n.endswith("_model_states.pt")]
    optims = [torch.load(os.path.join(folder, n))["optimizer_state_dict"] for n in names
              if n.endswith("_optim_states.pt")]
    stage = int(optims[0]["zero_stage"])
    count = optims[0]["partition_count"]
    world = max(count) if isinstance(count, list) else count
    assert world == len(optims), (world, len(optims))
    first = models[0]
    sd = OrderedDict((k, v.float()) for k, v in first["module"].items() if k in first["buffer_names"])
    frozen = first.get("frozen_param_shapes") or {}
    if stage <= 2:
        for n in frozen:
            sd[n] = first["frozen_param_fragments"][n]
        for i, shapes in enumerate(first["param_shapes"]):
            flat = torch.cat([o["single_partition_of_fp32_groups"][i] for o in optims], 0)
            offset = 0
            for n, shape in shapes.items():
                sd[n] = flat.narrow(0, offset, shape.numel()).view(shape)
                offset += shape.numel()
            align = 2 * world
            assert math.ceil(offset / align) * align == math.ceil(flat.numel() / align) * align, (offset, flat.numel())
    else:
        for n, shape in frozen.items():
            sd[n] = torch.cat([m["frozen_param_fragments"][n] for m in models], 0).narrow(0, 0, shape.numel()).view(
                shape)
        flats = [torch.cat(o["fp32_flat_groups"], 0) for o in optims]
        offset = 0
        for shapes in first["param_shapes"]:
            for n, shape in shapes.items():
                per = math.ceil(shape.numel() / world)
                sd[n] = torch.cat([f.narrow(0, offset, per) for f in flats], 0)[:shape.numel()].view(shape)
                offset += per
        assert offset == flats[0].numel(), (offset, flats[0].numel())
    for alias, source in first["shared_params"].items():
        if source in sd:
            sd[alias] = sd[source]
    return sd


def same(a, b):
    """Keys in order, dtypes, shapes and values equal, and ties kept."""
    assert list(a) == list(b), (list(a), list(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    return True


def self_check(work):
    """The writer against zero_to_fp32's algorithm: every stage, world 1, 3 and 4, fp16
    and bf16, one and two groups, with and without frozen and shared parameters.
    Returns the sets written: (root, tag folder, model, stage) each."""
    sets = []
    for stage in (1, 2, 3):
        for world in (1, 3, 4):
            for bf16 in (False, True):
                for groups, frozen, shared in ((2, True, True), (1, False, False)):
                    model = Model(seed=stage * 10 + world, dtype=torch.bfloat16 if bf16 else torch.float16,
                                  groups=groups, frozen=frozen, shared=shared)
                    root = os.path.join(work, f"z{stage}-w{world}-{'bf16' if bf16 else 'fp16'}-g{groups}")
                    folder = write_set(root, model, stage, world, bf16=bf16)
                    got = reference_zero_to_fp32(folder)
                    same(got, expected_state_dict(model, stage))
                    if shared:
                        assert got["lm_head.weight"] is got["head.weight"]
                    sets.append((root, folder, model, stage))
    return sets


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{len(self_check(tmp))} DeepSpeed sets written and consolidated as zero_to_fp32 does: ok")
