#!/usr/bin/python3
"""DeepSpeed ZeRO folders (issue 28), as tests/e2e/deepspeed_sets.py writes them
following DeepSpeed's save code: stitch writes what zero_to_fp32 writes (names, order,
dtypes, values, ties) for ZeRO stages 1-3, world sizes 1, 3 and 4, fp16 and bf16, one
and two param groups, frozen and shared parameters; it reads only the fp32 partitions,
refuses sets that are not one complete save before writing, and inspect, verify, diff
and manifest read the folders."""
import json
import os
import shutil

import torch

import deepspeed_sets as ds
import harness
import safetensors_check as st

INCOMPLETE = 66  # ErrorKind::IncompleteSet
CORRUPT = 65
USAGE = 2


def _write(work, name, stage, world, **options):
    model = ds.Model(seed=stage * 7 + world, dtype=torch.bfloat16 if options.get("bf16") else torch.float16)
    root = os.path.join(work, name)
    folder = ds.write_set(root, model, stage, world, **options)
    return root, folder, model


def _load(path):
    return torch.load(path)


def test_the_writer_agrees_with_zero_to_fp32():
    work = harness.scratch("deepspeed-writer")
    assert len(ds.self_check(work)) == 36


def test_stitch_writes_zero_to_fp32s_state_dict_for_every_set():
    work = harness.scratch("deepspeed-stitch")
    sets = ds.self_check(work)
    for i, (root, folder, model, stage) in enumerate(sets):
        out = os.path.join(work, f"out{i}.pt")
        harness.run(["stitch", "-q", root if i % 2 == 0 else folder, "-o", out])  # by `latest`, or the step folder
        got = _load(out)
        want = ds.reference_zero_to_fp32(folder)
        ds.same(got, want)  # keys in order, dtypes, shapes, values bit for bit
        if "lm_head.weight" in want:  # a shared parameter: one tensor under both names, as torch.save keeps it
            assert got["lm_head.weight"].data_ptr() == got["head.weight"].data_ptr(), folder
        assert type(got) is dict, type(got)


def test_older_pickles_and_the_bf16_optimizer():
    work = harness.scratch("deepspeed-forms")
    for form in ("value", "int"):  # zero_stage as Python before 3.11 pickles the enum, and as a plain int
        for stage in (2, 3):
            root, folder, model = _write(work, f"{form}{stage}", stage, 3, stage_form=form)
            out = os.path.join(work, f"{form}{stage}.pt")
            harness.run(["stitch", "-q", root, "-o", out])
            ds.same(_load(out), ds.reference_zero_to_fp32(folder))
    # BF16_Optimizer: no zero_stage (zero_to_fp32 refuses it), partitions with their padding: read as ZeRO-1
    root, folder, model = _write(work, "bf16opt", 1, 4, bf16=True, bf16_optimizer=True)
    out = os.path.join(work, "bf16opt.pt")
    harness.run(["stitch", "-q", root, "-o", out])
    ds.same(_load(out), ds.expected_state_dict(model, 1))
    text, _ = harness.run(["inspect", root])
    assert "BF16_Optimizer (ZeRO-1), bf16, 4 data-parallel rank(s)" in text, text


