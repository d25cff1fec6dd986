#!/usr/bin/python3
"""PyTorch Distributed Checkpoint directories as inputs (issue 26): inspect, verify and
diff read the sets torch 1.13's real writer made (fixtures/tiny/dcp, written by
dcp_sets.py) in place, and every tensor equals what torch's own DCP reader gives."""
import dataclasses
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import zipfile

import torch

import harness
import dcp_sets
import safetensors_check

FIXTURES = os.path.join(os.environ["CKPT_SOURCE_ROOT"], "fixtures", "tiny", "dcp")
FULL_SETS = ["mixed", "blocks_2d", "item_files_dim1", "rank_files_dim0"]
V2_SETS = ["v2_metadata", "v2_0_metadata", "v2_metadata_strides"]


def copy_set(name, work):
    """The set under work/name; a v2_* set is mixed's data files beside its own .metadata."""
    out = os.path.join(work, name)
    shutil.copytree(os.path.join(FIXTURES, "mixed" if name in V2_SETS else name), out)
    if name in V2_SETS:
        shutil.copy(os.path.join(FIXTURES, name, ".metadata"), os.path.join(out, ".metadata"))
    return out


def reference_file(dcp_dir, work):
    """torch's reader's items under their flat keys, saved by torch.save: the tensors
    inside object items (extra_state's) are compared with the set's too."""
    flat = dcp_sets.reference_state_dict(dcp_dir)
    path = os.path.join(work, os.path.basename(dcp_dir) + ".ref.pt")
    torch.save(flat, path)
    return path


def test_every_set_equals_torchs_reader():
    work = harness.scratch("dcp-equal")
    for name in FULL_SETS + V2_SETS:
        dcp_dir = copy_set(name, work)
        out, _ = harness.run(["inspect", dcp_dir])
        assert "format: dcp" in out and "problems: none found" in out, out
        md = dcp_sets.read_metadata(dcp_dir)
        tensors = [v for v in md.state_dict_metadata.values() if hasattr(v, "chunks")]
        chunks = sum(len(v.chunks) for v in tensors)
        assert f"{len(tensors)} tensor(s) in {chunks} chunk(s)" in out, out
        assert f"{len(md.state_dict_metadata) - len(tensors)} object item(s)" in out, out
        # object items are decoded as data: their values as torch's reader unpickles them
        for key, value in dcp_sets.reference_state_dict(dcp_dir).items():
            if isinstance(value, torch.Tensor) or key == "extra_state":
                continue
            assert f"object {key} = {json.dumps(value, separators=(',', ':'))}" in out, (name, key, out)
        harness.run(["verify", "-q", dcp_dir])
        harness.run(["diff", dcp_dir, reference_file(dcp_dir, work)])


def test_an_object_items_tensor_is_read_and_checked():
    work = harness.scratch("dcp-object-tensor")
    dcp_dir = copy_set("mixed", work)
    out, _ = harness.run(["inspect", dcp_dir, "--tensors", "--filter", "extra_state"])
    scale = dcp_sets.reference_state_dict(dcp_dir)["extra_state"]["scale"]
    assert "extra_state/scale" in out and str(list(scale.shape)[0]) in out, out
    out, _ = harness.run(["verify", dcp_dir])  # its storage record is among those checked
    assert "37 record(s)" in out, out


def test_a_changed_element_is_a_difference():
    work = harness.scratch("dcp-differ")
    dcp_dir = copy_set("blocks_2d", work)
    flat = {k: v for k, v in dcp_sets.reference_state_dict(dcp_dir).items() if isinstance(v, torch.Tensor)}
    flat["grid_f32_6x8"] = flat["grid_f32_6x8"].clone()
    flat["grid_f32_6x8"][4, 5] += 1  # in the last of the four 3x4 boxes
    ref = os.path.join(work, "ref.pt")
    torch.save(flat, ref)
    out, _ = harness.run(["diff", dcp_dir, ref], expect=1)
    assert "grid_f32_6x8" in out, out


