# The two README commands: `make run` (the whole pipeline on the embedded default) and
# `make test`. Both create .venv and install into it on first use.
# CPU machines: torch is pinned first so pip takes the CPU wheel and never pulls CUDA.
# GPU machines: `make install TORCH=torch` (or any CUDA build you already have).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install run test lint
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: install
	$(PY) jobs/spd.py $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check spd_ray jobs tests
