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
            python3-torch python3-omegaconf

.PHONY: all deps configure build demo test sanitize clean

all: build

deps:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BUILD)/build.ninja:
	meson setup $(BUILD) --buildtype=release -Dwerror=true

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

test: build
	meson test -C $(BUILD) --print-errorlogs

# The suite under AddressSanitizer and UndefinedBehaviorSanitizer.
sanitize: deps
	[ -f build-asan/build.ninja ] || meson setup build-asan --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false -Dwerror=true
	meson compile -C build-asan
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 meson test -C build-asan --print-errorlogs

clean:
	rm -rf $(BUILD) build-asan
