#!/usr/bin/python3
"""Numbers a user can trust (issue 14): `diff` exact for every dtype and by value
across float dtypes, values printed exactly; every expected value is computed
here by torch."""
import collections
import json
import math
import re
import os

import torch

import harness

INT_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def save(work, name, tensors):
    path = os.path.join(work, name)
    torch.save(tensors, path)
    return path


def diff_json(a, b, *flags, expect):
    out, _ = harness.run(["diff", a, b, "--json", *flags], expect=expect)
    return json.loads(out)


def shortest(value, dtype):
    """The fewest significant digits that torch reads back as the same `dtype` value."""
    if math.isnan(value) or math.isinf(value):
        return str(value)  # nan, inf, -inf
    exact = torch.tensor(value, dtype=torch.float64).to(dtype)
    for digits in range(1, 18):
        text = f"{value:.{digits}g}"
        if torch.tensor(float(text), dtype=torch.float64).to(dtype).item() == exact.item():
            return text
    raise AssertionError(value)


def significant_digits(text):
    mantissa = text.lstrip("-").split("e")[0].replace(".", "")
    return len(mantissa.strip("0")) or 1


def assert_reads_back_shortest(text, value, dtype):
    """`text` reads back as `value` in `dtype`, with no more digits than needed."""
    if not math.isfinite(value):
        assert text == str(value), (text, value)
        return
    back = torch.tensor(float(text), dtype=torch.float64).to(dtype).item()
    assert back == value, (text, value, dtype)
    assert significant_digits(text) == significant_digits(shortest(value, dtype)), (text, shortest(value, dtype))


def test_integers_are_exact_at_every_width():
    work = harness.scratch("numbers-ints")
    for dtype in INT_DTYPES:
        info = torch.iinfo(dtype)
        a = torch.tensor([info.max, info.min, 7, 0], dtype=dtype)
        b = a.clone()
        b[0] = info.max - 1
        b[1] = info.max  # the largest difference the width holds
        pa = save(work, f"a_{dtype}.pt", {"t": a})
        pb = save(work, f"b_{dtype}.pt", {"t": b})
        for tolerance in ([], ["--atol", "1e30"], ["--rtol", "10"]):
            report = diff_json(pa, pb, *tolerance, expect=1)
            (d,) = report["differing"]
            assert d["count"] == 2, (dtype, tolerance, d)
            assert [p["index"] for p in d["positions"]] == [[0], [1]]
            assert [p["a"] for p in d["positions"]] == [a[0].item(), a[1].item()], (dtype, d)
            assert [p["b"] for p in d["positions"]] == [b[0].item(), b[1].item()], (dtype, d)
            assert d["max_abs"] == int(info.max) - int(info.min), (dtype, d)
        out, _ = harness.run(["diff", pa, pb], expect=1)
        assert f"t (0,): {a[0].item()} != {b[0].item()}" in out, out
        harness.run(["diff", pa, pa, "--atol", "5"])
    # The example: 2**60 and 2**60 + 100, one double apart from nothing.
    pa = save(work, "big_a.pt", {"t": torch.tensor([2 ** 60, 5])})
    pb = save(work, "big_b.pt", {"t": torch.tensor([2 ** 60 + 100, 5])})
    out, _ = harness.run(["diff", pa, pb, "--atol", "0.5"], expect=1)
    assert "t (0,): 1152921504606846976 != 1152921504606847076" in out and "max abs 100," in out, out
    bools_a = save(work, "bool_a.pt", {"m": torch.tensor([True, False, True])})
    bools_b = save(work, "bool_b.pt", {"m": torch.tensor([True, True, True])})
    report = diff_json(bools_a, bools_b, "--atol", "1", expect=1)
    assert report["differing"][0]["positions"] == [{"index": [1], "a": False, "b": True}]
    out, _ = harness.run(["diff", bools_a, bools_b], expect=1)
    assert "m (1,): False != True" in out, out


