#!/usr/bin/env python3
"""Fails when a C++ file differs from .clang-format (Debian's clang-format).

Usage: check_format.py SOURCE_ROOT CLANG_FORMAT
Fix with: clang-format -i $(git ls-files '*.cpp' '*.hpp' '*.h')
"""
import pathlib
import subprocess
import sys


def main():
    root = pathlib.Path(sys.argv[1]).resolve()
    clang_format = sys.argv[2]
    files = sorted(str(p) for d in ("src", "include", "tests") for p in (root / d).rglob("*")
                   if p.suffix in (".cpp", ".hpp", ".h"))
    result = subprocess.run([clang_format, "--dry-run", "--Werror", *files], cwd=root,
                            capture_output=True, text=True)
    drifted = sorted({line.split(":", 1)[0] for line in result.stderr.splitlines() if ": error:" in line})
    for path in drifted:
        print(f"{pathlib.Path(path).relative_to(root)}: differs from .clang-format")
    print(f"{len(files)} files checked, {len(drifted)} not formatted"
          + (" (clang-format -i FILE fixes them)" if drifted else ""))
    return 1 if drifted or result.returncode not in (0, 1) else 0


if __name__ == "__main__":
    sys.exit(main())
