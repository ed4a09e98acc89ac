"""The built-in demo dataset: built offline, deterministic, idempotent, and read by the loaders."""

from __future__ import annotations

import filecmp
import json
import socket

import numpy as np
import pytest

from lfpv_fast.config import config_from_dict
from lfpv_fast.data import demo
from lfpv_fast.data.errors import DataError
from lfpv_fast.data.smid import scan_tree
from lfpv_fast.pipelines import build_loader


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """Built once with the network cut off: any download attempt fails the build."""
    root = tmp_path_factory.mktemp("demo") / "ds"

    def no_network(*args, **kwargs):
        raise AssertionError("the demo dataset tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        paths = demo.make_demo_dataset(root)
    assert paths.root == root
    return root


def test_layout_and_low_light_model(demo_root):
    tree = scan_tree(demo_root / "lq", demo_root / "gt")
    names = [s.name for s in tree.scenes]
    assert sorted(names) == sorted(demo.scene_names()) and len(names) == 15
    test = (demo_root / "test_scenes.txt").read_text().split()
    assert test == ["coffee", "coffee_zoom1", "coffee_zoom2"]
    for scene in tree.scenes:
        assert len(scene.frames) == demo.FRAMES and scene.gt == "long.npy"
        gt = np.load(tree.gt_path(scene))
        assert gt.dtype == np.uint8 and gt.shape == (192, 256, 3)
        frames = [np.load(tree.lq_path(scene, f)) for f in scene.frames]
        assert all(f.dtype == np.uint8 and f.shape == gt.shape for f in frames)
        assert np.mean(frames) < gt.mean() / 2  # dark
        assert not np.array_equal(frames[0], frames[1])  # fresh noise per frame
        # Correlated with the GT (same picture), in the same channel order (BGR both).
        g = gt.astype(float).ravel()
        assert np.corrcoef(g, np.mean(frames, axis=0).ravel())[0, 1] > 0.8
    # Stored BGR like SMID: the orange cat of `chelsea` has more red than blue.
    cat = np.load(demo_root / "gt" / "chelsea" / "long.npy")
    assert cat[..., 2].mean() > cat[..., 0].mean()  # index 2 is red in BGR
    doc = json.loads((demo_root / "manifest.json").read_text())
    assert doc["test_scenes"] == test and doc["low_light"]["full_well"] == demo.FULL_WELL


def test_idempotent_and_deterministic(demo_root, tmp_path):
    mtime = (demo_root / "manifest.json").stat().st_mtime_ns
    demo.make_demo_dataset(demo_root)  # already there: nothing is done
    assert (demo_root / "manifest.json").stat().st_mtime_ns == mtime
    demo.make_demo_dataset(tmp_path / "again")
    cmp = filecmp.dircmp(demo_root / "lq" / "rocket_zoom2", tmp_path / "again" / "lq" / "rocket_zoom2")
    assert cmp.left_list == cmp.right_list and len(cmp.left_list) == demo.FRAMES
    match, mismatch, errors = filecmp.cmpfiles(
        demo_root,
        tmp_path / "again",
        ["lq/rocket_zoom2/0003.npy", "gt/astronaut/long.npy", "test_scenes.txt"],
        shallow=False,
    )
    assert not mismatch and not errors and len(match) == 3


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(DataError, match=str(tmp_path)):
        demo.make_demo_dataset(tmp_path)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_loaders_read_the_demo(demo_root, loader):
    data = dict(
        dataset="demo",
        demo_root=str(demo_root),
        resize=[256, 192],
        crop=128,
        batch_size=8,
        loader=loader,
        num_workers=0,
        num_threads=1,
    )
    cfg = config_from_dict({"data": data})
    train = build_loader(cfg, "train", seed=1)
    assert len(train) == 12 * demo.FRAMES // 8
    batch = next(iter(train))
    assert batch["lq"].shape == batch["gt"].shape == (8, 3, 128, 128)
    assert not any(s.startswith("coffee") for s in batch["scene"])
    assert float(batch["lq"].mean()) < float(batch["gt"].mean())
    test = build_loader(cfg, "test")
    assert len(test) == 3 * demo.FRAMES
    first = next(iter(test))
    assert first["scene"] == ["coffee"] and first["frame"] == ["0000"] and first["lq"].shape == (1, 3, 192, 256)