def test_complex_compares_by_modulus_and_prints_as_complex():
    work = harness.scratch("numbers-complex")
    for dtype in (torch.complex64, torch.complex128):
        a = torch.tensor([1 + 2j, 3 - 4j, 0.1 + 0.2j, 5j], dtype=dtype)
        b = a.clone()
        b[1] = 3 - 4.5j
        b[3] = 0.5 + 5j
        pa, pb = save(work, f"a_{dtype}.pt", {"c": a}), save(work, f"b_{dtype}.pt", {"c": b})
        report = diff_json(pa, pb, expect=1)
        (d,) = report["differing"]
        assert d["count"] == 2 and [p["index"] for p in d["positions"]] == [[1], [3]]
        assert d["positions"][0]["b"] == {"real": 3.0, "imag": -4.5}
        assert d["max_abs"] == (a - b).abs().max().item()
        out, _ = harness.run(["diff", pa, pb], expect=1)
        assert "c (1,): (3-4j) != (3-4.5j)" in out and "c (3,): 5j" not in out, out
        assert "c (3,): (0+5j) != (0.5+5j)" in out, out
        # The tolerance applies to |a - b| (0.5 for both), against atol + rtol |b|.
        harness.run(["diff", pa, pb, "--atol", "0.5"])
        report = diff_json(pa, pb, "--atol", "0.49", expect=1)
        assert report["differing"][0]["count"] == 2
        expected = int((~torch.isclose(a, b, rtol=0.1, atol=0)).sum())
        report = diff_json(pa, pb, "--rtol", "0.1", expect=1 if expected else 0)
        assert sum(d["count"] for d in report["differing"]) == expected


def test_floats_print_the_shortest_digits_of_their_dtype():
    work = harness.scratch("numbers-floats")
    values = [0.1, 1 / 3, 65504.0, 6e-8, -2.5e-3, 1e10, 3.14159]
    for dtype in FLOAT_DTYPES:
        a = torch.tensor(values, dtype=torch.float64).to(dtype)
        # The next value of `dtype` (65504 + one step is inf in float16).
        same_size_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        b = (a.view(same_size_int) + 1).view(dtype)
        pa, pb = save(work, f"a_{dtype}.pt", {"f": a}), save(work, f"b_{dtype}.pt", {"f": b})
        out, _ = harness.run(["diff", pa, pb], expect=1)
        printed = re.findall(r"^  f \((\d+),\): (\S+) != (\S+)$", out, re.MULTILINE)
        assert [int(i) for i, _, _ in printed] == [i for i in range(len(values)) if a[i] != b[i]], out
        for i, x, y in printed:
            assert x != y, (dtype, i, x, y)
            assert_reads_back_shortest(x, a[int(i)].item(), dtype)
            assert_reads_back_shortest(y, b[int(i)].item(), dtype)
        report = diff_json(pa, pb, expect=1)
        for p in report["differing"][0]["positions"]:
            x, y = a[p["index"][0]].item(), b[p["index"][0]].item()
            assert (p["a"], p["b"]) == tuple(v if math.isfinite(v) else str(v) for v in (x, y)), p
    special_a = save(work, "special_a.pt", {"f": torch.tensor([float("nan"), float("-inf"), 1.0])})
    special_b = save(work, "special_b.pt", {"f": torch.tensor([float("nan"), float("inf"), float("nan")])})
    report = diff_json(special_a, special_b, "--atol", "1", expect=1)
    (d,) = report["differing"]
    assert [(p["index"], p["a"], p["b"]) for p in d["positions"]] == [([1], "-inf", "inf"), ([2], 1.0, "nan")]


