#!/usr/bin/python3
"""`ckpt-tool manifest` and `inspect` on every fixture case: byte offsets and CRCs
agree with Python's zipfile and torch.load, the decoded layout matches what the
generator wrote, .zst manifests read like plain ones, and a stale manifest is
refused."""
import json
import os
import time

import harness
from harness import ckptcheck


def test_offsets_agree_with_zipfile_for_every_case():
    checked = 0
    for name, folder in harness.fixtures().items():
        out = os.path.join(harness.scratch("manifest-" + name), "manifest.json")
        harness.run(["manifest", folder, os.path.join(folder, "expected"), "-o", out])
        problems, count = ckptcheck.manifest_problems(out)
        assert not problems, f"{name}: {problems[:5]}"
        checked += count
    assert checked > 500, f"only {checked} tensors checked"


def test_layout_matches_the_generator():
    for name, folder in harness.fixtures().items():
        case = json.load(open(os.path.join(folder, "case.json")))
        stdout, _ = harness.run(["manifest", folder])
        manifest = json.loads(stdout)
        assert manifest["format"] == "ckpt-tool-manifest" and manifest["version"] == 4
        assert manifest["grid"]["mp"] == case["mp"] and manifest["grid"]["dp"] == case["dp"], name
        assert manifest["grid"]["problems"] == [], f"{name}: {manifest['grid']['problems']}"
        for entry in ckptcheck.manifest_files(manifest):
            assert entry["mp_part"] == (None if "model_part" not in entry["path"] else entry["mp_part"])
            shard = ckptcheck.load(entry["path"])
            meta = shard["shard_metadata"]
            fsdp = entry["fsdp"]
            assert fsdp["buffer_names"] == list(meta["buffer_names"])
            assert [i["fsdp_path"] for i in fsdp["param_metadata"]] == [m["fsdp_path"] for m in meta["param_metadata"]]
            for got, want in zip(fsdp["param_metadata"], meta["param_metadata"]):
                flat = got["flat_params"][0]
                ref = want["params"]["flat_param_0"]
                assert flat["names"] == list(ref["names"]) and flat["numels"] == list(ref["numels"])
                assert flat["shapes"] == [list(s) for s in ref["shapes"]]
                assert flat["padding"] == ref["padding"], f"{entry['path']}: padding"
                key = (want["fsdp_path"] + "." if want["fsdp_path"] else "") + "flat_param_0"
                assert flat["state_key"] == key and key in shard["model"]
            tensor_paths = {t["path"] for t in entry["tensors"]}
            assert {"model/" + k for k in shard["model"]} <= tensor_paths
            if case["has_optimizer_state"]:
                assert "last_optimizer_state/state/0/exp_avg" in tensor_paths


def test_zstd_manifest_and_inspect():
    folder = harness.fixtures()["mp4_dp2_bf16_omega_opt"]
    out = harness.scratch("zst")
    plain = os.path.join(out, "m.json")
    packed = os.path.join(out, "m.json.zst")
    harness.run(["manifest", folder, "-o", plain])
    harness.run(["manifest", folder, "-o", packed])
    assert os.path.getsize(packed) < os.path.getsize(plain) / 3
    from_plain, _ = harness.run(["inspect", plain, "--json"])
    from_packed, _ = harness.run(["inspect", packed, "--json"])
    from_files, _ = harness.run(["inspect", folder, "--json"])
    assert from_plain == from_packed == from_files
    summary = json.loads(from_plain)
    assert summary["grid"]["mp"] == 4 and summary["grid"]["dp"] == 2 and summary["fsdp"]
    assert set(summary["bytes_by_section"]) == {"model", "optimizer_state"}
    assert summary["bytes_by_dtype"]["bfloat16"]["tensors"] == 8 * 3  # root + 2 layers on each of 8 files
    text, _ = harness.run(["inspect", packed])
    assert "4 model-parallel part(s) x 2 data-parallel shard(s)" in text
    assert "model_parallel_size: 4" in text and "problems: none found" in text


