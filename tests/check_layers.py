#!/usr/bin/env python3
"""Fails when an #include points up the pipeline (docs/design.md).

The stages, lowest first: io <- format <- layout <- manifest <- plan <- exec <- cli.
A file of stage S (src/S/..., include/ckpt/S/...) may include headers of S and
of the stages below it, never above. `tensor` (the LibTorch plugin, src/tensor/)
sits beside cli: it implements exec's tensor_math.hpp, and nothing outside
src/tensor/ includes its headers (only the plugin links LibTorch). Every project header must
live in a stage folder: `#include "ckpt/x.hpp"` without one is an error too.

Which kind of input a file is gets decided in one place: `FileFormat::` is named
only by the input-layout table (src/manifest/input_layouts.cpp), the manifest's
own declarations and readers, and a layout's describe function that sets it
(FORMAT_NAMED); everywhere else asks the layout's row (input_layouts.hpp).

Dispatch on a table's key stays in the stages that own the table: `OutputFormat::` only in
plan (the output-format table, src/plan/output_formats.cpp); the CLI derives from the rows.

Usage: check_layers.py SOURCE_ROOT
"""
import pathlib
import re
import sys

STAGES = ["io", "format", "layout", "manifest", "plan", "exec", "cli"]
RANK = {stage: i for i, stage in enumerate(STAGES)}
RANK["tensor"] = RANK["cli"]
RANK["python"] = RANK["cli"]  # the Python module's native half (src/python), beside the command line
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
FORMAT_NAMED = {"src/manifest/input_layouts.cpp", "include/ckpt/manifest/manifest.hpp",
                "include/ckpt/manifest/input_layouts.hpp",
                "src/manifest/manifest.cpp", "src/manifest/dcp_layout.cpp",
                "src/manifest/deepspeed_layout.cpp"}
# A table key named outside the stages that own the table: the stages where it may appear.
TABLE_KEYS = {"OutputFormat::": {"plan"}}


def stage_of(root, path):
    rel = path.relative_to(root).parts
    if rel[0] == "src":
        return rel[1]
    if rel[:2] == ("include", "ckpt"):
        return rel[2] if len(rel) > 3 else None
    return None


def main():
    root = pathlib.Path(sys.argv[1]).resolve()
    files = sorted(p for d in ("src", "include") for p in (root / d).rglob("*")
                   if p.suffix in (".cpp", ".hpp", ".h"))
    problems = []
    for path in files:
        stage = stage_of(root, path)
        where = path.relative_to(root)
        if stage not in RANK:
            problems.append(f"{where}: not in a stage folder ({', '.join(STAGES)}, tensor)")
            continue
        text = path.read_text()
        if "FileFormat::" in text and str(where) not in FORMAT_NAMED:
            problems.append(f"{where}: names FileFormat:: (ask the input layout's row: input_layouts.hpp)")
        for key, owners in TABLE_KEYS.items():
            if stage not in owners and key in text:
                problems.append(f"{where} ({stage}) names `{key}`: only {', '.join(sorted(owners))} may "
                                "(use the table's rows)")
        for target in INCLUDE.findall(text):
            if not target.startswith("ckpt/"):
                continue  # a header of the same folder (src/cli/commands.hpp)
            parts = target.split("/")
            if len(parts) != 3 or parts[1] not in RANK:
                problems.append(f"{where}: includes {target}, which is in no stage folder")
            elif RANK[parts[1]] > RANK[stage] or (parts[1] == "tensor" and stage != "tensor"):
                problems.append(f"{where} ({stage}) includes {target} ({parts[1]}): up the pipeline")
    for problem in problems:
        print(problem)
    print(f"{len(files)} files checked, {len(problems)} upward or misplaced include(s) or table key(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
