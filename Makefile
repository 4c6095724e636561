# Quick start: `make demo` (captions the sample photos locally) and `make test`.
# Both create .venv and install what they need; torch is pinned to the CPU build here.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TORCH ?= torch==2.13.0

.PHONY: demo test lint services tools clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(INSTALLED)
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
