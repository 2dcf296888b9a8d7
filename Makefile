# tsmsg build and test entry points. Every target is idempotent: the virtualenv and the
# extension are rebuilt only when their inputs change (stamp files under .venv/).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.tsmsg-installed
RUST_SOURCES := $(shell find rust -name '*.rs' 2>/dev/null) Cargo.toml Cargo.lock
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

HOST     ?= 127.0.0.1
PORT     ?= 7700
DATA_DIR ?= ./data

.PHONY: setup run test test-rust test-python test-long lint bench-codec bench-store bench-e2e clean

setup: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q pip maturin

# maturin builds the extension in release mode and installs the package (editable: the
# Python sources under python/ are used in place) with its dev extras into .venv.
$(STAMP): $(VPY) pyproject.toml constraints.txt $(RUST_SOURCES)
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --locked -E dev -q
	touch $@

run: $(STAMP)
	$(VENV)/bin/tsmsg serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR) $(if $(TSMSG_SECRET),,--dev)

test: lint test-rust test-python

test-rust:
	cargo test --locked -q

test-python: $(STAMP)
	$(VENV)/bin/pytest -q

# The long reliability runs (tests marked slow, at their long sizes): 50 crash-loop rounds
# over TCP, 20,000 fuzzed inputs over TCP, 100 store SIGKILL rounds. A few minutes.
test-long: $(STAMP)
	TSMSG_LONG=1 TSMSG_CRASH_ROUNDS=100 $(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	cargo fmt --check
	cargo clippy --locked -q --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests bench examples
	$(VENV)/bin/ruff format --check python tests bench examples
	$(VENV)/bin/mypy
	$(VPY) -m mypy.stubtest tsmsg._native

bench-codec: $(STAMP)
	$(VPY) bench/codec.py

bench-store: $(STAMP)
	$(VPY) bench/store.py

bench-e2e: $(STAMP)
	$(VPY) bench/e2e.py

clean:
	rm -rf $(VENV) target
