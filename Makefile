# Quick start: `make demo` (captions the sample photos locally) and `make test`.
# Both create .venv and install what they need; torch is pinned to the CPU build here.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TORCH ?= torch==2.13.0

.PHONY: demo test lint services clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(INSTALLED)
	$(BIN)/captioner demo

services:
	bash .ci/services

test: $(INSTALLED) services
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .captioner-demo .pytest_cache
