# moesim: two commands on a fresh machine: `make demo`, then `make test`.
# Every install comes from the lock (constraints.txt), so a new release of a dependency cannot
# turn a clean clone red; `make test-latest` meets the newest allowed versions on purpose and
# `make test-oldest` the lower bounds of pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
# aiconfigurator-core needs numpy >= 2.1: the oldest-bounds run leaves it out (its tests skip
# there; `make test` and CI install it and run them). The docs extra is built by make test.
EXTRAS_OLDEST := dev,trace,cuda,distributed
EXTRAS := $(EXTRAS_OLDEST),aiconfigurator,docs,notebooks
AIC_PROFILE := moesim/hardware/profiles/h100-sxm-aiconfigurator.yaml
LOCK   := constraints.txt
# The oldest transformers the project allows (pyproject.toml, constraints-oldest.txt): make test
# runs the capture tests on it too, overlaid on the locked environment.
TF_OLDEST := $(shell sed -n 's/^transformers==//p' constraints-oldest.txt)

.PHONY: demo test test-capture-oldest test-wheel test-latest test-oldest lock bench bench-b4 bench-scale \
	report-check docs notebooks \
	lint install dev clean profiles

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) -e .
	touch $@

$(DEVSTAMP): $(STAMP)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)
dev: $(DEVSTAMP)

demo: $(STAMP)
	$(BIN)/moesim run scenarios/quickstart.yaml

test: $(DEVSTAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-capture-oldest test-wheel docs

# The documentation site into build/docs, warnings as errors (its pages are assembled from
# README.md, ARCHITECTURE.md and the scenario models by docs/hooks.py).
docs: $(DEVSTAMP)
	$(BIN)/mkdocs build --strict --quiet

# Every notebook executed in a Jupyter kernel and rendered to build/notebooks/<name>.html, with
# the seconds each took in build/notebooks/times.json (make test runs and checks them too:
# tests/test_notebooks.py).
notebooks: $(DEVSTAMP)
	$(BIN)/python -m tests.notebooks build/notebooks

# Capture (and generate's positions) on the oldest transformers allowed.
test-capture-oldest: $(DEVSTAMP)
	@test -f .venv-tf-oldest/transformers-$(TF_OLDEST).stamp || { rm -rf .venv-tf-oldest && \
	  $(BIN)/pip install --quiet --no-deps --target .venv-tf-oldest transformers==$(TF_OLDEST) && \
	  touch .venv-tf-oldest/transformers-$(TF_OLDEST).stamp; }
	PYTHONPATH=.venv-tf-oldest MOESIM_EXPECT_TRANSFORMERS=$(TF_OLDEST) \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/traces/test_capture.py

# A wheel installed into a clean venv finds its scenarios' presets and profiles from elsewhere.
test-wheel: $(DEVSTAMP)
	rm -rf build/wheel .venv-wheel
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w build/wheel .
	$(PYTHON) -m venv .venv-wheel
	.venv-wheel/bin/pip install --quiet -c $(LOCK) build/wheel/moesim-*.whl
	.venv-wheel/bin/python tests/installed_check.py $(CURDIR)/scenarios

test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet --upgrade -e '.[$(EXTRAS)]'
	.venv-latest/bin/pip list 2>/dev/null | grep -iE '^(numpy|pandas|pydantic|transformers|typer) '
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

test-oldest:
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install --quiet --upgrade pip
	.venv-oldest/bin/pip install --quiet -c constraints-oldest.txt -e '.[$(EXTRAS_OLDEST)]'
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider

# The shipped profile whose kernel tables are NVIDIA's measurements (aiconfigurator-core);
# tests/calibration/test_aiconfigurator.py checks that this command reproduces it byte for byte.
profiles: $(DEVSTAMP)
	rm -f $(AIC_PROFILE)
	$(BIN)/moesim calibrate --from aiconfigurator --system h100_sxm --backend sglang \
	  --model deepseek-v3 --model mixtral-8x7b --out $(AIC_PROFILE)

# Rewrite the lock from the newest allowed versions (then run make test and commit it).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -e '.[$(EXTRAS)]'
	{ sed -n '1,2p' $(LOCK); .venv-lock/bin/pip freeze --exclude-editable | \
	  grep -v '^moesim' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

bench: $(DEVSTAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results.json
	$(BIN)/python benchmarks/b4_alltoall.py --out benchmarks/b4.json

# B4 (issue 4): a 1,024-GPU all-to-all phase, pxn and direct (target 2 s; direct takes ~70 s).
bench-b4: $(DEVSTAMP)
	$(BIN)/python benchmarks/b4_alltoall.py --out benchmarks/b4.json

# Render a fresh quick-start report in headless Chromium (system package): every figure must
# draw; the screenshot lands in results/report-check/ for a person to look at.
report-check: $(STAMP)
	rm -rf results/report-check
	$(BIN)/moesim run scenarios/quickstart.yaml --out results/report-check > /dev/null
	$(BIN)/python -m moesim.results.screenshot results/report-check/quickstart/*/report.html \
		--png results/report-check/report.png

bench-scale: $(DEVSTAMP)
	$(BIN)/python benchmarks/scale.py --out benchmarks/scale.json

lint: $(DEVSTAMP)
	$(BIN)/ruff check moesim tests benchmarks docs notebooks
	$(BIN)/ruff format --check moesim tests benchmarks docs notebooks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .venv-* build *.egg-info
