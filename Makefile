# tsmsg build and test entry points. Every target is idempotent: the virtualenv and the
# extension are rebuilt only when their inputs change (stamp files under .venv/).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.tsmsg-installed
# What each target needs on top of serving: the extras of pyproject.toml, one stamp each.
STAMP_TEST  := $(VENV)/.tsmsg-test-installed
STAMP_BENCH := $(VENV)/.tsmsg-bench-installed
# The event loop's hot modules compiled by mypyc (python/tsmsg/compiled.py), rebuilt when
# a source they may import changes; `import tsmsg` uses them only while they match.
COMPILED := python/tsmsg/_compiled/manifest.json
COMPILED_DEPS := python/tsmsg/compiled.py python/tsmsg/build_compiled.py python/tsmsg/auth.py \
	python/tsmsg/_native.pyi \
	$(wildcard python/tsmsg/protocol/*.py python/tsmsg/server/*.py python/tsmsg/store/*.py)
RUST_SOURCES := $(shell find rust -name '*.rs' 2>/dev/null) Cargo.toml Cargo.lock
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

HOST     ?= 127.0.0.1
PORT     ?= 7700
WS       ?= 127.0.0.1:7780
DATA_DIR ?= ./data

.PHONY: setup run test test-rust test-python test-long lint bench-codec bench-store bench-e2e bench-sizing clean
.PHONY: fuzz fuzz-ci fuzz-cmin
.PHONY: bench bench-full bench-cluster
.PHONY: sim

setup: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q pip maturin

# maturin builds the extension in release mode and installs the package (editable: the
# Python sources under python/ are used in place) into .venv: what serving needs only.
# `make test` and `make bench*` add their extras (test tools; plots, peers to compare
# with), each installed once. An extra installs the package again: cargo's cache makes
# that a relink, not a rebuild.
$(STAMP): $(VPY) pyproject.toml constraints.txt $(RUST_SOURCES)
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --locked -E compile -q
	rm -f $(STAMP_TEST) $(STAMP_BENCH)
	touch $@

# mypyc compiles the modules a message goes through to C (about a minute and a half):
# 20-30 % less server CPU per message (bench/README.md). TSMSG_PURE=1 runs the sources.
$(COMPILED): $(STAMP) $(COMPILED_DEPS)
	$(VPY) -m tsmsg.build_compiled

$(STAMP_TEST): $(STAMP)
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --locked -E test -q
	touch $@

$(STAMP_BENCH): $(STAMP)
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --locked -E bench -q
	touch $@

# The TCP port, and the web chat page with its WebSocket endpoint on WS (docs/web.md).
run: $(STAMP) $(COMPILED)
	@echo "tsmsg: web chat page at http://$(WS)/ (TCP clients: $(HOST):$(PORT))"
	$(VENV)/bin/tsmsg serve --host $(HOST) --port $(PORT) --ws $(WS) --data-dir $(DATA_DIR) $(if $(TSMSG_SECRET),,--dev)

test: lint test-rust test-python

# The extension's tests (with the fuzz corpus replay) and the load generator's (its codec
# against PROTOCOL.md's example bytes): the whole workspace.
test-rust:
	cargo test --locked -q --workspace

test-python: $(STAMP_TEST) $(COMPILED)
	$(VENV)/bin/pytest -q

# The long reliability runs (tests marked slow, at their long sizes): 50 crash-loop rounds
# over TCP, 20,000 fuzzed inputs over TCP, 100 store SIGKILL rounds. A few minutes.
test-long: $(STAMP_TEST) $(COMPILED)
	TSMSG_LONG=1 TSMSG_CRASH_ROUNDS=100 $(VENV)/bin/pytest -q -m slow

# The deterministic simulation (tests/sim.py): `make sim SEED=123` replays one seed (the
# whole trace on failure, VERBOSE=1 always); without SEED, SIM_SEEDS random seeds, each
# printed with the command that replays it.
SIM_SEEDS ?= 200
sim: $(STAMP_TEST) $(COMPILED)
	$(VPY) tests/sim.py $(if $(SEED),--seed $(SEED) $(if $(VERBOSE),--verbose),--seeds $(SIM_SEEDS))

lint: $(STAMP_TEST)
	cargo fmt --check
	cargo clippy --locked -q --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests bench examples
	$(VENV)/bin/ruff format --check python tests bench examples
	$(VENV)/bin/mypy
	$(VPY) -m mypy.stubtest tsmsg._native

bench-codec: $(STAMP_BENCH)
	$(VPY) bench/codec.py

bench-store: $(STAMP_BENCH)
	$(VPY) bench/store.py

bench-e2e: $(STAMP_BENCH) $(COMPILED)
	$(VPY) bench/e2e.py

# tsmsg vs Redis Streams vs NATS JetStream with the native load generator (bench/loadgen,
# built by bench/run.py with `cargo build --profile loadgen -p loadgen`). `bench`: the
# short grid, a few minutes; `bench-full`: the whole grid of issue #8. tsmsg's fan-out to
# 100 subscribers and idle connections run over its WebSocket port too (issue 16). Results,
# tables and plots go to bench/results/<date>-quick|full/.
bench: $(STAMP_BENCH) $(COMPILED)
	$(VPY) bench/run.py --quick

bench-full: $(STAMP_BENCH) $(COMPILED)
	$(VPY) bench/run.py --full

# 1, 2 and 3 tsmsg nodes on one private Redis (AOF, appendfsync always) and the LMDB node
# for the ratio: fan-in, fan-out and cross-node publish-to-deliver latency, CPU per message
# per node and of Redis. A few minutes; results in bench/results/<date>-cluster/.
bench-cluster: $(STAMP_BENCH) $(COMPILED)
	$(VPY) bench/cluster.py --quick

# Server RSS per idle connection (plaintext and TLS) and disk per million messages; the
# figures docs/deploy.md sizes with. A few minutes.
bench-sizing: $(STAMP_BENCH) $(COMPILED)
	$(VPY) bench/sizing.py

# Coverage-guided fuzzing of the Rust decoder, encoder and dedup ring (fuzz/README.md):
# FUZZ_SECONDS per target, FUZZ_TARGET to pick one. cargo-fuzz is pinned and installed
# into .cargo-tools/ on first use. Why `--sanitizer none`: only the stable toolchain
# exists here, and cargo-fuzz's default AddressSanitizer build passes -Zsanitizer=address,
# a nightly-only flag (stable rustc rejects -Z flags unless RUSTC_BOOTSTRAP=1, an escape
# hatch we do not build on). Without a sanitizer every flag cargo-fuzz passes is stable:
# -Cpasses=sancov-module and -Cllvm-args=-sanitizer-coverage-* (libFuzzer's coverage and
# compare tracing), -Cdebug-assertions (overflow checks). ASan would add little: the code
# under test is safe Rust but for one audited `unsafe`, so out-of-bounds access already
# panics, and the targets count heap bytes themselves (fuzz/src/checks.rs) because
# libFuzzer's -malloc_limit_mb needs a sanitizer's malloc hooks.
# New inputs go to target/fuzz-work/; `make fuzz-cmin` merges them into fuzz/corpus/.
CARGO_FUZZ_VERSION := 0.13.2
CARGO_TOOLS := $(CURDIR)/.cargo-tools
CARGO_FUZZ := $(CARGO_TOOLS)/bin/cargo-fuzz
FUZZ_TARGETS := decode_frames roundtrip dedup_ring tls_session jws
FUZZ_TARGET ?= $(FUZZ_TARGETS)
FUZZ_SECONDS ?= 60
FUZZ_WORK := target/fuzz-work

$(CARGO_FUZZ):
	cargo install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked --root $(CARGO_TOOLS)

fuzz: $(CARGO_FUZZ)
	@for t in $(FUZZ_TARGET); do \
	  mkdir -p $(FUZZ_WORK)/$$t fuzz/corpus/$$t fuzz/regressions/$$t || exit 1; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s (log: $(FUZZ_WORK)/$$t.log)"; \
	  if $(CARGO_FUZZ) fuzz run --sanitizer none $$t $(FUZZ_WORK)/$$t fuzz/corpus/$$t \
	      fuzz/regressions/$$t -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	      -print_final_stats=1 >$(FUZZ_WORK)/$$t.log 2>&1; then \
	    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units)' $(FUZZ_WORK)/$$t.log; \
	  else \
	    tail -n 60 $(FUZZ_WORK)/$$t.log; \
	    echo "fuzz: $$t FAILED; the input is in fuzz/artifacts/$$t/ (fuzz/README.md)"; \
	    exit 1; \
	  fi; \
	done

# Short runs for CI, after `make test`: about 20 s per target plus the build.
fuzz-ci:
	$(MAKE) fuzz FUZZ_SECONDS=20

# Merge what `make fuzz` found into the committed corpus, minimized.
fuzz-cmin: $(CARGO_FUZZ)
	@for t in $(FUZZ_TARGET); do \
	  mkdir -p $(FUZZ_WORK)/$$t fuzz/corpus/$$t && \
	  cp -n $(FUZZ_WORK)/$$t/* fuzz/corpus/$$t/ 2>/dev/null; \
	  $(CARGO_FUZZ) fuzz cmin --sanitizer none $$t fuzz/corpus/$$t || exit 1; \
	done

clean:
	rm -rf $(VENV) target python/tsmsg/_compiled