def test_float_dtypes_compare_by_value_with_a_tolerance():
    work = harness.scratch("numbers-cross")
    g = torch.Generator().manual_seed(14)
    w = torch.randn(300, 70, generator=g)
    tensors = {"w": w, "b": torch.randn(70, generator=g).double(), "h": torch.randn(33, generator=g).half(),
               "steps": torch.arange(5)}
    pa = save(work, "fp.pt", tensors)
    for target in (torch.bfloat16, torch.float16):
        converted = {k: (v.to(target) if v.is_floating_point() else v) for k, v in tensors.items()}
        pb = save(work, f"to_{target}.pt", converted)
        # Without a tolerance a dtype difference stays a difference.
        report = diff_json(pa, pb, expect=1)
        mismatched = sorted(d["name"] for d in report["differing"] if d["mismatch"].startswith("dtype"))
        assert mismatched == sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dtype != target)
        for atol, rtol in ((1e-2, 1e-2), (0.0, 1e-3), (1e-3, 0.0)):
            expected = {}
            for k, v in tensors.items():
                if not v.is_floating_point():
                    continue
                x, y = v.double(), converted[k].double()
                expected[k] = int(((x - y).abs() > atol + rtol * y.abs()).sum())
            report = diff_json(pa, pb, "--atol", str(atol), "--rtol", str(rtol),
                               expect=1 if any(expected.values()) else 0)
            counts = {d["name"]: d["count"] for d in report["differing"]}
            assert counts == {k: n for k, n in expected.items() if n}, (target, atol, rtol, counts, expected)
            noted = {d["name"] for d in report["differing"] if d["note"]} | {n["name"] for n in report["notes"]}
            assert noted == {k for k, v in tensors.items() if v.is_floating_point() and v.dtype != target}
            assert all(not d["mismatch"] for d in report["differing"])
        out, _ = harness.run(["diff", pa, pb, "--atol", "1e-2", "--rtol", "1e-2"])
        assert "note: w: dtype float32 != " in out and out.splitlines()[-1].startswith("equal:"), out
    # The case: an fp32 checkpoint against its `stitch --dtype bf16` copy.
    folder = harness.fixtures()["mp2_dp3_fp32_ns_args"]
    fp32 = os.path.join(folder, "expected", "consolidated.pt")
    bf16 = os.path.join(work, "stitched-bf16.pt")
    harness.run(["stitch", folder, "--dtype", "bf16", "-o", bf16])
    model_a, model_b = torch.load(fp32)["model"], torch.load(bf16)["model"]
    beyond = sum(int(((a.double() - model_b[k].double()).abs() > 1e-2 + 1e-2 * model_b[k].double().abs()).sum())
                 for k, a in model_a.items() if a.is_floating_point())
    floats = {k for k, a in model_a.items() if a.is_floating_point() and k != "decoder.version"}
    report = diff_json(fp32, bf16, "--atol", "1e-2", "--rtol", "1e-2", expect=1 if beyond else 0)
    assert sum(d["count"] for d in report["differing"]) == beyond
    assert {n["name"] for n in report["notes"]} | {d["name"] for d in report["differing"]} >= \
        {"model/" + k for k in floats}, report["notes"]
    assert not diff_json(fp32, bf16, expect=1)["equal"]
    # Integers against integers of another width, floats against integers: still a mismatch.
    pc = save(work, "int32.pt", {**tensors, "steps": torch.arange(5, dtype=torch.int32)})
    report = diff_json(pa, pc, "--atol", "1", expect=1)
    assert [d["mismatch"] for d in report["differing"]] == ["dtype int64 != int32"]


def test_paths_are_unambiguous():
    work = harness.scratch("numbers-paths")
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    tensors = {"a/b": t(1), "a": {"b": t(2)}, "x~y": t(3), 3: t(4), "3": t(5), "s~1": t(6)}
    path = save(work, "paths.pt", tensors)
    listed = json.loads(harness.run(["inspect", path, "--tensors", "--json"])[0])["tensors"]
    names = [entry["path"] for entry in listed]
    assert names == ["a~1b", "a/b", "x~0y", "3~~int", "3", "s~01"], names
    # --filter matches the escaped path; the manifest holds the same paths.
    listed = json.loads(harness.run(["inspect", path, "--tensors", "--json", "--filter", "^a~1b$"])[0])["tensors"]
    assert [entry["path"] for entry in listed] == ["a~1b"]
    manifest = os.path.join(work, "m.json")
    harness.run(["manifest", path, "-o", manifest])
    assert [t["path"] for t in json.load(open(manifest))["tensor_lists"][0]] == names
    # diff pairs 'a/b' with 'a/b' and 'b' in 'a' with 'b' in 'a'.
    changed = dict(tensors, a={"b": t(20)})
    other = save(work, "changed.pt", changed)
    report = diff_json(path, other, expect=1)
    assert [(d["name"], d["positions"][0]["b"]) for d in report["differing"]] == [("a/b", 20.0)], report
    report = diff_json(path, save(work, "changed2.pt", dict(tensors, **{"a/b": t(10)})), expect=1)
    assert [d["name"] for d in report["differing"]] == ["a~1b"], report
    # Object trees keep the file's order (an OrderedDict z, a stays z, a) and show keys as they are.
    ordered = save(work, "ordered.pt", {"t10": t(0), "t2": t(1), "t1": t(2),
                                        "od": collections.OrderedDict([("z", 1), ("a", 2)]), "3": 1, 3: 2})
    objects = json.loads(harness.run(["inspect", ordered, "--json"])[0])["objects"]
    assert list(objects) == ["t10", "t2", "t1", "od", "3", "3~~int"], list(objects)
    assert list(objects["od"]) == ["z", "a"]
    manifest = os.path.join(work, "ordered.json")
    harness.run(["manifest", ordered, "-o", manifest])
    assert list(json.load(open(manifest))["object_trees"][0]) == ["t10", "t2", "t1", "od", "3", "3~~int"]
    text = harness.run(["inspect", ordered])[0]
    assert text.index("  t10:") < text.index("  t2:") < text.index("  t1:") and text.index("    z: 1") < text.index("    a: 2")


