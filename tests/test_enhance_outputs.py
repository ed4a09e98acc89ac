"""Files that enhance writes: the usual permissions, and side-by-side names that collide across calls."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, run
from lfpv_fast import enhance as enhance_cli


def write_dark_image(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 60, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_follow_the_umask(tmp_path, tiny_checkpoint, umask_022):
    src = write_dark_image(tmp_path / "a.png", 0)
    out = tmp_path / "out"
    assert enhance_cli.main([str(src), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--side-by-side",
                             "-q"]) == 0
    for name in ("a.png", "a_side_by_side.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_a_side_by_side_collision_across_calls_is_reported(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "in1").mkdir()
    (tmp_path / "in2").mkdir()
    first = write_dark_image(tmp_path / "in1" / "a.png", 0)
    second = write_dark_image(tmp_path / "in2" / "a.jpg", 1)
    out = tmp_path / "out"
    assert enhance_cli.main([str(first), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--side-by-side",
                             "-q"]) == 0
    side = out / "a_side_by_side.png"
    before = side.read_bytes()

    # Within one call the two inputs are refused; a later call must not silently keep the stale file either.
    code, err = run(enhance_cli.main, [second, "--checkpoint", tiny_checkpoint, "-o", out, "--side-by-side", "-q"],
                    capsys)
    assert_one_line_error(code, err, str(side), "a.png", str(second))
    assert side.read_bytes() == before and not (out / "a.jpg").exists()

    # Enhancing the same input again is not a collision: its outputs exist and are skipped.
    assert enhance_cli.main([str(first), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--side-by-side",
                             "-q"]) == 0
    # --overwrite replaces the earlier side-by-side on purpose.
    assert enhance_cli.main([str(second), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--side-by-side",
                             "--overwrite", "-q"]) == 0
    assert side.read_bytes() != before and (out / "a.jpg").is_file()
