# STLLaVA-Med: every target sets itself up on a fresh clone with only python3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Everything runs offline: weights and data come from disk, never from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install test test-fast lint demo bench clean

help:
	@echo "make demo   - the whole method on the embedded tiny backbone and bundled VQA-RAD sample (CPU)"
	@echo "make test   - the test suite (unit + integration, offline)"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks/ (installs the 'bench' extra: trl)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

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

clean:
	rm -rf logs/* data/backbones data/cache .pytest_cache
	@touch logs/.gitkeep
