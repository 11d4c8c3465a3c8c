# Quick start: `make run` (the default simulation) and `make test` (the test suite).
# Each creates .venv with the project installed when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-all lint bench clean

$(BIN)/fedjax-sim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/fedjax-sim
	$(BIN)/fedjax-sim run

test: $(BIN)/fedjax-sim
	$(BIN)/pytest -q -m "not slow"

test-all: $(BIN)/fedjax-sim
	$(BIN)/pytest -q

lint: $(BIN)/fedjax-sim
	$(BIN)/ruff check .

bench: $(BIN)/fedjax-sim
	$(BIN)/python benchmarks/core.py

clean:
	rm -rf $(VENV) runs .pytest_cache
