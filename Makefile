# meshstore: set-up, build, test, demo and benchmarks. Every target builds what it
# needs from nothing: a virtualenv in .venv with the dependencies at the versions of
# constraints.txt, then the Rust extension in release mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

RUST_SOURCES := $(shell find rust proto -type f) Cargo.toml build.rs

.PHONY: all build chromium test interop bench-seed demo demo-replicas bench bench-smoke wheel wheel-smoke proto clean

all: build

$(VENV)/.deps: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt $$($(PY) -c 'import tomllib;d=tomllib.load(open("pyproject.toml","rb"))["project"];print(" ".join(d["dependencies"]+d["optional-dependencies"]["dev"]))')
	touch $@

$(VENV)/.built: $(VENV)/.deps $(RUST_SOURCES)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(VENV)/.built

# The browser tests (tests/browser) drive Debian's chromium through Playwright's Python
# package; no browser is ever downloaded (no `playwright install`). Installed here when
# missing (apt-get: run as root, as CI does).
chromium:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)

test: build chromium
	cargo test --release --quiet --features server
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The seed system's Go clients against meshstore serve (tests/interop; not part of
# `make test`). Needs a snapshot of boshu2/lattice-lab as a git directory and its build
# script (it installs Go libraries with apt-get: run as root); builds into LATTICE_BUILD.
LATTICE_SRC = $(LATTICE_BUILD)/src/github.com/boshu2/lattice-lab
interop:
	@if [ -z "$(LATTICE_GIT)" ] || [ -z "$(LATTICE_BUILD)" ] || [ -z "$(LATTICE_BUILD_SCRIPT)" ]; then \
	  echo "usage: make interop LATTICE_GIT=<git dir of a boshu2/lattice-lab snapshot>" \
	       "LATTICE_BUILD=<build dir> LATTICE_BUILD_SCRIPT=<its build script>" >&2; exit 2; fi
	$(MAKE) build
	@# Only the sources: a snapshot may lack the large binary committed at the repository's root.
	@[ -d "$(LATTICE_SRC)/cmd" ] || { mkdir -p "$(LATTICE_SRC)" && \
	  git --git-dir="$(LATTICE_GIT)" archive HEAD cmd gen internal proto go.mod go.sum | tar -x -C "$(LATTICE_SRC)"; }
	bash "$(LATTICE_BUILD_SCRIPT)" "$(LATTICE_GIT)" "$(LATTICE_BUILD)"
	LATTICE_BIN="$(abspath $(LATTICE_SRC))/bin" $(PY) -m pytest tests/interop -v $(PYTEST_ARGS)

# BSEED (benches/bench_seed.py): unary UpdateEntity throughput of meshstore serve against
# the seed system's own entity-store and a bare grpc-go server of the same API (the floor
# of the seed's stack), one Go load generator built against the seed's generated client.
# Builds the seed as `interop` does, from the same variables.
bench-seed:
	@if [ -z "$(LATTICE_GIT)" ] || [ -z "$(LATTICE_BUILD)" ] || [ -z "$(LATTICE_BUILD_SCRIPT)" ]; then \
	  echo "usage: make bench-seed LATTICE_GIT=<git dir of a boshu2/lattice-lab snapshot>" \
	       "LATTICE_BUILD=<build dir> LATTICE_BUILD_SCRIPT=<its build script>" >&2; exit 2; fi
	$(MAKE) build
	@[ -d "$(LATTICE_SRC)/cmd" ] || { mkdir -p "$(LATTICE_SRC)" && \
	  git --git-dir="$(LATTICE_GIT)" archive HEAD cmd gen internal proto go.mod go.sum | tar -x -C "$(LATTICE_SRC)"; }
	bash "$(LATTICE_BUILD_SCRIPT)" "$(LATTICE_GIT)" "$(LATTICE_BUILD)"
	LATTICE_BUILD="$(abspath $(LATTICE_BUILD))" LATTICE_BIN="$(abspath $(LATTICE_SRC))/bin" \
	  $(PY) -m pytest benches/bench_seed.py --benchmark-only -s $(BENCH_ARGS)