def test_parameter_count_matches_the_model():
    """The count torch gives for the stitched model (parameters; buffers apart), the
    same from the raw shards, from their manifest and from the stitched file."""
    for name, folder in harness.fixtures().items():
        consolidated = os.path.join(folder, "expected", "consolidated.pt")
        model = ckptcheck.load(consolidated)["model"]
        seen, parameters, buffers = set(), 0, 0
        for key, t in model.items():
            if t.data_ptr() in seen:
                continue  # a tie (output_projection is embed_tokens)
            seen.add(t.data_ptr())
            if key.endswith(".version") or key.endswith("._float_tensor") or not t.is_floating_point():
                buffers += t.numel()
            else:
                parameters += t.numel()
        for source in (folder, consolidated):
            summary = json.loads(harness.run(["inspect", source, "--json"])[0])
            assert (summary["parameters"], summary["buffers"]) == (parameters, buffers), (name, source, summary)
        text = harness.run(["inspect", folder])[0]
        assert f"parameters: {parameters:,} (from " in text, text


def test_tensor_table_and_filter():
    folder = harness.fixtures()["mp1_dp3_bf16_ns_opt"]
    stdout, _ = harness.run(["inspect", folder, "--tensors", "--filter", r"exp_avg_sq$", "--json"])
    tensors = json.loads(stdout)["tensors"]
    assert tensors and all(t["path"].endswith("exp_avg_sq") for t in tensors)
    assert len(tensors) == 3 * 3  # 3 flat params on each of 3 shards
    text, _ = harness.run(["inspect", folder, "--tensors", "--filter", "flat_param"])
    table = [line.split()[0] for line in text.splitlines() if line.startswith(("model/", "last_optimizer_state/"))]
    assert "model/decoder.layers.0.flat_param_0" in table
    assert len(table) == 3 * 3 and all("flat_param" in path for path in table), table


def test_stale_manifest_is_refused():
    folder = harness.fixtures()["mp1_dp1_fp32_ns"]
    out = harness.scratch("stale")
    copy = os.path.join(out, "checkpoint_last-shard0.pt")
    with open(os.path.join(folder, "checkpoint_last-shard0.pt"), "rb") as f, open(copy, "wb") as g:
        g.write(f.read())
    manifest = os.path.join(out, "m.json")
    harness.run(["manifest", copy, "-o", manifest])
    harness.run(["inspect", manifest])
    later = time.time() + 5
    os.utime(copy, (later, later))
    _, stderr = harness.run(["inspect", manifest], expect=1)
    assert "checkpoint_last-shard0.pt" in stderr and "changed since the manifest" in stderr


def test_big_ints_are_shown_as_their_decimal_value():
    import pickle
    import random

    import torch
    rng = random.Random(13)
    values = [2 ** 63, -2 ** 63 - 1, 2 ** 64, -(2 ** 64), 2 ** 100, -(2 ** 70) - 3, 255 << 64, -(256 ** 20)]
    values += [rng.randrange(-2 ** 4000, 2 ** 4000) for _ in range(8)] + [2 ** 8000]
    path = os.path.join(harness.scratch("bigint"), "big.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "values": values, "huge": 2 ** 9000}, path)
    stdout, _ = harness.run(["inspect", "--json", path])
    objects = json.loads(stdout)["objects"]
    assert objects["values"] == [{"$bigint": str(v)} for v in values], objects["values"][:3]
    # past 1024 bytes (2**9000 pickles as 1126, as LONG4): the length only
    assert objects["huge"] == {"$bigint_bytes": len(pickle.encode_long(2 ** 9000))}, objects["huge"]


def test_missing_shard_is_a_problem():
    folder = harness.fixtures()["mp2_dp3_fp32_ns_args"]
    files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".pt") and "part-1-shard2" not in f]
    stdout, _ = harness.run(["inspect", "--json"] + files)
    problems = json.loads(stdout)["problems"]
    assert problems == ["shard 2 of 3 missing for model part 1"], problems


if __name__ == "__main__":
    harness.main([test_offsets_agree_with_zipfile_for_every_case, test_layout_matches_the_generator,
                  test_big_ints_are_shown_as_their_decimal_value,
                  test_zstd_manifest_and_inspect, test_parameter_count_matches_the_model,
                  test_tensor_table_and_filter, test_stale_manifest_is_refused, test_missing_shard_is_a_problem])
