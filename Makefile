# make demo : set up, build, run the main job (an MoE layer's experts, fwd+bwd, quick mode)
# make test : set up, build, run every test
#
# The venv lives outside the checkout, keyed by requirements.txt, so CI and
# fresh clones reuse it when the pins have not changed.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-12)
CACHE ?= $(HOME)/.cache/torch-moe-ops
VENV ?= $(CACHE)/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
export TORCHINDUCTOR_CACHE_DIR ?= $(CACHE)/inductor
# patches/proof.py caches the generated ATen headers and compile results here.
export TORCH_MOE_OPS_CACHE ?= $(CACHE)
export MAX_JOBS ?= 2
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: all setup build test demo bench bench-check patches clean

all: test

# The venv name carries the hash of requirements.txt, so a fresh clone (new
# mtimes) reuses it; only new pins make a new venv.
$(VENV)/.installed: | requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# The build is cached outside the checkout, keyed by the content of every
# source that goes into it (.ci/cached_build), so fresh clones and CI reuse it.
build: setup
	.ci/cached_build $(PY) $(CACHE)

test: build
	$(PY) -m pytest -q test

demo: build
	$(PY) benchmarks/bench_moe_layer.py --quick

# Every benchmark in full (benchmarks/README.md): writes benchmarks/results/*.json,
# then regenerates the README's tables from them. Needs the machine to itself.
BENCHMARKS := bench_grouped_mm bench_routing bench_fp8 bench_moe_layer numerics_fp8 bench_ep bench_compile

# THP_MEM_ALLOC_ENABLE=1 (unless set): c10's allocator gives large buffers huge
# pages; the JSON records the setting (benchmarks/_harness.py).
bench: build
	for b in $(BENCHMARKS); do THP_MEM_ALLOC_ENABLE=$${THP_MEM_ALLOC_ENABLE-1} $(PY) benchmarks/$$b.py; done
	$(PY) benchmarks/tables.py

# The same with --check: runs every benchmark (each one's missed targets listed
# at its end), regenerates the tables, then fails if any target was missed or
# any benchmark failed.
bench-check: build
	status=0; for b in $(BENCHMARKS); do THP_MEM_ALLOC_ENABLE=$${THP_MEM_ALLOC_ENABLE-1} $(PY) benchmarks/$$b.py --check || status=1; done; \
	$(PY) benchmarks/tables.py; exit $$status

# Regenerate the upstream patch series from the in-repo sources (patches/README.md).
patches: setup
	$(PY) -m patches.generate

clean:
	rm -rf build torch_moe_ops/*.so *.egg-info