# B9 (benches/bench_pipeline.py): the whole pipeline at 2 Hz (demo, and serve + each service
# as its own process) next to the seed system's Go pipeline, measured by one watcher. The
# seed's side runs its built binaries: LATTICE_BIN=<their dir>, or LATTICE_BUILD=<the build
# dir `make interop` / `make bench-seed` built into>; without either it is skipped. Knobs:
# BPIPE_SECONDS (60), BPIPE_TARGETS (1000,3000,10000), BPIPE_RUNS, BPIPE_RATE (see the file).
.PHONY: bench-pipeline
bench-pipeline: build
	LATTICE_BIN="$(or $(LATTICE_BIN),$(if $(LATTICE_BUILD),$(abspath $(LATTICE_SRC))/bin))" \
	  $(PY) -m pytest benches/bench_pipeline.py --benchmark-only -s $(BENCH_ARGS)

demo: build
	$(PY) -m meshstore.cli demo $(DEMO_ARGS)

demo-replicas: build
	$(PY) -m meshstore.demo $(DEMO_ARGS)

bench: build
	cargo bench --bench merge
	$(PY) -m pytest benches -q --benchmark-only --benchmark-columns=min,mean,ops,rounds $(BENCH_ARGS)

# Every benchmark once, for a round or two at small sizes (each bench's own knobs), so
# none can rot unnoticed (.ci/run runs it; the figures mean nothing). B9's seed runs and
# BSEED need the seed system's Go binaries and skip, saying why, without them.
BENCH_SMOKE_SIZES := B1_REPS=1 BLOOP_TIMERS=2000 BLOOP_ROUNDS=2 BFUSION_TARGETS=300 BFUSION_ROUNDS=2 \
  BSTORE_TRACKS=2000 BSTORE_ROUNDS=2 B4_UPDATES=2000 B4_TRACKS=200 B5_ENTITIES=300 B5_ROUNDS=1 \
  B7_ROUNDS=1 B7_REPEATS=1 B8_TRACKS=2000 BH_TRACKS=200 BH_SECONDS=4 \
  BWATCH_SECONDS=1 BWATCH_TRACKS=500 BWATCH_FANOUT_WATCHERS=2 BWATCH_FANOUT_RATE=5000 BWATCH_READERS=4 \
  BWATCH_READER_PROCS=1 BWATCH_STUCK=2 BWATCH_MANY_TRACKS=200 \
  BPIPE_SECONDS=4 BPIPE_TARGETS=50 BSEED_ROUNDS=1 BSEED_SECONDS=1 BSEED_WARMUP=0.2
bench-smoke: build
	$(BENCH_SMOKE_SIZES) cargo bench --bench merge
	$(BENCH_SMOKE_SIZES) $(PY) -m pytest benches -q -rs --benchmark-only --benchmark-columns=min,rounds \
	  $(BENCH_ARGS)

# The release wheel: stable ABI (one wheel for CPython 3.11+) and manylinux2014 (glibc
# 2.17: RHEL 8, Ubuntu 20.04, Debian 11), linked by zig (the ziglang package, a dev
# dependency) against that glibc; built in its own cargo target dir so the development
# build stays as it is. ~4 min from nothing on 2 cores.
WHEEL_DIR := target/wheels
WHEEL_VENV := target/wheel-venv
wheel: $(VENV)/.deps
	rm -f $(WHEEL_DIR)/meshstore-*.whl
	CARGO_TARGET_DIR=target/wheel $(VENV)/bin/maturin build --release --zig --compatibility manylinux2014 \
	  --out $(WHEEL_DIR)

# The wheel installed into a fresh virtualenv (its dependencies at constraints.txt's
# versions; the tags in the file name checked by the glob), then scripts/wheel_smoke.py
# with that virtualenv's python, isolated from this source tree.
wheel-smoke: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet -c constraints.txt \
	  $(WHEEL_DIR)/meshstore-*-cp311-abi3-manylinux2014_x86_64.*.whl
	$(WHEEL_VENV)/bin/python -I scripts/wheel_smoke.py

proto: $(VENV)/.deps
	$(PY) scripts/genproto.py

clean:
	rm -rf $(VENV) target
