"""The prepared cache under faults: a finished cache stays usable until a new complete manifest replaces it (a bad
new frame, a full disk, a rebuild cut short), no temporary file is left, and --resize is bounded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import folder_snapshot
from lfpv_fast.config import config_from_dict
from lfpv_fast.data.cache import MANIFEST, read_manifest
from lfpv_fast.data.errors import DataError
from lfpv_fast.data.loaders import build_loader
from lfpv_fast.data.smid import check_npy_header
from lfpv_fast.prepare import main as prepare_main
from lfpv_fast.prepare import prepare

SIZE = (32, 32)  # (w, h) of the cache: 3 KiB a frame


def write_scene(root: Path, scene: str, frames: int, seed: int, hw: tuple[int, int] = (40, 40)) -> None:
    """An SMID-layout scene: <root>/lq/<scene>/NNNN.npy frames and <root>/gt/<scene>/long.npy."""
    rng = np.random.default_rng(seed)
    (root / "lq" / scene).mkdir(parents=True, exist_ok=True)
    (root / "gt" / scene).mkdir(parents=True, exist_ok=True)
    for k in range(frames):
        np.save(root / "lq" / scene / f"{k:04d}.npy", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    np.save(root / "gt" / scene / "long.npy", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


def raw_dataset(root: Path) -> Path:
    for i, scene in enumerate(("s1", "s2", "t1")):
        write_scene(root, scene, 3, seed=i)
    (root / "test.txt").write_text("t1\n")
    return root


def assert_usable(cache: Path, raw: Path, size: tuple[int, int] = SIZE) -> None:
    """The manifest reads, every frame it lists is complete, and the loader trains on it."""
    tree = read_manifest(cache)
    assert tree.stored_size == size
    for scene in tree.scenes:
        assert check_npy_header(tree.gt_path(scene)) == (size[1], size[0], 3)
        for frame in scene.frames:
            assert check_npy_header(tree.lq_path(scene, frame)) == (size[1], size[0], 3)
            np.load(tree.lq_path(scene, frame))
    cfg = config_from_dict({"data": dict(prepared_root=str(cache), test_scenes=str(raw / "test.txt"),
                                         resize=list(size), crop=16, batch_size=2, num_workers=0)})
    assert len(list(build_loader(cfg, "train", log=lambda _: None))) == 3


def assert_nothing_half_written(cache: Path) -> None:
    """No temporary file anywhere, and every frame file there is complete."""
    assert [p for p in cache.rglob("*") if p.name.endswith(".tmp")] == []
    for p in cache.rglob("*.npy"):
        np.load(p)  # a torn file would not load


def test_a_bad_new_frame_leaves_the_finished_cache_as_it_was(tmp_path, capsys):
    raw = raw_dataset(tmp_path / "raw")
    cache = tmp_path / "cache"
    prepare(raw / "lq", raw / "gt", cache, SIZE, workers=2, progress=False)
    before = folder_snapshot(cache)
    # New frames arrive, one of them cut short; one scene's frames sort before it so they would be written first.
    write_scene(raw, "s0", 3, seed=7)
    bad = raw / "lq" / "s2" / "0009.npy"
    np.save(bad, np.zeros((40, 40, 3), np.uint8))
    bad.write_bytes(bad.read_bytes()[:-100])
    code = prepare_main(["--lq", str(raw / "lq"), "--gt", str(raw / "gt"), "--out", str(cache), "--resize", "32",
                         "32", "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {bad}: truncated .npy file") and err.count("\n") == 1
    assert folder_snapshot(cache) == before  # nothing written or removed: the manifest and its frames as they were
    assert_usable(cache, raw)


def test_a_full_disk_during_prepare_keeps_the_old_cache_and_leaves_no_temporary_file(tmp_path, small_filesystem,
                                                                                     capsys):
    raw = raw_dataset(tmp_path / "raw")
    disk = small_filesystem(160)  # KiB: the first cache fits, the grown dataset does not
    cache = disk / "cache"
    prepare(raw / "lq", raw / "gt", cache, SIZE, workers=2, progress=False)
    manifest = (cache / MANIFEST).read_bytes()
    for i in range(4):
        write_scene(raw, f"n{i}", 10, seed=10 + i)
    code = prepare_main(["--lq", str(raw / "lq"), "--gt", str(raw / "gt"), "--out", str(cache), "--resize", "32",
                         "32", "--no-progress", "--workers", "2"])
    assert (cache / MANIFEST).read_bytes() == manifest  # the old manifest, untouched
    assert_nothing_half_written(cache)
    assert_usable(cache, raw)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err  # a write that fails during the work: status 1 (README)
    assert err.startswith(f"error: {cache}") and "No space left on device" in err
    assert "frames finished so far are kept" in err


def test_a_rebuild_that_fills_the_disk_keeps_the_old_cache(tmp_path, small_filesystem, capsys):
    raw = raw_dataset(tmp_path / "raw")
    disk = small_filesystem(120)
    cache = disk / "cache"
    prepare(raw / "lq", raw / "gt", cache, SIZE, workers=2, progress=False)
    before = folder_snapshot(cache)
    # --overwrite at 64x64 (12 KiB a frame): the new cache does not fit beside the old one.
    code = prepare_main(["--lq", str(raw / "lq"), "--gt", str(raw / "gt"), "--out", str(cache), "--resize", "64",
                         "64", "--no-progress", "--overwrite"])
    assert {k: v for k, v in folder_snapshot(cache).items() if not k.startswith(".rebuild/")} == before
    assert_nothing_half_written(cache)
    assert_usable(cache, raw)
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1, err


def test_a_rebuild_replaces_the_cache_only_when_complete(tmp_path):
    raw = raw_dataset(tmp_path / "raw")
    cache = tmp_path / "cache"
    prepare(raw / "lq", raw / "gt", cache, SIZE, workers=2, progress=False)
    report = prepare(raw / "lq", raw / "gt", cache, (48, 40), workers=2, progress=False, overwrite=True)
    assert report.replaced_size == SIZE and report.written == 12
    assert json.loads((cache / MANIFEST).read_text())["resize"] == [48, 40]
    assert sorted(p.name for p in cache.iterdir()) == ["gt", "lq", MANIFEST]  # no staging folder left
    assert_usable(cache, raw, (48, 40))


def test_resize_has_an_upper_bound_checked_before_anything_is_done(tmp_path, capsys):
    raw = raw_dataset(tmp_path / "raw")
    out = tmp_path / "cache"
    code = prepare_main(["--lq", str(raw / "lq"), "--gt", str(raw / "gt"), "--out", str(out), "--resize", "100000",
                         "100000", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --resize 100000 100000 is 10000000000 pixels a frame; at most 33554432")
    assert not out.exists()
    with pytest.raises(ValueError, match="--resize W H must be two numbers >= 1, got 0 5"):
        prepare(raw / "lq", raw / "gt", out, (0, 5), progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(out)
