# meshstore: set-up, build, test, demo and benchmarks. Every target builds what it
# needs from nothing: a virtualenv in .venv with pinned dependencies, then the Rust
# extension in release mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

RUST_SOURCES := $(shell find rust proto -type f) Cargo.toml build.rs

.PHONY: all build test demo demo-replicas bench proto clean

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

test: build
	cargo test --release --quiet
	$(PY) -m pytest -q $(PYTEST_ARGS)

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
