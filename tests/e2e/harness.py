"""What every end-to-end test script shares: paths from meson's environment,
fixtures generated once per build, running the tool, and a tiny test runner that
prints the closing line `N passed, N failed` and exits non-zero on any failure."""
import contextlib
import fcntl
import filecmp
import functools
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import time
import traceback

SOURCE_ROOT = os.environ.get("CKPT_SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
TOOL = os.environ.get("CKPT_TOOL", os.path.join(SOURCE_ROOT, "build", "ckpt-tool"))
ROUNDTRIP = os.environ.get("CKPT_ROUNDTRIP", os.path.join(SOURCE_ROOT, "build", "tests", "roundtrip"))
WORK = os.environ.get("CKPT_WORK", os.path.join(SOURCE_ROOT, "build", "tests", "e2e-work"))
PYTHON = "/usr/bin/python3"

# The exit code of each error kind (kErrorKinds in include/ckpt/io/error.hpp, README
# "Exit codes"); diff exits 2 for every error but an internal one.
EXIT = {"bad_input": 1, "usage": 2, "corrupt_data": 65, "incomplete_set": 66, "internal": 70, "no_space": 73,
        "io": 74}

sys.path.insert(0, os.path.dirname(__file__))
import ckptcheck  # noqa: E402


def _generator_digest():
    """What the fixtures are a function of: the generator and the module it imports."""
    digest = hashlib.sha256()
    for path in (os.path.join(SOURCE_ROOT, "fixtures", "generate.py"), os.path.join(os.path.dirname(__file__), "ckptcheck.py")):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _generate(generator, out):
    """Runs the generator in this process, which has imported torch already (a second
    Python start with torch costs seconds, while every other script waits)."""
    spec = importlib.util.spec_from_file_location("ckpt_fixture_generator", generator)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):
        assert module.main(["--out", out]) == 0


def fixtures():
    """Generate every fixture case under WORK/fixtures, once per build directory:
    again only when the generator's content changes. Returns {case name: folder}."""
    generator = os.path.join(SOURCE_ROOT, "fixtures", "generate.py")
    out = os.path.join(WORK, "fixtures")
    stamp = os.path.join(out, ".stamp")
    wanted = _generator_digest()
    os.makedirs(WORK, exist_ok=True)
    # meson runs the test scripts in parallel: one generates, the others wait.
    with open(os.path.join(WORK, ".fixtures.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.exists(stamp) and open(stamp).read() == wanted):
            subprocess.run(["rm", "-rf", out], check=True)
            _generate(generator, out)
            with open(stamp, "w") as f:
                f.write(wanted)
    return {name: os.path.join(out, name) for name in sorted(os.listdir(out))
            if os.path.isdir(os.path.join(out, name))}


@functools.lru_cache(maxsize=None)
def load_fixture(path):
    """ckptcheck.load of a generated fixture file, loaded once per test script.
    Shared between callers: read it, never change it (load a private copy with
    ckptcheck.load to edit)."""
    return ckptcheck.load(path)


def scratch(name):
    """An empty folder for one test."""
    path = os.path.join(WORK, "scratch", name)
    subprocess.run(["rm", "-rf", path], check=True)
    os.makedirs(path)
    return path


def preloaded(**faults):
    """The environment for a run with the fault shim preloaded (tests/e2e/faults.cpp),
    the faults given as its variables: CKPT_FAULT_REFUSE_DIRECT="1",
    CKPT_FAIL_WRITES_AFTER_BYTES, CKPT_FAIL_RENAME_AT. Under ASan the shim comes
    before ASan's runtime: tell it that is fine."""
    return dict(os.environ, LD_PRELOAD=os.environ["CKPT_FAULTS"],
                ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0", **faults)


def same_tree(a, b, keep=lambda name: True):
    """Folders `a` and `b` hold the same names (those `keep` takes), folders alike,
    files byte for byte (cmp)."""
    left = sorted(n for n in os.listdir(a) if keep(n))
    right = sorted(n for n in os.listdir(b) if keep(n))
    assert left == right, (a, left, right)
    for name in left:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if os.path.isdir(pa):
            same_tree(pa, pb, keep)
        else:
            assert filecmp.cmp(pa, pb, shallow=False), (pa, pb)


def run(args, expect=0, tool=None):
    """Runs the tool; asserts the exit code; returns (stdout, stderr)."""
    proc = subprocess.run([tool or TOOL] + [str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != expect:
        raise AssertionError(f"{' '.join(map(str, args))}: exit {proc.returncode}, expected {expect}\n"
                             f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    return proc.stdout, proc.stderr


def main(tests):
    passed = failed = 0
    for test in tests:
        start = time.monotonic()
        try:
            test()
            passed += 1
            print(f"ok   {test.__name__} ({time.monotonic() - start:.1f} s)")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAIL {test.__name__}")
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
