# Quick start: `make demo` trains the whole zoo briefly on its embedded data and writes a report;
# `make test` runs the linter and the test suite. Both create .venv and install the package
# (editable, with its dev extra) the first time, and reuse it afterwards. Each stage prints one
# line; pip runs quietly, without setuptools' banner about editable installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zoo-installed
PYTEST_ARGS ?=
QUIET_BUILD := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: demo test lint install clean

demo: $(STAMP)
	@echo "make: running zoo demo"
	@$(BIN)/zoo demo

test: $(STAMP)
	@echo "make: running ruff"
	@$(BIN)/ruff check .
	@echo "make: running the tests"
	@$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	@echo "make: running ruff"
	@$(BIN)/ruff check .

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "zoo needs Python >= 3.10; run make PYTHON=python3.X")'
	@test -x $(BIN)/python || { echo "make: creating the environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing zoo and its dependencies into $(VENV) (the first time takes a few minutes)"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(QUIET_BUILD) $(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
