# `make demo` sets everything up in .venv and rewrites the bundled example;
# `make test` runs the default test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint clean

setup: $(STAMP)

# torch is pinned first so that no multi-GB CUDA build is pulled in by the range in
# pyproject.toml; everything else comes from the project's dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,tune]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Lint and type checks first (seconds), then the tests.
test: $(STAMP)
	$(PY) -m ruff check rewriter passes backends tests examples benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

lint: $(STAMP)
	$(PY) -m ruff check rewriter passes backends tests examples benchmarks
	$(PY) -m mypy

clean:
	rm -rf $(VENV) out build *.egg-info
