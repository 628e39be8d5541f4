# Set-up is part of each target: a venv with a CPU torch (override TORCH for a CUDA build, e.g.
# `make test TORCH=torch`), then the package in editable mode with its dev extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flashsae-installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

demo: $(STAMP)
	$(PY) -m flashsae train --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
