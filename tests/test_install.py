"""The install: the core package needs no Triton, no DALI and no scikit-image (they are extras), and inference
works without them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import blocked_python, requirement_name, write_tiny_checkpoint

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = {"triton", "nvidia-dali-cuda120", "scikit-image"}


def test_core_dependencies_are_light_and_the_extras_hold_the_rest():
    core = {requirement_name(r) for r in PYPROJECT["dependencies"]}
    assert core == {"torch", "numpy", "pyyaml", "tqdm", "pillow", "tifffile", "imagecodecs"}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in PYPROJECT["optional-dependencies"].items()}
    assert extras["triton"] == {"triton"} and extras["dali"] == {"nvidia-dali-cuda120"}
    assert extras["demo"] == {"scikit-image"}
    # [dev] is everything the tests need: every other extra (through the project itself) and the test tools.
    dev = PYPROJECT["optional-dependencies"]["dev"]
    self_extras = {e.strip() for r in dev if requirement_name(r) == "lfpv_fast"
                   for e in re.search(r"\[(.*)\]", r).group(1).split(",")}
    assert self_extras == set(extras) - {"dev"}, "a new extra must be added to [dev]"
    assert {"pytest", "ruff", "hypothesis", "pytest-benchmark"} <= extras["dev"]
    assert "pip install --no-compile -e '.[dev]'" in (ROOT / "Makefile").read_text()  # make test installs everything


def test_enhance_and_the_other_tools_work_without_triton_dali_and_scikit_image(tmp_path):
    write_tiny_checkpoint(tmp_path / "tiny.pth")
    pixels = np.random.default_rng(0).integers(0, 50, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "dark.png")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([*blocked_python(["triton", "nvidia.dali", "skimage"], report=True), *map(str, args)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    done = run("-m", "lfpv_fast.enhance", "dark.png", "--checkpoint", "tiny.pth", "-o", "out", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "blocked modules loaded: []" in done.stderr
    with Image.open(tmp_path / "out" / "dark.png") as im:
        assert im.size == (24, 20)
    imported = run("import", "lfpv_fast.train", "lfpv_fast.training.trainer", "lfpv_fast.evaluate", "lfpv_fast.prepare",
                   "lfpv_fast.pipelines", "lfpv_fast.data.loaders")
    assert imported.returncode == 0 and "blocked modules loaded: []" in imported.stderr, imported.stderr