def test_a_missing_data_file_or_overlapping_boxes_are_refused():
    work = harness.scratch("dcp-bad")
    dcp_dir = copy_set("rank_files_dim0", work)
    os.remove(os.path.join(dcp_dir, "__1_0.distcp"))
    _, err = harness.run(["diff", dcp_dir, dcp_dir], expect=2)
    assert "__1_0.distcp is missing" in err, err
    # a missing data file is a problem of the set, as a missing shard is: listed, then refused as incomplete
    out, _ = harness.run(["inspect", dcp_dir])
    assert "__1_0.distcp is missing" in out, out
    harness.run(["verify", "-q", dcp_dir], expect=1)
    _, err = harness.run(["stitch", "-q", dcp_dir, "-o", os.path.join(work, "x.pt")], expect=harness.EXIT["incomplete_set"])
    assert "__1_0.distcp is missing" in err and not os.path.exists(os.path.join(work, "x.pt")), err
    dcp_dir = copy_set("mixed", os.path.join(work, "overlap"))
    md = dcp_sets.read_metadata(dcp_dir)
    chunk = md.state_dict_metadata["model.embed.weight"].chunks[1]
    chunk.offsets = torch.Size([2, 0])  # rows 2..4 where box 0 holds 0..2
    index = next(ix for ix in md.storage_data if ix.fqn == "model.embed.weight" and list(ix.offset) == [3, 0])
    md.storage_data[dataclasses.replace(index, offset=torch.Size([2, 0]))] = md.storage_data.pop(index)
    rewrite_metadata(dcp_dir, md)
    out, _ = harness.run(["verify", dcp_dir], expect=1)
    assert "model.embed.weight" in out and "overlaps" in out, out


def test_transformed_items_and_ranges_that_start_no_item_are_refused_by_name():
    work = harness.scratch("dcp-transformed")
    md = dcp_sets.read_metadata(os.path.join(FIXTURES, "mixed"))
    planner = dcp_sets.planner_data_for("v2_metadata")
    dcp_dir = copy_set("mixed", os.path.join(work, "zstd"))
    with open(os.path.join(dcp_dir, ".metadata"), "wb") as f:
        f.write(dcp_sets.repickle_v2(md, planner, transforms={"model.fp64": ["stream.zstd/1"]}))
    _, err = harness.run(["stitch", "-q", dcp_dir, "-o", os.path.join(work, "out.pt")], expect=1)
    assert "model.fp64" in err and "stored transformed (stream.zstd/1)" in err, err
    # an item's range moved one byte in: no zip starts there
    dcp_dir = copy_set("mixed", os.path.join(work, "shifted"))
    index = next(ix for ix in md.storage_data if ix.fqn == "model.ids")
    md.storage_data[index].offset += 1
    md.storage_data[index].length -= 1
    rewrite_metadata(dcp_dir, md)
    _, err = harness.run(["inspect", dcp_dir], expect=1)
    assert "model.ids" in err and "not a torch.save archive" in err, err
    assert not os.path.exists(os.path.join(work, "out.pt"))


def test_verify_checks_every_chunk_against_its_crc():
    work = harness.scratch("dcp-crc")
    dcp_dir = copy_set("item_files_dim1", work)
    out, _ = harness.run(["verify", dcp_dir])
    assert "record data checked" in out, out
    md = dcp_sets.read_metadata(dcp_dir)
    chunk = md.state_dict_metadata["d_f16_2x5x3"].chunks[1]
    info = next(v for k, v in md.storage_data.items() if k.fqn == "d_f16_2x5x3" and list(k.offset) == list(chunk.offsets))
    path = os.path.join(dcp_dir, info.relative_path)
    data = bytearray(open(path, "rb").read())
    item = bytes(data[info.offset:info.offset + info.length])
    header = zipfile.ZipFile(io.BytesIO(item)).getinfo("archive/data/0").header_offset
    name_len, extra_len = struct.unpack("<HH", item[header + 26:header + 30])
    data[info.offset + header + 30 + name_len + extra_len] ^= 0x04  # the chunk's first data byte
    open(path, "wb").write(bytes(data))
    out, _ = harness.run(["verify", dcp_dir], expect=1)
    assert "d_f16_2x5x3/1" in out and "CRC-32" in out and info.relative_path in out, out


