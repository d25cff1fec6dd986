# The README's two commands: `make demo` and `make test`. Both install what is
# missing (Debian packages, apt-get), configure a release build with meson and
# build it. CI runs `make test` through .ci/run.
SHELL := /bin/bash
BUILD ?= build
PYTHON := /usr/bin/python3
DEMO := $(BUILD)/demo

# Debian 12 packages this project needs; `deps` installs those not yet present.
PACKAGES := g++ meson ninja-build pkg-config cmake libtorch-dev libboost-dev libzstd-dev \
            nlohmann-json3-dev doctest-dev libfmt-dev libcli11-dev libisal-dev zlib1g-dev \
            python3-torch python3-omegaconf time clang-format libmimalloc-dev \
            libopenmpi-dev openmpi-bin pybind11-dev python3-dev

.PHONY: all deps configure build demo test bench sanitize fuzz clean

all: build

deps:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BUILD)/build.ninja:
	meson setup $(BUILD) --buildtype=release -Dwerror=true -Dpython=enabled

configure: deps $(BUILD)/build.ninja

build: configure
	meson compile -C $(BUILD)

# The main job on a bundled example: a small MP2 x DP2 training checkpoint.
demo: build
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PYTHON) fixtures/generate.py --out $(DEMO) --case mp2_dp2_fp16_omega_opt >/dev/null
	$(BUILD)/ckpt-tool manifest $(DEMO)/mp2_dp2_fp16_omega_opt -o $(DEMO)/manifest.json.zst
	$(BUILD)/ckpt-tool inspect $(DEMO)/manifest.json.zst
	$(BUILD)/ckpt-tool stitch $(DEMO)/manifest.json.zst -o $(DEMO)/consolidated.pt
	$(BUILD)/ckpt-tool inspect $(DEMO)/consolidated.pt
	$(PYTHON) tests/e2e/ckptcheck.py same $(DEMO)/consolidated.pt $(DEMO)/mp2_dp2_fp16_omega_opt/expected/consolidated.pt

# Four tests at a time on two cores: while one waits for fsync, another computes.
test: build
	meson test -C $(BUILD) --print-errorlogs --num-processes 4

# The benchmark: cp + sync beside 5 runs of stitch at each size, the Python pipeline,
# reshard and diff on 0.25 to 16 GiB inputs (16 needs about 42 GiB free on disk;
# BENCH_SIZES=0.25,1,4 for a shorter run), the metadata path on grids of OPT-175B's
# shape (8 x 16 and 8 x 124 shards; BENCH_GRIDS=none skips them) and on one file of
# 200,000 tensors (BENCH_TENSORS=none skips it), and a 1 GiB DCP directory to each output
# (BENCH_DCP=none skips it), and one job over 1, 2 and 4 MPI ranks: the 992-shard grid
# to 8 x 64 and a 4 GiB stitch (BENCH_MPI=none skips it), and a DeepSpeed ZeRO-3 checkpoint
# of 1 GiB of fp32 weights, 3 GiB with Adam's moments (BENCH_DEEPSPEED=none skips it),
# and the Python module's load of 1 and 4 GiB files beside torch.load, then of the
# 992-shard grid beside stitch + torch.load (BENCH_PYTHON_LOAD=none skips it); writes
# bench/RESULTS.md.
BENCH_SIZES ?= 0.25,1,4,16
BENCH_GRIDS ?= 8x16,8x124
BENCH_TENSORS ?= 200000
BENCH_DCP ?= 1
BENCH_MPI ?= 4
BENCH_DEEPSPEED ?= 1
BENCH_PYTHON_LOAD ?= 1,4
bench: build
	$(PYTHON) bench/bench.py --sizes $(BENCH_SIZES) --grids $(BENCH_GRIDS) --tensors $(BENCH_TENSORS) --dcp $(BENCH_DCP) \
	  --mpi $(BENCH_MPI) --deepspeed $(BENCH_DEEPSPEED) \
	  --python-load $(BENCH_PYTHON_LOAD)

