# meshstore: set-up, build, test, demo and benchmarks. Every target builds what it
# needs from nothing: a virtualenv in .venv with pinned dependencies, then the Rust
# extension in release mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

RUST_SOURCES := $(shell find rust proto -type f) Cargo.toml build.rs

.PHONY: all build chromium test interop bench-seed demo demo-replicas bench proto clean

all: build

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $$($(PY) -c 'import tomllib;d=tomllib.load(open("pyproject.toml","rb"))["project"];print(" ".join(d["dependencies"]+d["optional-dependencies"]["dev"]))')
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
# the seed system's own entity-store, one Go load generator built against the seed's
# generated client. Builds the seed as `interop` does, from the same variables.
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

proto: $(VENV)/.deps
	$(PY) scripts/genproto.py

clean:
	rm -rf $(VENV) target