def raw(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_stitch_writes_safetensors_equal_to_torchs_reader():
    work = harness.scratch("dcp-stitch")
    for name in FULL_SETS + ["v2_metadata"]:
        dcp_dir = copy_set(name, work)
        out = os.path.join(work, name + ".safetensors")
        harness.run(["stitch", "-q", dcp_dir, "-o", out])
        got = dict(safetensors_check.read(out)[0])  # an independent reader of the format
        want = {k: v for k, v in dcp_sets.reference_state_dict(dcp_dir).items() if isinstance(v, torch.Tensor)}
        assert sorted(got) == sorted(want), (name, sorted(got), sorted(want))
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, (name, key)
            assert torch.equal(raw(got[key]), raw(tensor)), (name, key)  # bit for bit
        harness.run(["diff", dcp_dir, out])  # (the objects' tensors, which safetensors cannot hold, not looked for)
    # --dtype converts as it copies; a torch.save output needs the objects, not read yet
    dcp_dir = os.path.join(work, "mixed")
    out = os.path.join(work, "bf16.safetensors")
    harness.run(["stitch", "-q", dcp_dir, "-o", out, "--dtype", "bf16"])
    got = dict(safetensors_check.read(out)[0])
    assert got["model.embed.weight"].dtype == torch.bfloat16 and got["model.ids"].dtype == torch.int32
    # --filter: a subset, the model without the optimizer state
    out = os.path.join(work, "model.safetensors")
    harness.run(["stitch", "-q", dcp_dir, "-o", out, "--filter", r"^model\."])
    got = dict(safetensors_check.read(out)[0])
    want = {k for k, v in dcp_sets.reference_state_dict(dcp_dir).items()
            if isinstance(v, torch.Tensor) and k.startswith("model.")}
    assert set(got) == want, (sorted(got), sorted(want))
    harness.run(["stitch", "-q", dcp_dir, "-o", os.path.join(work, "none.safetensors"), "--filter", "nothing"],
                expect=harness.EXIT["usage"])
    _, err = harness.run(["stitch", "-q", dcp_dir, "--format", "hf", "-o", os.path.join(work, "hf")],
                         expect=harness.EXIT["usage"])
    assert "write safetensors" in err, err
    assert not os.path.exists(os.path.join(work, "hf"))


def expected_torch_save(dcp_dir):
    """What dcp_to_torch_save writes: torch's reader's items nested by planner_data."""
    md = dcp_sets.read_metadata(dcp_dir)
    return dcp_sets.nested_state_dict(dcp_sets.reference_state_dict(dcp_dir), getattr(md, "planner_data", None))


def plain_tensors(value, where=""):
    """Every tensor in `value` is what torch.empty(size, dtype) gives: a plain tensor,
    contiguous, without grad, alone in its storage."""
    if isinstance(value, torch.Tensor):
        assert type(value) is torch.Tensor and value.is_contiguous() and not value.requires_grad, where
        assert value.storage().size() == value.numel(), where
    elif isinstance(value, dict):
        for key, item in value.items():
            plain_tensors(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            plain_tensors(item, f"{where}[{i}]")


def test_stitch_to_torch_writes_what_dcp_to_torch_save_writes():
    work = harness.scratch("dcp-torch")
    for name in FULL_SETS + V2_SETS:
        dcp_dir = copy_set(name, work)
        out = os.path.join(work, name + ".pt")
        harness.run(["stitch", "-q", dcp_dir, "-o", out])
        got = torch.load(out)
        assert type(got) is dict, (name, type(got))
        errors = dcp_sets._same(got, expected_torch_save(dcp_dir), name)  # keys in order, values bit for bit
        assert not errors, errors
        if name == "v2_metadata":
            plain_tensors(got)
            assert list(got) == ["model", "optim", "train", "extra_state"], list(got)
            assert type(got["model"]["layers"]) is list and len(got["model"]["layers"]) == 2
        harness.run(["diff", dcp_dir, out])  # nested sets by where each key nests
        # and back: a 'model' of nested dicts is one state dict to a format of tensors alone
        again = os.path.join(work, name + ".again.dcp")
        harness.run(["stitch", "-q", out, "--format", "dcp", "-o", again])
        harness.run(["diff", again, out])
    # diff compares the object items with the file's values where they nest (or at their flat keys)
    for name, change, line in [("v2_metadata", lambda d: d["train"].update(step=1201), "train.step: 1200 != 1201"),
                               ("mixed", lambda d: d.pop("train.run_name"), "train.run_name: only in A")]:
        changed = torch.load(os.path.join(work, name + ".pt"))
        change(changed)
        path = os.path.join(work, name + ".changed.pt")
        torch.save(changed, path)
        out, _ = harness.run(["diff", os.path.join(work, name), path], expect=1)
        assert line in out and "1 object difference(s)" in out, out
    dcp_dir = os.path.join(work, "v2_metadata")
    # --filter: the items whose flat key matches, objects too, nested as before
    out = os.path.join(work, "model-and-step.pt")
    harness.run(["stitch", "-q", dcp_dir, "-o", out, "--filter", r"^model\.|^train\.step$"])
    got = torch.load(out)
    want = expected_torch_save(dcp_dir)
    assert not dcp_sets._same(got, {"model": want["model"], "train": {"step": want["train"]["step"]}}, "filter")
    # --dtype converts the floating tensors of the state dict, not the objects' own tensors
    out = os.path.join(work, "bf16.pt")
    harness.run(["stitch", "-q", dcp_dir, "-o", out, "--dtype", "bf16"])
    got = torch.load(out)
    assert got["model"]["embed"]["weight"].dtype == torch.bfloat16 and got["model"]["ids"].dtype == torch.int32
    assert torch.equal(got["model"]["embed"]["weight"], want["model"]["embed"]["weight"].bfloat16())
    assert got["extra_state"]["scale"].dtype == torch.float32
    # flags that read a training checkpoint are refused
    _, err = harness.run(["stitch", "-q", dcp_dir, "-o", os.path.join(work, "w.pt"), "--weights-only"],
                         expect=harness.EXIT["usage"])
    assert "training checkpoint" in err and not os.path.exists(os.path.join(work, "w.pt")), err


def test_planner_data_that_cannot_nest_is_refused_for_every_output():
    work = harness.scratch("dcp-nesting")
    md = dcp_sets.read_metadata(os.path.join(FIXTURES, "mixed"))
    planner = dcp_sets.planner_data_for("v2_metadata")

    def with_planner(name, changes):
        dcp_dir = copy_set("mixed", os.path.join(work, name))
        with open(os.path.join(dcp_dir, ".metadata"), "wb") as f:
            f.write(dcp_sets.repickle_v2(md, {**planner, **changes}))
        return dcp_dir

    for name, changes, problem in [
        ("through-a-tensor", {"model.ids": ("model", "embed", "weight", "ids")}, "holds a value there"),
        ("str-into-list", {"model.ids": ("model", "layers", "ids")}, "a str key into a list"),
        ("int-into-dict", {"model.ids": ("model", 0)}, "an int index into a dict"),
        ("huge-index", {"model.ids": ("model", "layers", 1 << 40, "x")}, "list index"),
        # where torch's loader would keep one of two items, or drop what is nested under one
        ("repeated", {"model.ids": ("model", "buckets")}, "model.buckets is there already"),
        ("over-a-dict", {"model.ids": ("model", "layers")}, "other keys are nested there"),
        ("empty", {"model.ids": ()}, "a key path of 0 elements"),
        ("deep", {"model.ids": ("x",) * 100000}, "...(100000 elements)"),
    ]:
        dcp_dir = with_planner(name, changes)
        for out in [os.path.join(work, name + ".pt"), os.path.join(work, name + ".dcp")]:
            _, err = harness.run(["stitch", "-q", dcp_dir, "-o", out] + (["--format", "dcp"] if ".dcp" in out else []),
                                 expect=harness.EXIT["bad_input"])
            assert ".metadata" in err and "model.ids" in err and problem in err, (name, err)
            assert len(err) < 1000 and not os.path.exists(out), (name, len(err))
    # and a safetensors input as torch: its tensors at the top level, in order
    st = os.path.join(work, "flat.safetensors")
    harness.run(["stitch", "-q", os.path.join(FIXTURES, "mixed"), "-o", st])
    harness.run(["stitch", "-q", st, "-o", os.path.join(work, "flat.pt")])
    got = torch.load(os.path.join(work, "flat.pt"))
    assert list(got) == [k for k, v in dcp_sets.reference_state_dict(os.path.join(FIXTURES, "mixed")).items()
                         if isinstance(v, torch.Tensor)] or sorted(got) == sorted(dict(safetensors_check.read(st)[0]))
    harness.run(["diff", st, os.path.join(work, "flat.pt")])


def rewrite_metadata(dcp_dir, md):
    with open(os.path.join(dcp_dir, ".metadata"), "wb") as f:
        pickle.dump(md, f, protocol=4)


def test_object_items_are_compared_and_data_files_named_anything():
    work = harness.scratch("dcp-objects")
    changed = copy_set("mixed", os.path.join(work, "changed"))
    md = dcp_sets.read_metadata(changed)
    index = next(ix for ix in md.storage_data if ix.fqn == "train.step")
    info = md.storage_data[index]
    item = io.BytesIO()
    torch.save(999, item)  # a new item for train.step, appended to its data file
    path = os.path.join(changed, info.relative_path)
    info.offset, info.length = os.path.getsize(path), len(item.getvalue())
    with open(path, "ab") as f:
        f.write(item.getvalue())
    rewrite_metadata(changed, md)
    assert dcp_sets.reference_state_dict(changed)["train.step"] == 999  # torch reads it so
    out, _ = harness.run(["diff", changed, os.path.join(FIXTURES, "mixed")], expect=1)
    assert "object train.step: 999 != 1200" in out, out
    # a data file is whatever .metadata names: here a.pt and b.safetensors
    renamed = copy_set("rank_files_dim0", os.path.join(work, "renamed"))
    md = dcp_sets.read_metadata(renamed)
    names = {"__0_0.distcp": "a.pt", "__1_0.distcp": "b.safetensors"}
    for old, new in names.items():
        os.rename(os.path.join(renamed, old), os.path.join(renamed, new))
    for info in md.storage_data.values():
        info.relative_path = names[info.relative_path]
    rewrite_metadata(renamed, md)
    harness.run(["verify", "-q", renamed])
    harness.run(["diff", renamed, reference_file(renamed, work)])


def test_format_dcp_is_read_by_torchs_loader_into_any_world_size():
    work = harness.scratch("dcp-out")
    for name in FULL_SETS + V2_SETS:
        dcp_dir = copy_set(name, work)
        out = os.path.join(work, name + ".dcp")
        harness.run(["stitch", "-q", dcp_dir, "--format", "dcp", "-o", out])
        assert not dcp_sets._same(dcp_sets.reference_state_dict(out), dcp_sets.reference_state_dict(dcp_dir), name)
        md_in, md_out = dcp_sets.read_metadata(dcp_dir), dcp_sets.read_metadata(out)
        assert list(md_out.state_dict_metadata) == list(md_in.state_dict_metadata), name  # the order kept
        want = getattr(md_in, "planner_data", None) or {key: (key,) for key in md_in.state_dict_metadata}
        assert md_out.planner_data == want, name  # nesting kept: dcp_to_torch_save gives the same dict
        assert md_out.version == "1.0.0" and sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"], name
        with open(os.path.join(out, ".metadata"), "rb") as f:
            assert b"torch.distributed.checkpoint.metadata" in f.read()  # torch 2.x's classes
        harness.run(["diff", out, dcp_dir])  # objects too
    # torch's own loader reads it into three ranks, each a shard of every tensor
    dcp_sets.load_sharded(os.path.join(work, "v2_metadata.dcp"), 3)
    # a metaseq training set: its consolidated model, each key an item, a tie a copy
    fixture = os.path.join(os.environ["CKPT_SOURCE_ROOT"], "fixtures", "tiny", "mp2_dp2_fp16_omega_opt")
    out = os.path.join(work, "opt.dcp")
    harness.run(["stitch", "-q", fixture, "--format", "dcp", "-o", out])
    stitched = os.path.join(work, "opt.pt")
    harness.run(["stitch", "-q", fixture, "-o", stitched])
    harness.run(["diff", out, stitched])
    got = dcp_sets.reference_state_dict(out)
    assert torch.equal(got["decoder.output_projection.weight"], got["decoder.embed_tokens.weight"])
    dcp_sets.load_sharded(out, 3)
    # a safetensors file: its tensors, each at the top level
    st = os.path.join(work, "flat.safetensors")
    harness.run(["stitch", "-q", os.path.join(work, "v2_metadata"), "-o", st])
    harness.run(["stitch", "-q", st, "--format", "dcp", "-o", os.path.join(work, "st.dcp")])
    harness.run(["diff", os.path.join(work, "st.dcp"), st])
    assert sorted(dcp_sets.read_metadata(os.path.join(work, "st.dcp")).state_dict_metadata) == \
        sorted(k for k, v in dcp_sets.reference_state_dict(os.path.join(work, "v2_metadata")).items()
               if isinstance(v, torch.Tensor))
    # --max-shard-size cuts the data files; --dtype converts as it copies
    out = os.path.join(work, "cut.dcp")
    harness.run(["stitch", "-q", fixture, "--format", "dcp", "-o", out, "--max-shard-size", "4KB", "--dtype", "fp32"])
    files = sorted(f for f in os.listdir(out) if f.endswith(".distcp"))
    assert len(files) > 3, files
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in files}
    md = dcp_sets.read_metadata(out)
    for f in files:  # each file at most 4 KB of items unless one item is larger alone
        items = [info.length for info in md.storage_data.values() if info.relative_path == f]
        assert sum(items) <= 4000 or len(items) == 1, (f, items)
        assert sizes[f] >= sum(items)
    got = dcp_sets.reference_state_dict(out)
    assert all(v.dtype == torch.float32 for v in got.values() if v.is_floating_point())
    harness.run(["stitch", "-q", fixture, "-o", stitched, "--dtype", "fp32", "--force"])
    harness.run(["diff", out, stitched])
    # a tensor larger than --max-shard-size is cut into chunks of whole rows, which torch's loader reassembles
    out = os.path.join(work, "rows.dcp")
    harness.run(["stitch", "-q", fixture, "--format", "dcp", "-o", out, "--max-shard-size", "40B", "--dtype", "fp32"])
    md = dcp_sets.read_metadata(out)
    tensors = [v for v in md.state_dict_metadata.values() if hasattr(v, "chunks")]
    assert sum(len(v.chunks) for v in tensors) > len(tensors), "no tensor was cut"
    assert all(all(c.offsets[1:] == torch.Size([0] * (len(c.offsets) - 1)) for c in v.chunks) for v in tensors)
    harness.run(["diff", out, stitched])
    dcp_sets.load_sharded(out, 2)


def test_a_plain_torch_file_is_written_as_safetensors_or_dcp():
    work = harness.scratch("dcp-plain")
    torch.manual_seed(0)
    embed = torch.randn(5, 3)
    state = {"embed.weight": embed, "layers.0.fc.weight": torch.randn(4, 3), "lm_head.weight": embed,
             "norms": [torch.ones(3), torch.zeros(3)], "nested": {"a": torch.arange(6).view(2, 3)}, "epoch": 3}
    path = os.path.join(work, "plain.pt")
    torch.save(state, path)
    out = os.path.join(work, "plain.dcp")
    _, err = harness.run(["stitch", path, "--format", "dcp", "-o", out])
    assert "1 value(s) that are no tensors of its dicts are left out" in err, err
    md = dcp_sets.read_metadata(out)
    # named and nested as torch's flatten_state_dict does: dict keys str, list indices int
    assert md.planner_data == {"embed.weight": ("embed.weight",), "layers.0.fc.weight": ("layers.0.fc.weight",),
                               "lm_head.weight": ("lm_head.weight",), "norms.0": ("norms", 0),
                               "norms.1": ("norms", 1), "nested.a": ("nested", "a")}, md.planner_data
    got = dcp_sets.nested_state_dict(dcp_sets.reference_state_dict(out), md.planner_data)
    del state["epoch"]
    assert not dcp_sets._same(got, state, "plain")  # the tie a copy of its tensor
    harness.run(["diff", out, path])
    st = os.path.join(work, "plain.safetensors")
    harness.run(["stitch", "-q", path, "-o", st])
    got = dict(safetensors_check.read(st)[0])
    assert sorted(got) == ["embed.weight", "layers.0.fc.weight", "nested.a", "norms.0", "norms.1"], sorted(got)
    assert torch.equal(got["nested.a"], state["nested"]["a"])
    # as torch, it would lose what is no tensor: refused
    _, err = harness.run(["stitch", "-q", path, "-o", os.path.join(work, "again.pt")], expect=1)
    assert "'model' state dict" in err and not os.path.exists(os.path.join(work, "again.pt")), err


def test_format_dcp_renames_its_metadata_last():
    fixture = os.path.join(os.environ["CKPT_SOURCE_ROOT"], "fixtures", "tiny", "mp2_dp2_fp16_omega_opt")
    work = harness.scratch("dcp-out-atomic")
    out = os.path.join(work, "opt.dcp")
    args = [harness.TOOL, "stitch", "-q", fixture, "--format", "dcp", "-o", out, "--max-shard-size", "8KB"]
    harness.run(args[1:])
    outputs = len(os.listdir(out))
    assert outputs > 3, os.listdir(out)
    # over it with -f and fewer data files: those no .metadata names any more are removed
    harness.run(["stitch", "-q", fixture, "--format", "dcp", "-o", out, "-f"])
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"], os.listdir(out)
    harness.run(args[1:] + ["-f"])
    # only what a .metadata there names is removed: a folder without one keeps its files
    other = os.path.join(work, "not-a-dcp")
    os.makedirs(other)
    for name in ["__1_0.distcp", "readme"]:
        with open(os.path.join(other, name), "w") as f:
            f.write("mine")
    harness.run(["stitch", "-q", fixture, "--format", "dcp", "-o", other, "-f"])
    assert sorted(os.listdir(other)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "readme"], os.listdir(other)
    # the .metadata's rename fails: the data files renamed before it are taken back
    fresh = os.path.join(work, "fresh.dcp")
    proc = subprocess.run(args[:-4] + ["-o", fresh, "--max-shard-size", "8KB"],
                          env=harness.preloaded(CKPT_FAIL_RENAME_AT=str(outputs)), capture_output=True, text=True)
    assert proc.returncode == harness.EXIT["io"] and ".metadata" in proc.stderr, proc
    assert not os.path.exists(fresh) or os.listdir(fresh) == [], os.listdir(fresh)
    # over an existing one (--force), a failure half way leaves no .metadata: no checkpoint to a reader
    proc = subprocess.run(args + ["--force"], env=harness.preloaded(CKPT_FAIL_RENAME_AT="2"), capture_output=True,
                          text=True)
    assert proc.returncode == harness.EXIT["io"], proc
    assert ".metadata" not in os.listdir(out), os.listdir(out)
    harness.run(["inspect", out], expect=harness.EXIT["bad_input"])


def test_a_manifest_of_a_dcp_set_stands_for_it():
    work = harness.scratch("dcp-manifest")
    dcp_dir = copy_set("v2_metadata", work)
    manifest = os.path.join(work, "v2.json")
    harness.run(["manifest", dcp_dir, "-o", manifest])
    with open(manifest) as f:
        doc = json.load(f)
    assert {file["format"] for file in doc["files"]} == {"dcp"}, doc["files"]
    out, _ = harness.run(["inspect", manifest])
    assert "DCP directory" in out and "7 object item(s)" in out, out
    harness.run(["verify", "-q", manifest])
    harness.run(["diff", manifest, dcp_dir])
    for ext in [".pt", ".safetensors"]:
        os.makedirs(os.path.join(work, "direct"), exist_ok=True)
        os.makedirs(os.path.join(work, "via"), exist_ok=True)
        direct, via = os.path.join(work, "direct", "out" + ext), os.path.join(work, "via", "out" + ext)
        harness.run(["stitch", "-q", dcp_dir, "-o", direct])
        harness.run(["stitch", "-q", manifest, "-o", via])
        assert open(direct, "rb").read() == open(via, "rb").read(), ext  # the same bytes
    # a manifest that says another layout, or none ckpt-tool knows, is refused
    for name, code in [("torch", harness.EXIT["bad_input"]), ("zarr", harness.EXIT["bad_input"])]:
        doc["files"][1]["format"] = name
        edited = os.path.join(work, f"edited-{name}.json")
        with open(edited, "w") as f:
            json.dump(doc, f)
        _, err = harness.run(["inspect", edited], expect=code)
        assert "files[1].format" in err, err
    # a data file rewritten after the manifest: refused, not read
    with open(os.path.join(dcp_dir, "__0_0.distcp"), "ab") as f:
        f.write(b"\0")
    _, err = harness.run(["stitch", "-q", manifest, "-o", os.path.join(work, "stale.pt")], expect=1)
    assert "changed since the manifest was written" in err, err


if __name__ == "__main__":
    harness.main([test_every_set_equals_torchs_reader, test_an_object_items_tensor_is_read_and_checked,
                  test_a_changed_element_is_a_difference,
                  test_a_missing_data_file_or_overlapping_boxes_are_refused,
                  test_verify_checks_every_chunk_against_its_crc,
                  test_transformed_items_and_ranges_that_start_no_item_are_refused_by_name,
                  test_stitch_writes_safetensors_equal_to_torchs_reader,
                  test_stitch_to_torch_writes_what_dcp_to_torch_save_writes,
                  test_planner_data_that_cannot_nest_is_refused_for_every_output,
                  test_format_dcp_is_read_by_torchs_loader_into_any_world_size,
                  test_format_dcp_renames_its_metadata_last,
                  test_a_plain_torch_file_is_written_as_safetensors_or_dcp,
                  test_a_manifest_of_a_dcp_set_stands_for_it,
                  test_object_items_are_compared_and_data_files_named_anything])
