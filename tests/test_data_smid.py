"""SMID reading: layout rules, the INTER_LINEAR resize, every bad input's error, and prepare."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import make_cfg, opencv_linear, write_list, write_tree
from lfpv_fast.config import config_from_dict
from lfpv_fast.data.cache import read_manifest
from lfpv_fast.data.errors import DataError
from lfpv_fast.data.loaders import build_loader
from lfpv_fast.data.smid import load_frame, resize_linear, scan_tree, split_pairs
from lfpv_fast.prepare import main as prepare_main
from lfpv_fast.prepare import prepare

# ---------------------------------------------------------------------------------------------
# Resize


@pytest.mark.parametrize("in_hw,out_wh", [((53, 37), (24, 40)), ((53, 37), (80, 100)), ((7, 5), (11, 13))])
def test_resize_linear_matches_opencv_formula(in_hw, out_wh):
    src = np.random.default_rng(0).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    out = resize_linear(src, *out_wh)
    ref = opencv_linear(src, *out_wh)
    assert out.dtype == np.uint8 and out.shape == (out_wh[1], out_wh[0], 3)
    # uint8 rounding of the exact formula: never more than half a level (+ float32 slack) away.
    assert np.abs(out - ref).max() <= 0.52
    assert (resize_linear(src, in_hw[1], in_hw[0]) == src).all()  # same size: identity


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("resize", [[24, 40], [80, 100]])
def test_loader_resize_matches_opencv_formula(tmp_path, loader, resize):
    rng = np.random.default_rng(1)
    raw = {s: [rng.integers(0, 256, (53, 37, 3), dtype=np.uint8) for _ in range(2)] for s in ("a", "t")}
    write_tree(tmp_path, raw, {s: rng.integers(0, 256, (53, 37, 3), dtype=np.uint8) for s in raw})
    write_list(tmp_path / "test.txt", ["t"])
    cfg = make_cfg(tmp_path, resize=resize, crop=16, batch_size=1, loader=loader)
    batches = list(build_loader(cfg, "test"))
    assert [b["frame"][0] for b in batches] == ["0000", "0001"]
    for b, src in zip(batches, raw["t"], strict=True):
        got = b["lq"][0].permute(1, 2, 0).numpy() * 255.0
        ref = opencv_linear(src[:, :, ::-1], *resize)  # stored BGR, delivered RGB
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 0.52


# ---------------------------------------------------------------------------------------------
# Layout rules


def test_gt_rule_test_split_and_frame_limit(tmp_path):
    rng = np.random.default_rng(2)
    img = lambda: rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    write_tree(tmp_path, {"s1": [img() for _ in range(3)], "t1": [img() for _ in range(5)]}, {"s1": img(), "t1": img()})
    tree = scan_tree(tmp_path / "lq", tmp_path / "gt")
    assert [s.gt for s in tree.scenes] == ["long.npy", "long.npy"]  # decoys a_half / a.ARW skipped
    train = split_pairs(tree, ["t1"], 3, "train")
    test = split_pairs(tree, ["t1"], 3, "test")
    assert [(p.scene, p.frame) for p in train] == [("s1", "0000"), ("s1", "0001"), ("s1", "0002")]
    assert [(p.scene, p.frame) for p in test] == [("t1", "0000"), ("t1", "0001"), ("t1", "0002")]
    assert all(p.gt == tmp_path / "gt" / p.scene / "long.npy" for p in train + test)


# ---------------------------------------------------------------------------------------------
# Bad input: every case names the offending file or folder, from the loader and from prepare.


def _good_tree(root: Path) -> None:
    rng = np.random.default_rng(3)
    img = lambda: rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    write_tree(root, {"s1": [img(), img()], "t1": [img()]}, {"s1": img(), "t1": img()})
    write_list(root / "test.txt", ["t1"])


def _garbage(root):
    p = root / "lq" / "s1" / "0001.npy"
    p.write_bytes(b"this is not a numpy file at all" * 4)
    return p, "not a readable .npy"


def _truncated(root):
    p = root / "lq" / "s1" / "0001.npy"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    return p, "truncated .npy file"


def _float(root):
    p = root / "lq" / "s1" / "0001.npy"
    np.save(p, np.zeros((20, 24, 3), np.float32))
    return p, "expected a uint8 frame, got dtype float32"


def _rank2(root):
    p = root / "gt" / "s1" / "long.npy"
    np.save(p, np.zeros((20, 24), np.uint8))
    return p, "expected an H x W x 3 frame"


def _scene_without_gt(root):
    (root / "gt" / "s1" / "long.npy").unlink()
    return root / "gt" / "s1", "no ground truth"


def _empty_scene(root):
    for f in (root / "lq" / "s1").iterdir():
        f.unlink()
    return root / "lq" / "s1", "no .npy frames"


def _empty_root(root):
    for sub in ("lq", "gt"):
        for scene in (root / sub).iterdir():
            for f in scene.iterdir():
                f.unlink()
            scene.rmdir()
    return root / "lq", "is empty"


def _mismatch(root):
    (root / "lq" / "extra").mkdir()
    np.save(root / "lq" / "extra" / "0000.npy", np.zeros((20, 24, 3), np.uint8))
    return root / "lq", "do not hold the same scenes: only in LQ: extra"


def _missing_root(root):
    (root / "lq").rename(root / "elsewhere")
    return root / "lq", "does not exist"


BAD = [_garbage, _truncated, _float, _rank2, _scene_without_gt, _empty_scene, _empty_root, _mismatch, _missing_root]


@pytest.mark.parametrize("via", ["loader", "prepare"])
@pytest.mark.parametrize("breaker", BAD, ids=lambda f: f.__name__[1:])
def test_bad_input_error_names_the_file(tmp_path, breaker, via):
    _good_tree(tmp_path)
    path, what = breaker(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(path))) as info:
        if via == "loader":
            build_loader(make_cfg(tmp_path, resize=[24, 20], crop=16, batch_size=1), "train")
        else:
            prepare(tmp_path / "lq", tmp_path / "gt", tmp_path / "out", (24, 20), workers=1, progress=False)
    assert re.search(what, str(info.value)), str(info.value)


def test_load_frame_rejects_truncated_data_and_wrong_shape(tmp_path):
    p = tmp_path / "f.npy"
    np.save(p, np.zeros((20, 24, 3), np.uint8))
    with pytest.raises(DataError, match="expected shape"):
        load_frame(p, (10, 24, 3))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match=re.escape(str(p))):
        load_frame(p)


def test_test_list_naming_unknown_scene(tmp_path):
    _good_tree(tmp_path)
    write_list(tmp_path / "test.txt", ["t1", "nope"])
    with pytest.raises(DataError, match=r"test\.txt.*nope"):
        build_loader(make_cfg(tmp_path, resize=[24, 20], crop=16, batch_size=1), "test")


def test_smid_without_roots_is_a_config_error(tmp_path):
    cfg = config_from_dict({"data": {"dataset": "smid"}})
    with pytest.raises(ValueError, match="data.lq_root and data.gt_root"):
        build_loader(cfg, "train")


# ---------------------------------------------------------------------------------------------
# prepare


def _raw_tree(root: Path) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(4)
    raw = {s: [rng.integers(0, 256, (53, 37, 3), dtype=np.uint8) for _ in range(3)] for s in ("s1", "s2", "t1")}
    write_tree(root, raw, {s: rng.integers(0, 256, (53, 37, 3), dtype=np.uint8) for s in raw})
    write_list(root / "test.txt", ["t1"])
    return raw


def test_prepare_writes_resumes_and_redoes_corrupt_files(tmp_path):
    raw = _raw_tree(tmp_path)
    out = tmp_path / "cache"
    r1 = prepare(tmp_path / "lq", tmp_path / "gt", out, (24, 40), workers=2, progress=False)
    assert (r1.written, r1.skipped) == (9 + 3, 0)
    for scene, frames in raw.items():
        for k, f in enumerate(frames):
            got = np.load(out / "lq" / scene / f"{k:04d}.npy")
            assert (got == resize_linear(f[:, :, ::-1], 24, 40)).all()  # RGB, resized
        assert sorted(p.name for p in (out / "gt" / scene).iterdir()) == ["long.npy"]  # only the GT
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["resize"] == [24, 40] and doc["color"] == "RGB"
    assert doc["scenes"]["s1"] == {"gt": "long.npy", "frames": ["0000.npy", "0001.npy", "0002.npy"]}

    mtime = (out / "lq" / "s1" / "0000.npy").stat().st_mtime_ns
    r2 = prepare(tmp_path / "lq", tmp_path / "gt", out, (24, 40), workers=2, progress=False)
    assert (r2.written, r2.skipped) == (0, 12)
    assert (out / "lq" / "s1" / "0000.npy").stat().st_mtime_ns == mtime

    # A truncated frame, a garbage GT and a stale temp file from an interrupted run.
    bad = out / "lq" / "s2" / "0001.npy"
    bad.write_bytes(bad.read_bytes()[:-50])
    (out / "gt" / "t1" / "long.npy").write_bytes(b"garbage")
    stale = out / "lq" / "s1" / ".0002.npy.123.tmp"
    stale.write_bytes(b"x")
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(out)
    r3 = prepare(tmp_path / "lq", tmp_path / "gt", out, (24, 40), workers=1, progress=False)
    assert (r3.written, r3.skipped) == (2, 10)
    assert not stale.exists()
    assert (np.load(bad) == resize_linear(raw["s2"][1][:, :, ::-1], 24, 40)).all()


def test_prepared_cache_gives_the_same_batches_as_raw(tmp_path):
    _raw_tree(tmp_path)
    out = tmp_path / "cache"
    assert (
        prepare_main(
            [
                "--lq",
                str(tmp_path / "lq"),
                "--gt",
                str(tmp_path / "gt"),
                "--out",
                str(out),
                "--resize",
                "24",
                "40",
                "--no-progress",
            ]
        )
        == 0
    )
    common = dict(resize=[24, 40], crop=16, batch_size=2)
    raw = list(build_loader(make_cfg(tmp_path, **common), "train", seed=7))
    for loader in ("torch", "dali"):
        cfg = make_cfg(tmp_path, prepared_root=str(out), loader=loader, **common)
        cached = list(build_loader(cfg, "train", seed=7))
        assert len(cached) == len(raw) == 3
        for a, b in zip(raw, cached, strict=True):
            assert a["scene"] == b["scene"] and a["frame"] == b["frame"]
            assert (a["lq"] == b["lq"]).all() and (a["gt"] == b["gt"]).all()
    with pytest.raises(DataError, match=r"holds 24x40 frames but data.resize is \[32, 40\]"):
        build_loader(make_cfg(tmp_path, prepared_root=str(out), resize=[32, 40], crop=16, batch_size=2), "train")


def test_prepare_cli_reports_bad_input(tmp_path, capsys):
    _raw_tree(tmp_path)
    os.remove(tmp_path / "gt" / "s2" / "long.npy")
    rc = prepare_main(
        ["--lq", str(tmp_path / "lq"), "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert rc == 2
    assert str(tmp_path / "gt" / "s2") in capsys.readouterr().err


def test_bad_manifest_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "lfpv_fast.prepared", "version": 1, "resize": [1]}')
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "manifest.json")) + ".*resize"):
        read_manifest(tmp_path)
