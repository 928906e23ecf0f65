# Quick start: `make demo` trains the whole zoo briefly on its embedded data and writes a report;
# `make test` runs the linter and the test suite. Both create .venv and install the package
# (editable, with its dev extra) the first time, and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zoo-installed
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(BIN)/zoo demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "zoo needs Python >= 3.10; run make PYTHON=python3.X")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
