# Quick start: `make run` (the default simulation) and `make test` (the test suite).
# Each creates .venv with the project installed when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-slow test-all test-notebooks docs lint bench bench-peers bench-gpu clean

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

# The docs and notebook tools are extras of their own: installed into .venv on first use.
$(VENV)/.docs: $(BIN)/fedjax-sim pyproject.toml
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

$(VENV)/.notebooks: $(BIN)/fedjax-sim pyproject.toml
	$(BIN)/pip install --quiet -e ".[notebooks]"
	touch $@

# Every notebook run top to bottom on the CPU with its small settings (each under a minute).
test-notebooks: $(VENV)/.notebooks
	$(BIN)/pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=300 notebooks/

# The API reference and the pages of docs/ into site/; any warning fails the build.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

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
	rm -rf $(VENV) runs site .pytest_cache
