# The test commands (README "Quick start", development paragraph); .ci/run runs `make test`.
#   make test    set up whatever is missing, then `make lint` and the whole suite (what CI runs)
#   make quick   set up whatever is missing, then the tests not marked slow (about 15 min on 2 cores), the
#                smoke runs of every study in tools/ included
#   make lint    lint-imports (the package's layer contracts, pyproject.toml [tool.importlinter]),
#                ruff check and ruff format --check on the whole tree (pyproject.toml [tool.ruff])
#   make setup   only the setup that `make test` does
# Extra pytest arguments: make test PYTEST_ARGS="-k onnx" (or make quick PYTEST_ARGS=...).
# Every setup step is skipped when what it makes is already there.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:

PYTHON ?= python3
PYTEST_ARGS ?=
VENV := .venv
# pytest-xdist workers: the suite is mostly single-threaded tracing and exporting, so two
# workers on the 2-core CI machine take about two thirds of the time one takes
# (tests/conftest.py keeps each costly fixture in one worker).
WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -q -n $(WORKERS) --dist loadgroup
# Touched after the editable install: a pyproject.toml (or constraints.txt) newer than it
# means a changed dependency list, so the install runs again.
VENV_STAMP := $(VENV)/.bsbr-export-installed
PYTRITON_VERSION := 0.7.0
TRITON_STAMP := .venv-triton/.nvidia-pytriton-$(PYTRITON_VERSION)-tokenizers-installed
AIPERF_VERSION := 0.13.0
AIPERF_STAMP := .venv-aiperf/.aiperf-$(AIPERF_VERSION)-installed
# npm writes node_modules/.package-lock.json once an install has finished (npm ci starts by
# removing node_modules, so a failed one leaves none).
NODE_MODULES := samples/node/node_modules/.package-lock.json
# --format web copies onnxruntime-web's files from here; the browser tests drive Chromium
# with puppeteer-core (no browser download: the system's chromium).
WEB_MODULES := web/node_modules/.package-lock.json

.PHONY: test quick lint setup toolchain

test: setup lint
	$(PYTEST) $(PYTEST_ARGS)

quick: setup
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

lint: $(VENV_STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

setup: toolchain $(NODE_MODULES) $(WEB_MODULES) $(TRITON_STAMP) $(AIPERF_STAMP) $(VENV_STAMP)

# The C++ sample test builds against the torch wheel's libtorch: it needs cmake and a compiler.
# The generate model's tests call Triton's generate extension with curl, as its users do;
# the web page's tests run it in Debian's Chromium, headless; the proxy's tests put two
# OpenAI-compatible servers behind Debian's nginx (in /usr/sbin, off some users' PATH).
toolchain:
	command -v cmake >/dev/null && command -v c++ >/dev/null && command -v curl >/dev/null && command -v chromium >/dev/null && { command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || { apt-get update && apt-get install -y --no-install-recommends cmake g++ curl chromium nginx; }

# The Node.js sample: onnxruntime-node's CPU binaries ship in the npm package; its
# postinstall would fetch from outside the registry, so it is skipped.
$(NODE_MODULES): samples/node/package-lock.json
	(cd samples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund)
	touch $@

$(WEB_MODULES): web/package-lock.json
	npm ci --prefix web --no-audit --no-fund --ignore-scripts
	touch $@

# The Triton tests start a real tritonserver from the nvidia-pytriton wheel, in a venv of its
# own (docs/serving.md): it needs numpy<2, the project's venv has numpy 2; its
# own dependencies serve PyTriton's Python API, unused here (--no-deps). tokenizers: the
# generate model's text for exports with a tokenizer.json.
$(TRITON_STAMP):
	$(PYTHON) -m venv .venv-triton && .venv-triton/bin/pip install "numpy<2" onnxruntime tokenizers && .venv-triton/bin/pip install --no-deps "nvidia-pytriton==$(PYTRITON_VERSION)"
	touch $@

# NVIDIA's LLM benchmark, the client tools/openai_load.py drives the OpenAI-compatible server
# with: a venv of its own (its pins are not the project's; no torch).
$(AIPERF_STAMP):
	$(PYTHON) -m venv .venv-aiperf && .venv-aiperf/bin/pip install "aiperf==$(AIPERF_VERSION)"
	touch $@

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The README's venv, editable (the tests run this checkout) with the test extras; bsbr 0.1.1 is
# the upstream package whose checkpoints we import: its wheel says Python >= 3.12 but runs on
# 3.11 (--ignore-requires-python); --no-deps keeps pip from resolving its own requirements
# (an unpinned torch>=2.6, numpy>=2.2.4, pandas, seaborn, matplotlib) outside constraints.txt.
$(VENV_STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(VENV)/bin/pip install -c constraints.txt -e ".[dev,executorch,openvino,hf]"
	$(VENV)/bin/pip install --no-deps --ignore-requires-python bsbr==0.1.1
	touch $@
