# orca_compiler developer commands. `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install. torch==2.13.0 resolves to the CPU build on our machines (a local
# wheel); set TORCH_SPEC="torch" (or a CUDA index) for another build. The package itself only
# requires torch>=2.5.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/orca demo

# Two workers, a test module (or class) per worker at a time, so module fixtures are built once:
# 13 min on our 2-core machines where one worker took 24.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

# The benchmark of docs/benchmarks.md (many minutes): installs the peers (onnxruntime) first.
bench: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/orca bench --write-docs

clean:
	rm -rf $(VENV) .pytest_cache
