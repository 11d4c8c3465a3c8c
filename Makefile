# Quick start: `make run` (the default simulation) and `make test` (the test suite).
# Each creates .venv with the project installed when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-slow test-all lint bench bench-peers bench-gpu clean

$(BIN)/fedjax-sim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/fedjax-sim
	$(BIN)/fedjax-sim run

# Tests run in worker processes, one per core (at most 4: each holds its own compiled programs).
XDIST := -n auto --maxprocesses 4

test: $(BIN)/fedjax-sim
	$(BIN)/pytest -q $(XDIST) -m "not slow"

# Slow tests (real subprocesses killed mid-run, the benchmark suite end to end): CI runs them.
test-slow: $(BIN)/fedjax-sim
	$(BIN)/pytest -q $(XDIST) -m slow

test-all: $(BIN)/fedjax-sim
	$(BIN)/pytest -q $(XDIST)

lint: $(BIN)/fedjax-sim
	$(BIN)/ruff check .

# The CPU benchmark suite against the peers (run bench-peers first to include them).
bench: $(BIN)/fedjax-sim
	$(BIN)/python benchmarks/suite.py cpu

bench-peers:
	benchmarks/peers/setup.sh

# On a GPU machine, with a CUDA jaxlib installed into .venv.
bench-gpu: $(BIN)/fedjax-sim
	$(BIN)/python benchmarks/suite.py gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
