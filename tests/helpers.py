"""Helpers shared by the test modules (a plain module: test modules import from here, never from each
other). The tests' small model, the CLI-error assertions, SMID trees on disk, an OpenCV resize twin."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lfpv_fast import ModelConfig
from lfpv_fast.config import config_from_dict

# ---------------------------------------------------------------------------------------------
# The tests' model

# Small enough for the CPU interpreter; 4 bank entries keep the banks' loops short. The tiling tests'
# tolerances (test_enhance.py) hold for this model's random weights: check them after a change here.
TINY = ModelConfig(nf=8, hr_nf=8, light_blocks=1, layers=1, heads=2, head_dim=8, ffn_dim=32, bank_size=4)


def model_overrides(config: ModelConfig) -> list[str]:
    """The `--set` overrides that give a run `config` (an SNR-Aware one): model.<option>=<value> and
    model.lfpv.<key>=<value> for the fields off the default."""
    default = ModelConfig()
    options = [f"model.{f.name}={getattr(config.options, f.name)}" for f in dataclasses.fields(config.options)
               if getattr(config.options, f.name) != getattr(default.options, f.name)]
    lfpv = [f"model.lfpv.{f.name}={getattr(config.lfpv, f.name)}" for f in dataclasses.fields(config.lfpv)
            if getattr(config.lfpv, f.name) != getattr(default.lfpv, f.name)]
    return options + lfpv


# The training tests' run: TINY with one wider head, a bigger bank and updater, on 64x48 demo frames, a
# checkpoint every 3 of 8 steps.
TINY_MODEL_RUN = model_overrides(dataclasses.replace(TINY, heads=1, head_dim=16, bank_size=8, updater_width=2))
TINY_RUN = [
    *TINY_MODEL_RUN,
    "data.resize=[64, 48]", "data.crop=32", "data.batch_size=24", "data.num_workers=0", "data.test_frames=1",
    "train.iterations=8", "train.checkpoint_every=3", "train.keep_checkpoints=2", "val.every=100",
    "val.save_images=1", "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
]

def tiny_config(demo_root: Path, *extra: str):
    """The training tests' run (TINY_RUN) on the demo dataset in `demo_root`, plus `extra` overrides."""
    from lfpv_fast.config import load_config

    return load_config("demo", [*TINY_RUN, f"data.demo_root={demo_root}", *extra])


def write_tiny_yaml(path: Path, demo_root: Path, *extra: str) -> Path:
    import yaml

    from lfpv_fast.config import config_to_dict

    path.write_text(yaml.safe_dump(config_to_dict(tiny_config(demo_root, *extra))))
    return path


def metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The command-line tools' error convention


def run(main: Callable[[list[str]], int], argv: list[str | Path], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit status and stderr of a CLI called in-process (argparse errors end in SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *named: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# SMID trees on disk


def write_tree(root: Path, lq: dict[str, list[np.ndarray]], gt: dict[str, np.ndarray], decoys: bool = True):
    """An SMID-layout tree. Decoy GT files ('a_half', 'a.ARW') sort before the real one, so a
    loader that ignored the skip rule would pair frames with the wrong GT."""
    for scene, frames in lq.items():
        (root / "lq" / scene).mkdir(parents=True, exist_ok=True)
        for k, f in enumerate(frames):
            np.save(root / "lq" / scene / f"{k:04d}.npy", f)
    for scene, g in gt.items():
        (root / "gt" / scene).mkdir(parents=True, exist_ok=True)
        np.save(root / "gt" / scene / "long.npy", g)
        if decoys:
            np.save(root / "gt" / scene / "a_half.npy", np.zeros_like(g))
            np.save(root / "gt" / scene / "a.ARW.npy", np.full_like(g, 255))
    return root / "lq", root / "gt"


def write_list(path: Path, scenes: list[str]) -> Path:
    path.write_text("# test scenes\n" + "".join(f"{s}\n" for s in scenes))
    return path


def make_cfg(root: Path, lq_root=None, gt_root=None, **data):
    d = {
        "lq_root": str(lq_root or root / "lq"),
        "gt_root": str(gt_root or root / "gt"),
        "test_scenes": str(root / "test.txt"),
        "num_workers": 0,
        "num_threads": 1,
    }
    d.update(data)
    return config_from_dict({"data": d})


def opencv_linear(src: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR in float64: half-pixel centres, clamped at the borders."""

    def taps(n_out: int, n_in: int):
        f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        i0 = np.floor(f).astype(int)
        frac = f - i0
        frac = np.where(i0 < 0, 0.0, frac)
        i0 = np.maximum(i0, 0)
        frac = np.where(i0 >= n_in - 1, 0.0, frac)
        i0 = np.minimum(i0, n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), frac

    y0, y1, fy = taps(out_h, src.shape[0])
    x0, x1, fx = taps(out_w, src.shape[1])
    s = src.astype(np.float64)
    rows = s[y0] * (1 - fy)[:, None, None] + s[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
