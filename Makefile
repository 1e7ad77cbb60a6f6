# STLLaVA-Med: every target sets itself up on a fresh clone with only python3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The pinned stack, every package and hash (CPython 3.11, linux x86_64, CPU torch): `make lock` rewrites it.
LOCK   := requirements/lock.txt
# Where pip finds the CPU build of torch that the lock pins (torch==2.13.0+cpu). Empty: pip's own
# configuration. Elsewhere: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_TORCH   := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
LOCK_VENV   ?= .venv-lock
# Everything runs offline: weights and data come from disk, never from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install lock test test-fast lint demo bench device-check clean

help:
	@echo "make install - .venv with the locked stack ($(LOCK)) and the package (editable)"
	@echo "make lock   - regenerate $(LOCK) from pyproject.toml (pip-tools; LOCK_ARGS=--upgrade to bump)"
	@echo "make demo   - the whole method on the embedded tiny backbone and bundled VQA-RAD sample (CPU)"
	@echo "make test   - the test suite (unit + integration, offline)"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks/ (installs the 'bench' extra: trl)"
	@echo "make device-check - the GPU check on one H100/H200 (benchmarks/device_check.sh; JSON in logs/)"

# Re-installs whenever the lock or the package metadata changes. The lock holds every dependency with its
# hashes; the package itself goes on top without resolving anything (built with the locked setuptools).
$(STAMP): $(LOCK) pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(LOCK) $(PIP_TORCH)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

# pip-tools in its own venv (not in .venv: it would add packages the lock does not list). pip-compile resolves
# for the interpreter it runs on, hence the check; it keeps the pins already in $(LOCK) unless LOCK_ARGS=--upgrade.
lock:
	@test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/pip install -q pip==26.3 pip-tools==7.6.2; }
	@$(LOCK_VENV)/bin/python -c "import platform, sys; ok = sys.version_info[:2] == (3, 11) and \
		sys.platform == 'linux' and platform.machine() == 'x86_64'; \
		sys.exit(0 if ok else 'the lock is for CPython 3.11 on linux x86_64: run make lock PYTHON=python3.11 on one')"
	$(LOCK_VENV)/bin/pip-compile --quiet --extra dev --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links $(PIP_TORCH) $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml
	@grep -q '^torch==[^ ]*+cpu ' $(LOCK) || { echo "$(LOCK): torch is not the CPU build; pip could not see" \
		"it (make lock TORCH_INDEX=https://download.pytorch.org/whl/cpu)"; exit 1; }

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

demo: $(STAMP)
	$(PY) -m stllava_med.pipeline experiment=demo

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) benchmarks/run_all.py

# One CUDA device, < 8 minutes, nothing downloaded: a 7B-shaped LLaVA with random weights (benchmarks/device_check.py)
device-check: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	PYTHON=$(PY) bash benchmarks/device_check.sh

clean:
	rm -rf logs/* data/backbones data/cache .pytest_cache
	@touch logs/.gitkeep
