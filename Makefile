# `make test` creates .venv, installs torch (pinned) and then the project with its [dev] extra, which holds
# every other extra (Triton, DALI, the demo's scikit-image) and the test tools.
# Which torch build pip picks depends on where it looks: on a plain machine PyPI's Linux wheel is the CUDA
# build (a few GB, with its own triton). For the CPU build there, point pip at PyTorch's CPU wheel index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv test lint demo bench gpu-check compile-gate clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

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

# On a machine with a GPU, in whatever Python holds CUDA torch (.venv if there is one, else python3; or
# GPU_PY=...): creates no venv and downloads nothing; installs this checkout into that Python offline
# (--no-index --no-deps --no-build-isolation), then the kernel tests, the golden case on Triton, a training run
# with every fast switch and the frame benchmark, within ARGS' --budget (default 480 s). See README, "GPU check".
#   make gpu-check GPU_PY=python3 ARGS="--budget 480 --out /tmp/gpu-check"
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
ARGS ?=
gpu-check:
	$(GPU_PY) -u bench/gpu_check.py $(ARGS)

# Every Triton launch compiled ahead of time for sm_90 and sm_80 (no GPU needed); tables in bench/results.
compile-gate: venv
	$(BIN)/python -m lfpv_fast.kernels.compile_gate --json bench/results/compile-triton-$$($(BIN)/python -c 'import triton; print(triton.__version__)').json \
		--markdown bench/results/compile-triton-$$($(BIN)/python -c 'import triton; print(triton.__version__)').md

clean:
	rm -rf $(VENV) build *.egg-info