def test_safetensors_sharded_dtype_and_module_weights():
    work = harness.scratch("deepspeed-outputs")
    root, folder, model = _write(work, "z3", 3, 4)
    want = ds.reference_zero_to_fp32(folder)
    # a sharded safetensors set, as zero_to_fp32 --safe_serialization writes one: the tie once
    out = os.path.join(work, "model.safetensors")
    _, err = harness.run(["stitch", root, "-o", out, "--max-shard-size", "8KB"])
    assert "lm_head.weight is tied to head.weight" in err, err
    got = st.read_sharded(work, "model.safetensors.index.json").tensors  # an independent reader of the format
    assert sorted(got) == sorted(k for k in want if k != "lm_head.weight"), sorted(got)
    for key, tensor in got.items():
        assert tensor.dtype == want[key].dtype and torch.equal(tensor, want[key]), key
    harness.run(["diff", root, os.path.join(work, "model.safetensors.index.json")])
    # --dtype bf16 converts every floating tensor while copying (the buffers zero_to_fp32 makes fp32 too)
    out = os.path.join(work, "bf16.pt")
    harness.run(["stitch", "-q", root, "-o", out, "--dtype", "bf16"])
    got = _load(out)
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], tensor.to(torch.bfloat16)), key
    # --weights-from module: ZeRO-1/2's 16-bit module, whole there; ZeRO-3's holds placeholders
    root2, folder2, model2 = _write(work, "z2", 2, 3)
    out = os.path.join(work, "module.pt")
    harness.run(["stitch", "-q", root2, "-o", out, "--weights-from", "module"])
    got = _load(out)
    module = torch.load(os.path.join(folder2, "mp_rank_00_model_states.pt"))["module"]
    fp32 = ds.reference_zero_to_fp32(folder2)
    assert list(got) == list(fp32)
    for group in model2.groups:
        for key in group:
            assert got[key].dtype == model2.dtype and torch.equal(got[key], module[key]), key
    for key in model2.buffers:
        assert torch.equal(got[key], fp32[key]), key
    _, err = harness.run(["stitch", root, "-o", os.path.join(work, "no.pt"), "--weights-from", "module"], expect=USAGE)
    assert "ZeRO-3 module holds placeholders" in err and not os.path.exists(os.path.join(work, "no.pt")), err


def test_optimizer_state_per_parameter_in_torchs_form():
    """--optimizer-state: Adam's moments cut per parameter with the weights' rule, in
    torch's optimizer form, which torch.optim.Adam loads to resume without DeepSpeed."""
    work = harness.scratch("deepspeed-optimizer")
    for stage, world in ((1, 3), (2, 4), (3, 3), (3, 4)):
        root, folder, model = _write(work, f"z{stage}w{world}", stage, world)
        out = os.path.join(work, f"z{stage}w{world}.pt")
        harness.run(["stitch", "-q", root, "-o", out, "--optimizer-state"])
        ck = _load(out)
        assert list(ck) == ["model", "last_optimizer_state"], list(ck)
        ds.same(ck["model"], ds.reference_zero_to_fp32(folder))
        state = ck["last_optimizer_state"]
        params = [(name, t) for group in model.groups for name, t in group.items()]
        assert sorted(state["state"]) == list(range(len(params)))
        for i, (name, t) in enumerate(params):
            one = state["state"][i]
            assert list(one) == ["step", "exp_avg", "exp_avg_sq"], list(one)
            # the generator's moments are 0.1 x and 0.01 x the square of the fp32 master, element by element
            assert torch.equal(one["exp_avg"], t.float() * 0.1), (stage, name)
            assert torch.equal(one["exp_avg_sq"], t.float() * t.float() * 0.01), (stage, name)
            assert torch.equal(one["step"], torch.tensor(7.0))
        first = len(model.groups[0])
        assert [g["params"] for g in state["param_groups"]] == [list(range(first)), list(range(first, len(params)))]
        assert state["param_groups"][0]["betas"] == (0.9, 0.95)
        # torch's own optimizer takes it: a run resumes without DeepSpeed
        weights = [[torch.nn.Parameter(ck["model"][name].clone()) for name in group] for group in model.groups]
        adam = torch.optim.Adam([{"params": w} for w in weights], lr=1e-4)
        adam.load_state_dict(state)
        for w in weights[0] + weights[1]:
            w.grad = torch.ones_like(w)
        adam.step()
    _, err = harness.run(["stitch", root, "-o", os.path.join(work, "x.pt"), "--optimizer-state", "--filter", "bias"],
                         expect=USAGE)
    assert "--filter does not go with --optimizer-state" in err, err
    # Each parameter gets its own group's state: a step per group (a second tester's find)
    for stage in (2, 3):
        root, folder, model = _write(work, f"steps{stage}", stage, 3)
        for r in range(3):
            inner = "base_optimizer_state" if stage == 2 else "optimizer_state_dict"
            _edit(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                  lambda o: o["optimizer_state_dict"][inner]["state"][1].__setitem__("step", torch.tensor(3.0)))
        out = os.path.join(work, f"steps{stage}.pt")
        harness.run(["stitch", "-q", root, "-o", out, "--optimizer-state"])
        state = _load(out)["last_optimizer_state"]["state"]
        first = len(model.groups[0])
        assert [float(state[i]["step"]) for i in sorted(state)] == [7.0] * first + [3.0] * (len(state) - first)
    # ZeRO-3 sub-groups' moments checked each against its flat group (a swap kept the total)
    root, folder, model = _write(work, "swapped", 3, 3)
    for r in range(3):
        def swap(o):
            state = o["optimizer_state_dict"]["optimizer_state_dict"]["state"]
            state[0], state[1] = state[1], state[0]
        _edit(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), swap)
    _refused([root, "--optimizer-state"], "state/0/exp_avg holds 559 elements, and fp32_flat_groups/0 470",
             os.path.join(work, "swapped.pt"), code=1)
    # every group's state holds the same entries
    root, folder, model = _write(work, "entries", 3, 3)
    for r in range(3):
        _edit(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
              lambda o: o["optimizer_state_dict"]["optimizer_state_dict"]["state"][0].pop("step"))
    _refused([root, "--optimizer-state"], "state 1 holds other entries than state 0", os.path.join(work, "e.pt"),
             code=1)


