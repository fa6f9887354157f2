# Two entry points for a fresh machine: `make run` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run demo test lint bench

# setup.py and the C sources too: the editable install compiles the C extensions into lmcache/.
$(STAMP): pyproject.toml setup.py $(wildcard lmcache/*.c lmcache/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[redis,test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: the cache server on its embedded defaults (tcp://127.0.0.1:5555 and ipc:///tmp/lmcache.sock).
run: $(STAMP)
	$(PY) -m lmcache.v1.multiprocess.server

demo: $(STAMP)
	$(PY) -m lmcache.demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check lmcache tests benchmarks
	$(VENV)/bin/ruff format --check lmcache tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py
