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
# pyproject.toml; everything else comes from the project's dependencies. The distributed
# extra (Ray) too: its default-suite test starts a local Ray of 2 CPUs (~25 s here, each
# Ray test failing after 240 s rather than hanging); the others are marked slow.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,tune,distributed]'
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