def test_latest_and_tag_pick_the_step_folder():
    work = harness.scratch("deepspeed-tag")
    root = os.path.join(work, "run")
    old = ds.Model(seed=1)
    new = ds.Model(seed=2)
    ds.write_set(root, old, 2, 3, tag="global_step100", step=100)
    ds.write_set(root, new, 2, 3, tag="global_step200", step=200)  # `latest` names this one
    out = os.path.join(work, "latest.pt")
    harness.run(["stitch", "-q", root, "-o", out])
    ds.same(_load(out), ds.expected_state_dict(new, 2))
    out = os.path.join(work, "old.pt")
    harness.run(["stitch", "-q", root, "--tag", "global_step100", "-o", out])
    ds.same(_load(out), ds.expected_state_dict(old, 2))
    text, _ = harness.run(["inspect", root, "--tag", "global_step100"])
    assert "step 100" in text, text
    _, err = harness.run(["stitch", root, "--tag", "global_step300", "-o", out + "2"], expect=USAGE)
    assert "--tag global_step300: no step folder of that name here" in err, err
    # `latest` naming a folder that is not there (a save interrupted before its files)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step300\n")
    _, err = harness.run(["stitch", root, "-o", out + "3"], expect=INCOMPLETE)
    assert "latest: names the step folder global_step300, which is not there" in err, err
    os.remove(os.path.join(root, "latest"))
    os.mkdir(os.path.join(root, "latest"))
    _, err = harness.run(["stitch", root, "-o", out + "3"], expect=1)
    assert "latest: not a file" in err, err
    harness.run(["stitch", "-q", os.path.join(root, "global_step100"), "-o", out + "4"])  # the step folder itself


def _refused(args, fragment, out, code=INCOMPLETE):
    _, err = harness.run(["stitch"] + args + ["-o", out], expect=code)
    assert fragment in err, (fragment, err)
    assert err.count("\n") == 1, err  # one line
    assert not os.path.exists(out), out  # nothing written
    return err


