# `make test` works on a fresh CPU-only machine: it pins the CPU build of torch first so that
# pip never pulls a multi-GB CUDA build, then installs the project with its dev extra.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python -m lfpv_fast.train

bench: venv
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
