#!/usr/bin/python3
"""Correctness at OPT-175B's shape, on a smaller grid: 8 model parts x 32 FSDP
shards (256 files) with Adam state, written by `ckpt-tool synth`. At this shape
shards of a part have byte-identical pickles (all but the padded last ones), so
the manifest stores what they share once and the tool decodes each distinct
pickle once (the speed and memory of the 8 x 124 grid are measured by `make
bench`, not here). Checked:

- the version 4 manifest: every file's byte offsets and CRC-32s agree with
  Python's zipfile; shared content is stored once (a few tensor lists for 256
  files);
- stitch of the directory and of its manifest are the same bytes, and equal
  fairscale's consolidation rule (tests/e2e/fairscale_rule.py) of part 0 glued by
  torch for the column- and row-parallel weights;
- reshard 8 x 32 -> 8 x 16 then stitch gives back the same bytes;
- a shard whose pickle is identical to its neighbours' but whose zip differs (a
  storage record cut short, a flipped data byte) is refused by name: reusing a
  decoded pickle never skips a file's own checks."""
import filecmp
import json
import os
import shutil
import struct
import zipfile

import torch

import fairscale_rule
import harness
from harness import ckptcheck

MP, DP = 8, 32


_GRID = []


def grid():
    """The 8 x 32 grid, written by this binary once per run of this script."""
    if not _GRID:
        folder = harness.scratch("grid-8x32")
        harness.run(["synth", "-q", "-o", folder, "--mp", MP, "--dp", DP, "--layers", 6, "--embed-dim", 64,
                     "--ffn-dim", 128, "--vocab", 256, "--optimizer-state"])
        _GRID.append(folder)
    return _GRID[0]


def shard(folder, m, d):
    return os.path.join(folder, f"checkpoint_last-model_part-{m}-shard{d}.pt")


def test_manifest_stores_shared_content_once_and_every_offset_is_right():
    work = harness.scratch("grid-manifest")
    manifest = os.path.join(work, "m.json")
    harness.run(["manifest", grid(), "-o", manifest])
    loaded = json.load(open(manifest))
    assert loaded["version"] == 4 and len(loaded["files"]) == MP * DP
    assert loaded["grid"]["mp"] == MP and loaded["grid"]["dp"] == DP and loaded["grid"]["problems"] == []
    # 256 files, a handful of distinct lists, metadata and trees (the padded last shards differ)
    assert len(loaded["tensor_lists"]) <= 2 * MP, len(loaded["tensor_lists"])
    assert len(loaded["fsdp"]) <= 2 * MP and len(loaded["object_trees"]) <= 2 * MP
    problems, checked = ckptcheck.manifest_problems(manifest, resolve=False)
    assert problems == [], problems[:5]
    assert checked == sum(len(loaded["tensor_lists"][f["tensors"]]) for f in loaded["files"])
    # one shard resolved by torch: its tensors are where the manifest says
    one = os.path.join(work, "one.json")
    harness.run(["manifest", shard(grid(), 3, DP - 1), "-o", one])
    problems, _ = ckptcheck.manifest_problems(one, resolve=True)
    assert problems == [], problems[:5]


def test_stitch_of_directory_and_manifest_agree_with_fairscale():
    work = harness.scratch("grid-stitch")
    manifest = os.path.join(work, "m.json.zst")
    harness.run(["manifest", grid(), "-o", manifest])
    # the same file name: a torch file's records are named after it
    from_dir, from_manifest = os.path.join(work, "a", "s.pt"), os.path.join(work, "b", "s.pt")
    os.makedirs(os.path.dirname(from_dir))
    os.makedirs(os.path.dirname(from_manifest))
    harness.run(["stitch", "-q", grid(), "-o", from_dir])
    harness.run(["stitch", "-q", manifest, "-o", from_manifest])
    assert filecmp.cmp(from_dir, from_manifest, shallow=False)
    # per part, against fairscale's rule on the torch-loaded shards
    parts = os.path.join(work, "parts")
    os.makedirs(parts)
    harness.run(["stitch", "-q", grid(), "--no-stitch-megatron", "-o", os.path.join(parts, "p{m}.pt")])
    for m in (0, MP - 1):
        want = fairscale_rule.consolidate_shard_weights([ckptcheck.load(shard(grid(), m, d)) for d in range(DP)])
        got = ckptcheck.load(os.path.join(parts, f"p{m}.pt"))["model"]
        assert list(got) == list(want), m
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (m, key)


def test_reshard_then_stitch_gives_back_the_same_bytes():
    work = harness.scratch("grid-reshard")
    before = os.path.join(work, "before", "s.pt")
    os.makedirs(os.path.dirname(before))
    harness.run(["stitch", "-q", grid(), "-o", before])
    resharded = os.path.join(work, "r")
    os.makedirs(resharded)
    harness.run(["reshard", "-q", grid(), "--mp", MP, "--dp", DP // 2, "-o",
                 os.path.join(resharded, "checkpoint_last-model_part-{m}-shard{d}.pt")])
    assert len(os.listdir(resharded)) == MP * DP // 2
    after = os.path.join(work, "after", "s.pt")
    os.makedirs(os.path.dirname(after))
    harness.run(["stitch", "-q", resharded, "-o", after])
    assert filecmp.cmp(before, after, shallow=False)


def local_header_data_offset(path, name):
    with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
        info = z.getinfo(name)
        raw.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", raw.read(4))
        return info.header_offset + 30 + name_len + extra_len, info


def test_a_shard_with_a_shared_pickle_is_still_checked_on_its_own():
    work = harness.scratch("grid-trap")
    inputs = os.path.join(work, "in")
    shutil.copytree(grid(), inputs)
    victim = shard(inputs, 0, 5)  # same pickle bytes as shards 0..30 of part 0
    archive = "checkpoint_last-model_part-0-shard5"
    pickles = set()
    for d in (4, 5, 6):
        with zipfile.ZipFile(shard(inputs, 0, d)) as z:
            pickles.add(z.read(f"checkpoint_last-model_part-0-shard{d}/data.pkl"))
    assert len(pickles) == 1, "the trap needs shards with identical pickles"
    record = f"{archive}/data/0"
    start, info = local_header_data_offset(victim, record)
    # a flipped data byte: the manifest indexes it, stitch and verify refuse it by CRC-32
    with open(victim, "r+b") as f:
        f.seek(start + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    out = os.path.join(work, "out")
    os.makedirs(out)
    _, err = harness.run(["stitch", "-q", inputs, "-o", os.path.join(out, "s.pt")], expect=harness.EXIT["corrupt_data"])
    assert victim in err and record in err and "CRC-32" in err, err
    _, err = harness.run(["verify", inputs], expect=1)
    assert victim in _ + err and record in _ + err, _ + err
    assert os.listdir(out) == []
    # a storage record whose size no longer matches the pickle's numel: refused while indexing
    shutil.copy(shard(grid(), 0, 5), victim)
    with zipfile.ZipFile(victim) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    members[record] = members[record][:-2]
    with zipfile.ZipFile(victim, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    _, err = harness.run(["manifest", inputs, "-o", os.path.join(work, "m.json")], expect=1)
    assert victim in err and record in err and "record holds" in err, err
    assert not os.path.exists(os.path.join(work, "m.json"))


if __name__ == "__main__":
    harness.main([test_manifest_stores_shared_content_once_and_every_offset_is_right,
                  test_stitch_of_directory_and_manifest_agree_with_fairscale,
                  test_reshard_then_stitch_gives_back_the_same_bytes,
                  test_a_shard_with_a_shared_pickle_is_still_checked_on_its_own])