# The suite under AddressSanitizer and UndefinedBehaviorSanitizer (5 to 10 times slower:
# four times the timeouts).
sanitize: deps
	[ -f build-asan/build.ninja ] || meson setup build-asan --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false -Dwerror=true
	meson compile -C build-asan
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 meson test -C build-asan --print-errorlogs --timeout-multiplier 4

# libFuzzer targets (tests/fuzz/) in their own clang build, each run for
# FUZZ_SECONDS from a corpus seeded with fixture checkpoints. Prints each target's
# runs and coverage; fails when a target crashes, leaks, times out or runs out of
# memory (the input is saved under $(FUZZ_BUILD)/artifacts/TARGET/). Inputs that
# once crashed live in tests/fuzz/regressions/TARGET/ and are replayed by the unit
# tests (test_fuzz_regressions.cpp), not here.
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := fuzz_zip fuzz_pickle fuzz_checkpoint fuzz_manifest fuzz_safetensors
FUZZ_PACKAGES := clang libclang-rt-14-dev
FUZZ_CASES := mp1_dp1_fp32_ns mp2_dp3_fp32_ns_args mp4_dp3_fp16_omega

fuzz: deps $(BUILD)/build.ninja
	@missing=$$(for p in $(FUZZ_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	[ -f $(FUZZ_BUILD)/build.ninja ] || CC=clang CXX=clang++ meson setup $(FUZZ_BUILD) -Dfuzz=true \
	  -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debugoptimized
	ninja -C $(FUZZ_BUILD) $(addprefix tests/fuzz/,$(FUZZ_TARGETS))
	[ -d $(FUZZ_BUILD)/fixtures ] || $(PYTHON) fixtures/generate.py --out $(FUZZ_BUILD)/fixtures \
	  $(addprefix --case ,$(FUZZ_CASES)) >/dev/null
	rm -rf $(FUZZ_BUILD)/seeds
	ninja -C $(BUILD) ckpt-tool
	$(PYTHON) tests/fuzz/make_seeds.py --out $(FUZZ_BUILD)/seeds --ckpt-tool $(BUILD)/ckpt-tool \
	  fixtures/tiny $(FUZZ_BUILD)/fixtures
	cat tests/fuzz/zip.dict tests/fuzz/pickle.dict > $(FUZZ_BUILD)/checkpoint.dict
	@failed=""; \
	for t in $(FUZZ_TARGETS); do \
	  case $$t in fuzz_zip) dict=tests/fuzz/zip.dict;; fuzz_pickle) dict=tests/fuzz/pickle.dict;; \
	    fuzz_manifest) dict=tests/fuzz/manifest.dict;; fuzz_safetensors) dict=tests/fuzz/safetensors.dict;; \
	    *) dict=$(FUZZ_BUILD)/checkpoint.dict;; esac; \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/artifacts/$$t; \
	  log=$(FUZZ_BUILD)/$$t.log; \
	  echo "== $$t: $(FUZZ_SECONDS) s (log: $$log)"; \
	  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(FUZZ_BUILD)/tests/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 \
	    -dict=$$dict -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t/ \
	    $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/seeds/$$t >$$log 2>&1; \
	  status=$$?; \
	  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' $$log | sed "s/^/$$t: /"; \
	  grep -E '^Done [0-9]+ runs' $$log | sed "s/^/$$t: /"; \
	  if [ $$status -ne 0 ]; then \
	    failed="$$failed $$t"; \
	    echo "$$t: FAILED (exit $$status):"; \
	    grep -E 'ERROR|SUMMARY|invariant violated|Test unit written|^    #[0-9]+ ' $$log | head -30 | sed "s/^/$$t: /"; \
	  fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: findings in$$failed (inputs in $(FUZZ_BUILD)/artifacts/)"; exit 1; fi; \
	echo "fuzz: no findings"

clean:
	rm -rf $(BUILD) build-asan