def test_state_dict_keys_with_a_slash_are_written_as_they_are():
    work = harness.scratch("numbers-keys")
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    part = save(work, "part.pt", {"model": {"a/b": t(1), "c~d": t(2), "e": t(3)}})
    out = os.path.join(work, "out.pt")
    harness.run(["stitch", part, "-o", out])
    model = torch.load(out)["model"]
    assert list(model) == ["a/b", "c~d", "e"] and model["a/b"].item() == 1.0
    harness.run(["diff", part, out])
    nested = save(work, "nested.pt", {"model": {"w": t(1), "a": {"b": t(2)}}})
    _, err = harness.run(["stitch", nested, "-o", os.path.join(work, "nested-out.pt")], expect=1)
    assert "model/a/b" in err and "inside the 'model' state dict" in err, err
    assert not os.path.exists(os.path.join(work, "nested-out.pt"))


def test_inspect_counts_a_plain_state_dict_as_torch_does():
    work = harness.scratch("numbers-plain")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.fc = torch.nn.Linear(16, 33)
            self.norm = torch.nn.LayerNorm(33)
            self.head = torch.nn.Linear(33, 50, bias=False)
            self.register_buffer("steps", torch.zeros(4, dtype=torch.long))

    net = Net()
    path = save(work, "plain.pt", net.state_dict())
    summary = json.loads(harness.run(["inspect", path, "--json"])[0])
    assert summary["parameters"] == sum(p.numel() for p in net.parameters())
    assert summary["buffers"] == sum(b.numel() for b in net.buffers())
    # Tensors that share one storage: the storage once, and each tensor's numel x size.
    base = torch.arange(27, dtype=torch.float32)
    views = {"a": base[:9].view(3, 3), "b": base[9:], "c": base.view(3, 9).t(), "d": base}
    path = save(work, "views.pt", views)
    summary = json.loads(harness.run(["inspect", path, "--json"])[0])
    expected = {"tensors": 4, "storage_bytes": base.storage().size() * base.element_size(),
                "tensor_bytes": sum(v.numel() * v.element_size() for v in views.values())}
    assert summary["bytes_by_dtype"]["float32"] == expected, summary["bytes_by_dtype"]
    text = harness.run(["inspect", path])[0]
    assert "108 B of storage, 324 B of tensors" in text, text
    out, _ = harness.run(["diff", path, path])
    assert "(324 B tensor bytes in A)" in out, out


