#!/usr/bin/env python3
"""Runs several end-to-end test scripts in this one Python process, in order.

Each script imports torch, which costs about 2 s of CPU per process: meson runs the
scripts in a few groups (tests/meson.build), each paying it once. Every script runs
whole even when an earlier one failed; the exit status is 1 when any failed.

Usage: run_scripts.py SCRIPT.py...
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(paths):
    failed = []
    for path in paths:
        name = os.path.basename(path)
        print(f"== {name}", flush=True)
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                failed.append(name)
    print(f"{len(paths) - len(failed)} of {len(paths)} scripts passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
