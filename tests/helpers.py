"""Helpers shared by the test modules (a plain module: test modules import from here, never from each
other). The tests' small model and its checkpoint, the CLI-error assertions, image files (PNGs, PNG bombs),
an import blocker for subprocesses, SMID trees on disk and preset configs, an OpenCV resize twin, the kernel
tests' tolerance check, a folder's snapshot, a free TCP port, a requirement's name."""

from __future__ import annotations

import dataclasses
import re
import socket
import struct
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lfpv_fast import ModelConfig
from lfpv_fast.config import config_from_dict

# The device the kernel tests run on: the GPU where there is one, else the CPU under the Triton interpreter
# (tests/conftest.py sets TRITON_INTERPRET there; tests/kernels/conftest.py skips the folder otherwise).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ---------------------------------------------------------------------------------------------
# The tests' model

# Small enough for the CPU interpreter; 4 bank entries keep the banks' loops short. The tiling tests'
# tolerances (test_enhance.py) hold for this model's random weights: check them after a change here.
TINY = ModelConfig(nf=8, hr_nf=8, light_blocks=1, layers=1, heads=2, head_dim=8, ffn_dim=32, bank_size=4)


def write_tiny_checkpoint(path: Path) -> Path:
    """A weights-only checkpoint of TINY (seed 0, reference backend) at `path`, with non-zero banks so that
    the LFPV fusion takes part. The same bytes on every call."""
    from lfpv_fast import LFPVNet
    from lfpv_fast.training.checkpoint import atomic_save, weights_only_checkpoint

    torch.manual_seed(0)
    net = LFPVNet(TINY, backend="reference")
    with torch.no_grad():
        net.bank_vectors.normal_()
        net.bank_patches.normal_()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(weights_only_checkpoint(net), path)
    return path


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


def one_error_line(err: str, *named: str) -> str:
    """The one non-blank line of `err`, which starts with "error: " and contains every text in `named`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def assert_one_line_error(code: int, err: str, *named: str) -> str:
    """A usage error: exit status 2 and one_error_line(err, *named)."""
    assert code == 2, err
    return one_error_line(err, *named)


# ---------------------------------------------------------------------------------------------
# Image files


def write_png(path: Path, rgb: np.ndarray, bits: int = 8) -> Path:
    """An RGB (or gray) PNG of uint8 `rgb`; bits=16 stores v * 257 (the same value in [0, 1]) through
    imagecodecs, and skips the test where imagecodecs is missing (a bare GPU machine). Makes the folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        try:
            import imagecodecs
        except ImportError:
            pytest.skip("writing 16-bit PNG needs imagecodecs, which is not installed")
        path.write_bytes(bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb.astype(np.uint16) * 257))))
    else:
        Image.fromarray(np.ascontiguousarray(rgb)).save(path)
    return path


def write_noise_png(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """An 8-bit RGB PNG of uniform noise: incompressible, so an enhanced copy is about as large as it."""
    write_png(path, np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, side: int, bit_depth: int = 8, color_type: int = 0) -> Path:
    """A PNG of a few hundred bytes declaring a side x side image (default 8-bit gray); its data is a
    deflated prefix of zero rows."""
    header = struct.pack(">IIBBBBB", side, side, bit_depth, color_type, 0, 0, 0)
    data = zlib.compress(b"\0" * 65536, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
                     + png_chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------
# A Python where some modules cannot be imported (as on a bare machine without them), for subprocesses

IMPORT_BLOCKER = textwrap.dedent("""
    import importlib.abc, runpy, sys

    BLOCKED = tuple(m for m in sys.argv[1].split(",") if m)
    REPORT = sys.argv[2] == "report"

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    try:
        if sys.argv[3] == "-m":
            sys.argv = sys.argv[4:]
            runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        elif sys.argv[3] == "import":
            for module in sys.argv[4:]:
                __import__(module)
        else:
            sys.argv = sys.argv[3:]
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        if REPORT:
            loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
            print("blocked modules loaded:", loaded, file=sys.stderr)
""")


def blocked_python(blocked: list[str], report: bool = False) -> list[str]:
    """The start of a command line for a Python in which the modules `blocked` (and their submodules) cannot
    be imported; what follows is `-m MODULE ARGS...`, `SCRIPT ARGS...` or `import MODULE...`. With
    report=True it ends by printing to stderr which blocked modules got loaded anyway
    ("blocked modules loaded: []" when none)."""
    return [sys.executable, "-c", IMPORT_BLOCKER, ",".join(blocked), "report" if report else "quiet"]


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


def preset_cfg(root: Path, preset: str, **data):
    """A config reading the image-pair preset `preset` (a LOL layout) from `root`, small and single-process."""
    d = dict(dataset=preset, root=str(root), resize=None, crop=16, batch_size=2, num_workers=0, num_threads=1)
    d.update(data)
    return config_from_dict({"data": d})


def assert_close(actual: torch.Tensor, truth: torch.Tensor, rel: float, ulp: float = 0.0,
                 scale: float | torch.Tensor | None = None, what: str = "") -> None:
    """|actual - truth| <= rel * scale + ulp * |truth| elementwise (scale: max |truth| unless given), finite and of
    the same shape: the kernel tests' comparison with their twin. An unwritten (NaN-poisoned) output fails."""
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(truth.shape)}"
    actual, truth = actual.double(), truth.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten poisoned output?)"
    scale = truth.abs().max() if scale is None else scale
    err = (actual - truth).abs()
    bound = rel * scale + ulp * truth.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: error {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} "
                                  f"(max error {err.max():.3e}, scale {float(scale):.3e})")


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name) and its bytes: to show that something changed nothing."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requirement_name(requirement: str) -> str:
    """The package name of a requirement line ('torch>=2.4; ...' -> 'torch'), lower case."""
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()


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