def test_found_by_the_black_box_review():
    """Each case a stranger found wrong (exit 0 with a wrong answer); expected values from torch."""
    work = harness.scratch("numbers-review")
    inf, nan = float("inf"), float("nan")
    # A finite value is not within any tolerance of an infinity (torch.isclose agrees).
    a = torch.tensor([1.0, 70000.0, 3.0, inf])
    pa, pb = save(work, "ov32.pt", {"t": a}), save(work, "ov16.pt", {"t": a.half()})
    expected = int((~torch.isclose(a.double(), a.half().double(), rtol=1e-2, atol=1e-2)).sum())
    report = diff_json(pa, pb, "--atol", "1e-2", "--rtol", "1e-2", expect=1)
    assert expected == 1 and report["differing"][0]["count"] == 1, report
    assert report["differing"][0]["positions"][0]["b"] == "inf" and report["differing"][0]["max_rel"] == "inf"
    pc = save(work, "c_inf.pt", {"c": torch.tensor([1 + 1j, 2j])})
    pd = save(work, "c_inf2.pt", {"c": torch.tensor([complex(inf, 1), 2j])})
    assert diff_json(pc, pd, "--rtol", "1e-3", expect=1)["differing"][0]["count"] == 1
    # --atol 0 asks for a comparison by value: -0.0 == 0.0, NaN == NaN, across float dtypes.
    pz, pn = save(work, "z.pt", {"t": torch.tensor([0.0, nan])}), save(work, "nz.pt", {"t": torch.tensor([-0.0, nan])})
    harness.run(["diff", pz, pn, "--atol", "0"])
    harness.run(["diff", pz, pn], expect=1)
    harness.run(["diff", pz, save(work, "z64.pt", {"t": torch.tensor([0.0, nan], dtype=torch.float64)}), "--rtol", "0"])
    # NaN against a number under a tolerance: the largest difference is NaN, not 0.
    report = diff_json(pz, save(work, "one.pt", {"t": torch.tensor([0.0, 1.0])}), "--atol", "1", expect=1)
    assert report["differing"][0]["max_abs"] == "nan", report
    # Keys longer than 256 bytes, the empty key and '?' pair with themselves across files.
    long_key = "k" * 300
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    left = save(work, "long_a.pt", {"model": {long_key + "A": t(1), long_key + "B": t(2), "": t(3), "?": t(4)}})
    right = save(work, "long_b.pt", {"model": {long_key + "B": t(1), long_key + "A": t(2), "?": t(3), "": t(4)}})
    report = diff_json(left, right, expect=1)
    assert sorted(d["name"] for d in report["differing"]) == sorted(
        ["model/" + long_key + "A", "model/" + long_key + "B", "model/~~empty", "model/?"]), report
    # A path past 1024 bytes has no name: refused, not cut to another tensor's name.
    deep = {"x": t(1)}
    for _ in range(300):
        deep = {"level": deep}
    _, err = harness.run(["inspect", save(work, "deep.pt", deep), "--tensors"], expect=1)
    assert "longer than 1024 bytes" in err, err
    # stitch writes keys as they are, or refuses: never a renamed or lost tensor.
    out = os.path.join(work, "out.pt")
    harness.run(["stitch", save(work, "empty_key.pt", {"model": {"": t(1), long_key: t(2)}}), "-o", out])
    assert {k: v.item() for k, v in torch.load(out)["model"].items()} == {"": 1.0, long_key: 2.0}
    for bad in ({"3": t(1), 3: t(2)}, {"3": t(1), 3: t(2), "3~~2": t(3)}, {(1, 2): t(1)}):
        target = os.path.join(work, "bad-out.pt")
        _, err = harness.run(["stitch", save(work, "bad.pt", {"model": bad}), "-o", target], expect=1)
        assert "not a str, or that prints like another key" in err and not os.path.exists(target), err
    # Object trees keep every entry when keys print alike, and diff pairs them by key, not by order.
    tree = save(work, "alike.pt", {"cfg": {"3~~int": 1, "3": 2, 3: 3}})
    objects = json.loads(harness.run(["inspect", tree, "--json"])[0])["objects"]
    assert sorted(objects["cfg"].values()) == [1, 2, 3], objects
    harness.run(["diff", tree, save(work, "alike2.pt", {"cfg": {"3~~int": 9, "3": 2, 3: 3}})], expect=1)
    left = save(work, "order_a.pt", {3: t(1), "3": t(2)})
    harness.run(["diff", left, save(work, "order_b.pt", {"3": t(1), 3: t(2)})], expect=1)
    harness.run(["diff", left, save(work, "order_c.pt", {"3": t(2), 3: t(1)})])
    # Keys that are neither str nor int are named by their repr, so two files pair them by value.
    report = diff_json(save(work, "tuple_a.pt", {(1, 2): t(1), 1.5: t(2), True: t(3)}),
                       save(work, "tuple_b.pt", {(3, 4): t(1), 2.5: t(2), None: t(3)}), expect=1)
    assert (sorted(report["only_in_a"]), sorted(report["only_in_b"])) == \
        (["~~(1, 2)", "~~1.5", "~~True"], ["~~(3, 4)", "~~2.5", "~~None"]), report
    # A value that is not a tensor in a state dict is refused by stitch, not dropped.
    mixed_out = os.path.join(work, "mixed-out.pt")
    _, err = harness.run(["stitch", save(work, "mixed.pt", {"model": {"a": t(1), "b": 5}}), "-o", mixed_out],
                         expect=1)
    assert "model/b" in err and "not a tensor" in err and not os.path.exists(mixed_out), err


def test_a_tie_in_model_state_dict_counts_once():
    work = harness.scratch("numbers-tie")

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 16)
            self.out = torch.nn.Linear(16, 100, bias=False)
            self.out.weight = self.embed.weight
            self.register_buffer("steps", torch.zeros(2, dtype=torch.long))

    net = Tied()
    path = save(work, "tied.pt", net.state_dict())  # two tensor objects, one storage, one view
    summary = json.loads(harness.run(["inspect", path, "--json"])[0])
    assert summary["parameters"] == sum(p.numel() for p in net.parameters()) == 1600, summary
    assert summary["bytes_by_dtype"]["float32"]["tensor_bytes"] == 1600 * 4


if __name__ == "__main__":
    harness.main([test_integers_are_exact_at_every_width, test_complex_compares_by_modulus_and_prints_as_complex,
                  test_floats_print_the_shortest_digits_of_their_dtype,
                  test_float_dtypes_compare_by_value_with_a_tolerance, test_paths_are_unambiguous,
                  test_state_dict_keys_with_a_slash_are_written_as_they_are,
                  test_inspect_counts_a_plain_state_dict_as_torch_does, test_found_by_the_black_box_review,
                  test_a_tie_in_model_state_dict_counts_once])
