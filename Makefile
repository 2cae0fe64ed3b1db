# moesim: two commands on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: demo test bench bench-b4 lint install dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEVSTAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,trace,cuda,distributed]'
	touch $@

install: $(STAMP)
dev: $(DEVSTAMP)

demo: $(STAMP)
	$(BIN)/moesim run scenarios/quickstart.yaml

test: $(DEVSTAMP)
	$(BIN)/python -m pytest -q

bench: $(DEVSTAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results.json

# B4 (issue 4): a 1,024-GPU all-to-all phase, pxn and direct (target 2 s; direct takes ~70 s).
bench-b4: $(DEVSTAMP)
	$(BIN)/python benchmarks/b4_alltoall.py --out benchmarks/b4.json

lint: $(DEVSTAMP)
	$(BIN)/ruff check moesim tests benchmarks
	$(BIN)/ruff format --check moesim tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