def test_sets_that_are_not_one_complete_save_are_refused_before_writing():
    work = harness.scratch("deepspeed-checks")
    out = os.path.join(work, "out.pt")

    def fresh(name, stage=3, world=3):
        return _write(work, name, stage, world)

    # a rank's optimizer file missing
    root, folder, _ = fresh("missing")
    os.remove(os.path.join(folder, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    _refused([root], "rank 1's optimizer file (zero_pp_rank_1_mp_rank_00_optim_states.pt) is missing: "
             "partition_count is 3", out)
    # a ZeRO-3 rank's model file missing (its frozen fragments are there)
    root, folder, _ = fresh("missing-model")
    os.remove(os.path.join(folder, "zero_pp_rank_2_mp_rank_00_model_states.pt"))
    _refused([root], "rank 2's model file (zero_pp_rank_2_mp_rank_00_model_states.pt) is missing", out)
    # a file of a save over more ranks left in the folder
    root, folder, _ = fresh("stale")
    other = os.path.join(work, "other")
    ds.write_set(other, ds.Model(seed=9), 3, 4)
    shutil.copy(os.path.join(other, "global_step7", "zero_pp_rank_3_mp_rank_00_optim_states.pt"), folder)
    _refused([root], "zero_pp_rank_3_mp_rank_00_optim_states.pt: ZeRO stage 3 over 4 ranks, but "
             "zero_pp_rank_0_mp_rank_00_optim_states.pt says stage 3 over 3: files of two saves", out)
    # one rank's model file from another step
    root, folder, _ = fresh("steps")
    later = os.path.join(work, "later")
    ds.write_set(later, ds.Model(seed=3 * 7 + 3), 3, 3, step=8)
    shutil.copy(os.path.join(later, "global_step7", "zero_pp_rank_1_mp_rank_00_model_states.pt"), folder)
    _refused([root], "zero_pp_rank_1_mp_rank_00_model_states.pt: global_steps 8, "
             "zero_pp_rank_0_mp_rank_00_model_states.pt says 7", out)
    # param_shapes that do not match the partitions: the ZeRO-1/2 padding rule, and ZeRO-3's slices
    for stage in (2, 3):
        root, folder, _ = fresh(f"shapes{stage}", stage=stage)
        names = sorted(n for n in os.listdir(folder) if n.endswith("_model_states.pt"))
        for name in names:
            path = os.path.join(folder, name)
            states = torch.load(path)
            states["param_shapes"][1]["layers.1.bias"] = torch.Size([45])  # 39 elements saved
            torch.save(states, path)
        _refused([root], "param group 1: head.weight [5, 39] needs elements [1488, 1683) of the group, which holds 1677"
                 if stage == 2 else "rank 0 holds 1029 elements, and the parameters' slices of ceil(numel / 3) take 1031",
                 out)
    # tensor parallelism and pipeline layer files: not supported yet, said so
    root, folder, _ = fresh("tp")
    shutil.copy(os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                os.path.join(folder, "zero_pp_rank_0_mp_rank_01_optim_states.pt"))
    _refused([root], "tensor-parallel rank 1: DeepSpeed checkpoints with tensor parallelism (mp_rank_01 and up) are "
             "not supported yet", out)
    root, folder, _ = fresh("pp", stage=1)
    torch.save({"weight": torch.zeros(2)}, os.path.join(folder, "layer_01-model_states.pt"))
    _refused([root], "layer_01-model_states.pt: a pipeline-parallel layer file: DeepSpeed pipeline checkpoints are "
             "not supported yet", out)
    # a folder of model files only
    root, folder, _ = fresh("no-optim", stage=2)
    for name in os.listdir(folder):
        if name.endswith("_optim_states.pt"):
            os.remove(os.path.join(folder, name))
    _refused([root], "no *_optim_states.pt", out)
    # verify and inspect list the same problems, exit non-zero
    text, _ = harness.run(["verify", os.path.join(work, "missing")], expect=1)
    assert "rank 1's optimizer file" in text, text


def _edit(path, change):
    states = torch.load(path)
    change(states)
    torch.save(states, path)


def test_what_a_stranger_broke():
    """Regressions of a stranger's attack (issue 28): a strided or stride-0 view as a flat
    group (memory per element before), buffers that are no tensors dropped silently, a
    shared parameter that is also a parameter, a name twice, a bad partition_count."""
    work = harness.scratch("deepspeed-stranger")
    out = os.path.join(work, "out.pt")
    # A strided view as rank 1's partition reads right; a 10-element storage viewed as
    # 2^28 elements is refused by the numel check at once, not after 24 GB.
    root, folder, model = _write(work, "strided", 2, 3)
    want = ds.reference_zero_to_fp32(folder)
    optim = os.path.join(folder, "zero_pp_rank_1_mp_rank_00_optim_states.pt")

    def strided(states):
        groups = states["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        wide = torch.zeros(groups[0].numel() * 2)
        wide[::2] = groups[0]
        groups[0] = wide[::2]  # stride 2 over a storage twice as long
    _edit(optim, strided)
    harness.run(["stitch", "-q", root, "-o", out])
    ds.same(_load(out), want)
    os.remove(out)

    def stride0(states):
        groups = states["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        groups[0] = torch.zeros(10).as_strided((1 << 28,), (0,))
    _edit(optim, stride0)
    for command in (["manifest", root, "-o", os.path.join(work, "m.json")], ["inspect", root]):
        harness.run(command)  # (no tensor byte read, no memory per element)
    _refused([root], "param group 0: the parameters take", out)
    # buffers that are no tensors, a module that is None, buffer_names that is no list: zero_to_fp32 fails
    for name, change, fragment in (
            ("str-buffer", lambda m: m["module"].__setitem__("norm.running_mean", "x"),
             "module/norm.running_mean: a buffer (buffer_names) that is no tensor"),
            ("no-module", lambda m: m.__setitem__("module", None), "module is not a state dict"),
            ("names", lambda m: m.__setitem__("buffer_names", "norm.running_mean"),
             "buffer_names is not a list of names")):
        root, folder, _ = _write(work, name, 2, 3)
        _edit(os.path.join(folder, "mp_rank_00_model_states.pt"), change)
        _refused([root], fragment, out)
    # a name twice: a buffer that is a parameter too
    root, folder, _ = _write(work, "twice", 1, 3)
    _edit(os.path.join(folder, "mp_rank_00_model_states.pt"),
          lambda m: m.__setitem__("buffer_names", m["buffer_names"] + ["layers.0.bias"]))
    _refused([root], "layers.0.bias is named twice, as a buffer and as a trainable parameter", out)
    # shared_params naming a parameter as the alias, after and before its source: zero_to_fp32
    # assigns the source's tensor at the alias's place
    for name, shared in (("alias-after", {"head.weight": "layers.1.weight"}),
                         ("alias-before", {"layers.0.weight": "layers.1.weight"})):
        root, folder, _ = _write(work, name, 3, 3)
        for rank in range(3):
            _edit(os.path.join(folder, f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"),
                  lambda m: m.__setitem__("shared_params", dict(shared) if m["shared_params"] else {}))
        want = ds.reference_zero_to_fp32(folder)
        harness.run(["stitch", "-q", root, "-o", out])
        got = _load(out)
        ds.same(got, want)
        (alias, source), = shared.items()
        assert got[alias].data_ptr() == got[source].data_ptr(), name
        os.remove(out)
    # partition_count that is no world size
    root, folder, _ = _write(work, "count", 3, 3)
    _edit(os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
          lambda o: o["optimizer_state_dict"].__setitem__("partition_count", 0))
    _refused([root], "partition_count 0 is no world size", out)


def test_what_a_review_found():
    """Regressions of a code review (issue 28): sizes that wrap, a param group listed
    twice, chained shared parameters, a scalar parameter's moments, a second ZeRO-1/2
    model file, a view in too many runs, a huge partition_count, --tag on both sides."""
    work = harness.scratch("deepspeed-review")
    out = os.path.join(work, "out.pt")
    # four parameters of 2^62 elements: refused by shape, not summed past 2^64
    root, folder, _ = _write(work, "huge", 3, 1)
    _edit(os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
          lambda m: m.__setitem__("param_shapes", [{f"p{i}": torch.Size([1 << 62]) for i in range(4)}]))
    _refused([root], "p0 has the shape [4611686018427387904]", out)
    # shared_params chained: z = y's tensor, then y = x's (zero_to_fp32 assigns in order)
    root, folder, _ = _write(work, "chain", 2, 3)
    _edit(os.path.join(folder, "mp_rank_00_model_states.pt"),
          lambda m: m.__setitem__("shared_params", {"head.weight": "layers.1.bias", "layers.1.bias": "layers.0.bias"}))
    harness.run(["stitch", "-q", root, "-o", out])
    got, want = _load(out), ds.reference_zero_to_fp32(folder)
    ds.same(got, want)
    assert got["head.weight"].data_ptr() != got["layers.1.bias"].data_ptr()
    assert got["layers.1.bias"].data_ptr() == got["layers.0.bias"].data_ptr()
    os.remove(out)
    # --optimizer-state: a param group listing a sub-group twice is refused (its parameters would repeat)
    root, folder, _ = _write(work, "twice", 3, 3)
    for r in range(3):
        _edit(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
              lambda o: o["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"][1].__setitem__(
                  "params", [1, 0]))
    _refused([root, "--optimizer-state"], "param_groups[1] lists 0, which a param group listed already", out,
             code=1)
    # a scalar parameter alone in its group: its moments are of shape [1] at world 1
    model = ds.Model(seed=3, frozen=False, shared=False)
    model.groups[1] = ds.OrderedDict([("logit_scale", torch.tensor(2.5))])
    root = os.path.join(work, "scalar")
    folder = ds.write_set(root, model, 3, 1)
    harness.run(["stitch", "-q", root, "-o", out, "--optimizer-state"])
    state = _load(out)["last_optimizer_state"]["state"]
    assert torch.equal(state[2]["exp_avg"], torch.tensor(2.5) * 0.1), state[2]
    os.remove(out)
    # a second ZeRO-1/2 model file (mp_rank_000 parses as part 0 too)
    root, folder, _ = _write(work, "second-model", 2, 3)
    shutil.copy(os.path.join(folder, "mp_rank_00_model_states.pt"), os.path.join(folder, "mp_rank_000_model_states.pt"))
    _refused([root], "a second model file", out)
    # a buffer viewed in more runs than any checkpoint holds: refused, not planned a piece at a time
    root, folder, _ = _write(work, "runs", 2, 3)
    _edit(os.path.join(folder, "mp_rank_00_model_states.pt"),
          lambda m: m["module"].__setitem__("norm.running_mean", torch.zeros(1).as_strided((1 << 27, 2), (0, 0))))
    _, err = harness.run(["stitch", root, "-o", out], expect=1)
    assert "mp_rank_00_model_states.pt: module/norm.running_mean: at byte 0x" in err and \
        "a view of shape [134217728, 2] and strides [0, 0]" in err, err
    # partition_count of 2^20 with three files: a few missing ranks listed, not a million
    root, folder, _ = _write(work, "count", 3, 3)
    for r in range(3):
        _edit(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
              lambda o: o["optimizer_state_dict"].__setitem__("partition_count", 1 << 20))
    text, _ = harness.run(["verify", root], expect=1)
    assert "more missing" in text and text.count("is missing") < 12, text[-2000:]
    # --tag applies to every folder given: diff of two runs whose second lacks the step
    a, b = os.path.join(work, "run-a"), os.path.join(work, "run-b")
    ds.write_set(a, ds.Model(seed=1), 2, 3, tag="global_step5", step=5)
    ds.write_set(b, ds.Model(seed=1), 2, 3, tag="global_step6", step=6)
    _, err = harness.run(["diff", a, b, "--tag", "global_step5"], expect=2)
    assert "run-b: --tag global_step5: no step folder of that name here" in err, err


def _flip(path, offsets):
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))


def _tensor_offsets(work, folder, keep):
    """{file: [byte offsets of the first element of each tensor `keep(path, file_name)` takes]}"""
    manifest = os.path.join(work, "manifest.json")
    harness.run(["manifest", folder, "-o", manifest, "-f"])
    with open(manifest) as f:
        data = json.load(f)
    out = {}
    for file in data["files"]:
        tensors = data["tensor_lists"][file["tensors"]]
        name = os.path.basename(file["path"])
        for tensor, offset in zip(tensors, file["file_byte_offsets"]):
            if tensor["nbytes"] > 0 and keep(tensor["path"], name):
                out.setdefault(file["path"], []).append(offset)
    return out


def test_stitch_reads_only_the_fp32_partitions():
    """Every byte stitch copies is checked against its record's CRC-32; so with Adam's
    moments and the 16-bit module's weights corrupted, a stitch that never reads them
    still succeeds and writes the same bytes, while verify finds the damage."""
    work = harness.scratch("deepspeed-reads")
    for stage in (2, 3):
        root, folder, model = _write(work, f"z{stage}", stage, 3)
        want = ds.reference_zero_to_fp32(folder)
        buffers = set(model.buffers)

        def unread(path, name):
            moment = path.endswith("/exp_avg") or path.endswith("/exp_avg_sq")
            weight = path.startswith("module/") and path[len("module/"):] not in buffers
            return moment or weight

        for path, offsets in _tensor_offsets(work, folder, unread).items():
            _flip(path, offsets)
        out = os.path.join(work, f"z{stage}.pt")
        harness.run(["stitch", "-q", root, "-o", out])
        ds.same(_load(out), want)
        text, _ = harness.run(["verify", root, "-q"], expect=1)
        assert "CRC-32 of the data" in text, text
        if stage == 2:  # the module is read with --weights-from module: its damage is found
            _, err = harness.run(["stitch", root, "-o", out + "m", "--weights-from", "module"], expect=CORRUPT)
            assert "CRC-32" in err and "mp_rank_00_model_states.pt" in err, err
        # a flipped byte in an fp32 partition is found, and nothing is written
        partitions = _tensor_offsets(work, folder, lambda p, n: "fp32_flat_groups/" in p or
                                     "single_partition_of_fp32_groups/" in p)
        path = sorted(partitions)[-1]
        _flip(path, partitions[path][:1])
        _, err = harness.run(["stitch", root, "-o", out + "x"], expect=CORRUPT)
        assert os.path.basename(path) in err and not os.path.exists(out + "x"), err


def test_inspect_verify_diff_and_manifest_read_the_folder():
    work = harness.scratch("deepspeed-read")
    root, folder, model = _write(work, "z3", 3, 4, bf16=True)
    text, _ = harness.run(["inspect", root])
    for line in ("format: deepspeed", "DeepSpeed 0.19.6 checkpoint", "ZeRO stage 3, bf16, 4 data-parallel rank(s), "
                 "step 7", "param groups: 2 (5 trainable parameter(s), 3083 elements)",
                 "frozen parameters: 1 (407 elements", "shared parameters (written as ties): lm_head.weight -> "
                 "head.weight", "bytes: fp32 weights 12.1 KiB, Adam moments 24.2 KiB", "problems: none found",
                 "deepspeed.runtime.zero.config.ZeroStageEnum"):
        assert line in text, (line, text)
    data = json.loads(harness.run(["inspect", root, "--json"])[0])
    assert data["format"] == "deepspeed" and data["problems"] == [], data["problems"]
    assert any("ZeRO stage 3, bf16, 4 data-parallel rank(s)" in line for line in data["layout_summary"]), data
    harness.run(["verify", root, "-q"])
    # diff by value against zero_to_fp32's output: equal, then one element changed
    want = ds.reference_zero_to_fp32(folder)
    ref = os.path.join(work, "ref.pt")
    torch.save(want, ref)
    harness.run(["diff", root, ref])
    want["layers.0.bias"] = want["layers.0.bias"].clone()
    want["layers.0.bias"][3] += 1
    torch.save(want, ref)
    text, _ = harness.run(["diff", root, ref], expect=1)
    assert "model/layers.0.bias: 1 of 37 elements differ" in text, text
    # a manifest of the folder reads as the folder does
    manifest = os.path.join(work, "ds.json")
    harness.run(["manifest", root, "-o", manifest])
    out = os.path.join(work, "from-manifest.pt")
    harness.run(["stitch", "-q", manifest, "-o", out])
    ds.same(_load(out), ds.reference_zero_to_fp32(folder))
    # each file alone is a torch file of DeepSpeed's, its classes carried as data; the set check names what is missing
    text, _ = harness.run(["inspect", os.path.join(folder, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")])
    assert "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler" in text, text
    assert "rank 1's optimizer file" in text, text


if __name__ == "__main__":
    harness.main([test_the_writer_agrees_with_zero_to_fp32,
                  test_stitch_writes_zero_to_fp32s_state_dict_for_every_set,
                  test_older_pickles_and_the_bf16_optimizer,
                  test_safetensors_sharded_dtype_and_module_weights,
                  test_optimizer_state_per_parameter_in_torchs_form,
                  test_latest_and_tag_pick_the_step_folder,
                  test_sets_that_are_not_one_complete_save_are_refused_before_writing,
                  test_what_a_stranger_broke,
                  test_what_a_review_found,
                  test_stitch_reads_only_the_fp32_partitions,
                  test_inspect_verify_diff_and_manifest_read_the_folder])
