# Two virtual environments, one per use:
# - `make test` creates .venv, installs torch (pinned) and then the project with its [dev] extra, which holds
#   every other extra (Triton, DALI, the demo's scikit-image, the app's gradio) and the test tools.
#   Which torch build pip picks depends on where it looks: on a plain machine PyPI's Linux wheel is the CUDA
#   build (a few GB, with its own triton). For the CPU build there, point pip at PyTorch's CPU wheel index:
#     make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# - `make demo` creates .venv-demo with the CPU build of torch (the demo trains on the CPU; DEMO_TORCH_INDEX=
#   empty takes pip's default index instead) and the project with its [demo] extra only: no triton, DALI,
#   gradio or selenium.
#   Where PyTorch's CPU wheel index cannot be reached, make demo says so and takes pip's default index.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_VENV := .venv-demo
DEMO_BIN := $(DEMO_VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# `--index-url $(DEMO_TORCH_INDEX)` when that index answers within 5 s; otherwise bench/torch_index.py says so and
# make demo takes pip's default index at once (pip itself would retry for minutes). Expanded only by the demo
# venv's recipe, make -n included.
DEMO_TORCH_INDEX_ARGS = $(if $(DEMO_TORCH_INDEX),$(shell $(PY) bench/torch_index.py '$(DEMO_TORCH_INDEX)'))

# The oldest Triton the kernels must compile with (what torch 2.11 ships): installed from its wheel
# beside the venv's newest, without dependencies, for the compile gate only (`make test` runs the gate
# with both: tests/test_compile_gate.py, LFPV_OLD_TRITON names the folder).
OLD_TRITON ?= 3.6.0
OLD_TRITON_DIR := $(VENV)/triton-$(OLD_TRITON)

.PHONY: venv demo-venv old-triton test lint demo bench gpu-check compile-gate clean

# pip compiles every installed file to bytecode on one core (20 s of the install here); --no-compile and then
# compileall on every core instead. Its exit status is ignored as pip ignores the same failures: a few files
# in torch are written for a newer Python than the venv's and cannot compile.
$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install --no-compile '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $@

venv: $(VENV)/.installed

$(DEMO_BIN)/python:
	$(PY) -m venv $(DEMO_VENV)
	$(DEMO_BIN)/pip install --upgrade pip
	$(DEMO_BIN)/pip install '$(TORCH)' $(DEMO_TORCH_INDEX_ARGS)

$(DEMO_VENV)/.installed: $(DEMO_BIN)/python pyproject.toml
	$(DEMO_BIN)/pip install -e '.[demo]'
	touch $@

demo-venv: $(DEMO_VENV)/.installed

$(OLD_TRITON_DIR)/.installed: $(BIN)/python
	$(BIN)/pip install --no-deps --target $(OLD_TRITON_DIR) 'triton==$(OLD_TRITON)'
	touch $@

old-triton: $(OLD_TRITON_DIR)/.installed

lint: venv
	$(BIN)/ruff check .

# pytest-xdist: TEST_WORKERS processes (the CI machine has 2 cores). --dist loadfile: all the tests of a file run on
# one worker, one after another, so tests that must not overlap share a file: the app's served-app tests and the
# distributed ones each pick a free port, gpu_check's runner tests give their subprocesses budgets of seconds.
# (Not loadgroup: pytest-xdist 3.8 marks a group by renaming the test, which pytest 9 no longer lets it do.)
TEST_WORKERS ?= 2
test: venv old-triton
	$(BIN)/ruff check .
	LFPV_OLD_TRITON=$(OLD_TRITON_DIR) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

demo: demo-venv
	$(DEMO_BIN)/python -m lfpv_fast.train

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

# Every Triton launch compiled ahead of time for sm_90 and sm_80 (no GPU needed), with the venv's newest
# Triton and with $(OLD_TRITON) in one run (launches recorded once, each distinct specialisation compiled
# once per version); a report per version in bench/results/compile-triton-VERSION.{json,md}.
compile-gate: venv old-triton
	$(BIN)/python bench/compile_gate.py --also-triton $(OLD_TRITON_DIR) --out bench/results

clean:
	rm -rf $(VENV) $(DEMO_VENV) build *.egg-info
