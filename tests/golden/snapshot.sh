#!/usr/bin/env bash
# Every output ckpt-tool writes for the fixture cases, into one folder, so that two
# builds can be compared byte for byte (a refactoring must not change one byte):
#
#   tests/golden/snapshot.sh OLD/ckpt-tool FIXTURES /tmp/before
#   tests/golden/snapshot.sh NEW/ckpt-tool FIXTURES /tmp/after
#   diff -r /tmp/before /tmp/after && echo identical   # cmp of every file
#
# FIXTURES is a folder written by `fixtures/generate.py --out FIXTURES` (all cases),
# shared by both runs: manifests hold the inputs' absolute paths and mtimes.
# Outputs: manifests (JSON), stitch (glued, per part, fused qkv, fp32, EMA where
# present), reshard to several grids, --unflatten, synth, and the text of
# inspect --json, verify, diff and every --dry-run plan.
set -uo pipefail
if [ $# -ne 3 ]; then echo "usage: $0 CKPT_TOOL FIXTURES OUT" >&2; exit 2; fi
tool=$(realpath "$1"); fixtures=$(realpath "$2"); out=$3
rm -rf "$out" && mkdir -p "$out" && out=$(realpath "$out")

# Runs the tool, keeping stdout, and the exit code in the transcript.
run() {
  local name=$1; shift
  "$tool" "$@" >"$out/$name.stdout" 2>"$out/$name.stderr"
  echo "$name: exit $?" >>"$out/transcript"
}

for dir in "$fixtures"/*/; do
  case=$(basename "$dir")
  o=$out/$case && mkdir -p "$o"/{mp1-dp1,mp1-dp2,mp2-dp1,mp2-dp3,mp4-dp2,unflat,noopt}
  run "$case/manifest" manifest "$dir" -o "$o/manifest.json"
  run "$case/inspect" inspect --json "$dir"
  run "$case/verify" verify -q "$dir"
  run "$case/stitch" stitch -q "$dir" -o "$o/consolidated.pt"
  run "$case/stitch-parts" stitch -q --no-stitch-megatron "$dir" -o "$o/part-{m}.pt"
  run "$case/stitch-fused" stitch -q --fused-qkv "$dir" -o "$o/fused.pt"
  run "$case/stitch-fp32" stitch -q --dtype fp32 "$dir" -o "$o/fp32.pt"
  run "$case/stitch-ema" stitch -q --ema "$dir" -o "$o/ema.pt"
  run "$case/stitch-plan" stitch --dry-run "$dir" -o "$o/unused.pt"
  for grid in "1 1" "1 2" "2 1" "2 3" "4 2"; do
    set -- $grid
    run "$case/reshard-mp$1-dp$2" reshard -q "$dir" --mp "$1" --dp "$2" -o "$o/mp$1-dp$2/checkpoint-model_part-{m}-shard{d}.pt"
  done
  run "$case/reshard-plan" reshard --dry-run "$dir" --mp 2 --dp 2 -o "$o/unused-{m}-{d}.pt"
  run "$case/reshard-unflatten" reshard -q --unflatten "$dir" --mp 1 --dp 1 -o "$o/unflat/checkpoint-model_part-{m}-shard{d}.pt"
  run "$case/reshard-noopt" reshard -q --drop-optimizer-state "$dir" --mp 1 --dp 2 -o "$o/noopt/checkpoint-model_part-{m}-shard{d}.pt"
  run "$case/diff-self" diff "$dir" "$o/consolidated.pt"
  run "$case/diff-resharded" diff --json "$dir" "$o/mp2-dp3"
done

for spec in "1 1 fp16" "2 3 bf16" "4 2 fp32"; do
  set -- $spec
  run "synth-mp$1-dp$2" synth -q --params 2e5 --mp "$1" --dp "$2" --dtype "$3" --optimizer-state \
    -o "$out/synth-mp$1-dp$2"
done

# The manifests name the output folder's own files nowhere, but the dry-run plans
# print output paths, and errors name them: both runs write under different roots, so make them relative.
sed -i "s#$out/##g" "$out"/*/*.std* "$out"/*.std*
# Timings are the one thing that differs between two runs of the same build.
sed -i -E 's/"seconds": [0-9.e+-]+/"seconds": T/; s/ in [0-9.]+ s;/ in T s;/' "$out"/*/diff-*.stdout
echo "$(find "$out" -type f | wc -l) files in $out"
