#!/usr/bin/python3
"""Decode every fixture file and write it back through the plan and executor:
torch.load must read the copy to equal objects and zipfile.testzip must pass.
Besides the generator's files, variants that torch 1.13 does not write by
default: pickle protocol 4 (STACK_GLOBAL, MEMOIZE, FRAME), views sharing one
storage, another archive name, and torch 2.x's extra records."""
import glob
import io
import os
import subprocess
import zipfile
from collections import OrderedDict

import torch

import harness
from harness import ckptcheck


def check_roundtrip(src, out, threads=None):
    args = [harness.ROUNDTRIP, src, out] + ([str(threads)] if threads else [])
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, f"{src}: {proc.stderr}"
    problems = ckptcheck.zip_problems(out, aligned=True)
    assert not problems, f"{out}: {problems}"
    ckptcheck.assert_same(ckptcheck.load(src), ckptcheck.load(out))


def test_every_fixture_file():
    count = 0
    for name, folder in harness.fixtures().items():
        out_dir = harness.scratch("roundtrip-" + name)
        for src in sorted(glob.glob(os.path.join(folder, "*.pt")) + glob.glob(os.path.join(folder, "expected", "*.pt"))):
            check_roundtrip(src, os.path.join(out_dir, os.path.basename(src)))
            count += 1
    assert count >= 40, f"only {count} fixture files found"


def test_thread_count_does_not_change_bytes():
    # Large enough for many 8 MiB units, so threads really interleave.
    src = os.path.join(harness.scratch("threads-src"), "big.pt")
    generator = torch.Generator().manual_seed(7)
    torch.save({"a": torch.randn(5_000_000, generator=generator), "b": torch.randn(3_000_001, generator=generator).half(),
                "c": torch.randn(7, generator=generator)}, src)
    one = os.path.join(harness.scratch("threads-1"), "copy.pt")
    eight = os.path.join(harness.scratch("threads-8"), "copy.pt")
    check_roundtrip(src, one, threads=1)
    check_roundtrip(src, eight, threads=8)
    a = open(one, "rb").read()
    b = open(eight, "rb").read()
    assert a == b, "1 and 8 threads wrote different bytes"


def variant_objects():
    base = torch.arange(24, dtype=torch.float32)
    sd = OrderedDict(weight=base.view(4, 6), row=base[6:12], strided=base.view(4, 6)[:, 1::2],
                     half=torch.randn(3, 5).half(), bf16=torch.randn(7).bfloat16(),
                     ints=torch.arange(5, dtype=torch.int64), flags=torch.tensor([True, False]),
                     empty=torch.zeros(0, 3), scalar=torch.tensor(2.5))
    sd._metadata = OrderedDict({"": {"version": 1}})
    return {"model": sd, "param": torch.nn.Parameter(torch.randn(2, 2)), "big": 2 ** 70, "neg": -(2 ** 40),
            "set": {1, 2, 3}, "frozen": frozenset({"a"}), "bytes": b"\x00\xffraw", "nested": [[[]]], "float": 1e300}


def test_pickle_protocol_4():
    out = harness.scratch("proto4")
    src = os.path.join(out, "proto4.pt")
    torch.save(variant_objects(), src, pickle_protocol=4)
    check_roundtrip(src, os.path.join(out, "copy.pt"))


def test_protocol_2_views_and_shared_storage():
    out = harness.scratch("views")
    src = os.path.join(out, "views.pt")
    torch.save(variant_objects(), src)
    check_roundtrip(src, os.path.join(out, "copy.pt"))
    loaded = torch.load(os.path.join(out, "copy.pt"))
    model = loaded["model"]
    # the views still share one storage after the copy
    assert model["row"].storage().data_ptr() == model["weight"].storage().data_ptr()


def rewrite_zip(src, dst, rename=None, extra=(), reverse_storages=False):
    """Copies a torch zip with another archive name and/or extra records, keeping
    STORED entries 64-byte aligned the way torch does."""
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        if reverse_storages:
            infos = [infos[0]] + list(reversed(infos[1:-1])) + [infos[-1]]
        entries = [(i.filename, zin.read(i.filename)) for i in infos]
    prefix = entries[0][0].split("/")[0]
    name = rename or prefix
    entries = [(name + n[len(prefix):], d) for n, d in entries] + [(f"{name}/{n}", d) for n, d in extra]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zout:
        for entry_name, data in entries:
            info = zipfile.ZipInfo(entry_name, date_time=(1980, 1, 1, 0, 0, 0))
            header_len = 30 + len(entry_name.encode())
            pad = (64 - (buf.tell() + header_len + 4) % 64) % 64
            info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
            zout.writestr(info, data)
    with open(dst, "wb") as f:
        f.write(buf.getvalue())


def test_torch2_style_records_and_archive_name():
    out = harness.scratch("torch2")
    src = os.path.join(out, "plain.pt")
    torch.save(variant_objects(), src)
    variant = os.path.join(out, "variant.pt")
    rewrite_zip(src, variant, rename="some_other_name",
                extra=[("byteorder", b"little"), (".data/serialization_id", b"1234567890"),
                       (".format_version", b"1"), (".storage_alignment", b"64")],
                reverse_storages=True)
    ckptcheck.assert_same(torch.load(src), torch.load(variant))
    check_roundtrip(variant, os.path.join(out, "copy.pt"))


if __name__ == "__main__":
    harness.main([test_every_fixture_file, test_thread_count_does_not_change_bytes, test_pickle_protocol_4,
                  test_protocol_2_views_and_shared_storage, test_torch2_style_records_and_archive_name])
