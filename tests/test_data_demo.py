"""The built-in demo dataset: built offline, deterministic, idempotent, and read by the loaders."""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from lfpv_fast.config import config_from_dict
from lfpv_fast.data import demo
from lfpv_fast.data.errors import DataError
from lfpv_fast.data.loaders import build_loader
from lfpv_fast.data.smid import scan_tree


@pytest.fixture(scope="module")
def offline_demo_root(tmp_path_factory):
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


def test_layout_and_low_light_model(offline_demo_root):
    tree = scan_tree(offline_demo_root / "lq", offline_demo_root / "gt")
    names = [s.name for s in tree.scenes]
    assert sorted(names) == sorted(demo.scene_names()) and len(names) == 15
    test = (offline_demo_root / "test_scenes.txt").read_text().split()
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
    cat = np.load(offline_demo_root / "gt" / "chelsea" / "long.npy")
    assert cat[..., 2].mean() > cat[..., 0].mean()  # index 2 is red in BGR
    doc = json.loads((offline_demo_root / "manifest.json").read_text())
    assert doc["test_scenes"] == test and doc["low_light"]["photons"] == list(demo.PHOTONS)


def test_exposure_and_noise_ranges_are_the_documented_ones():
    """The ranges that lfpv_fast/data/demo.py's docstring and the README state."""
    assert demo.BANDS == {"0.01-0.03": (0.01, 0.03), "0.03-0.1": (0.03, 0.1), "0.1-0.3": (0.1, 0.3)}
    assert demo.PHOTONS == (1000.0, 8000.0) and demo.READ_NOISE == (1.0, 4.0) and demo.FRAMES == 6
    doc = demo.__doc__
    assert "The exposures span 0.01 to 0.3" in doc and "log-uniform in [1000, 8000]" in doc
    assert "uniform in [1, 4]" in doc and "Frame k of every scene is in band k mod 3" in doc
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "exposures 0.01-0.3" in readme and "two frames of each held-out scene in each band" in readme


def test_every_scene_is_stratified_over_the_bands_and_frames_are_as_recorded(offline_demo_root):
    doc = json.loads((offline_demo_root / "manifest.json").read_text())
    assert doc["low_light"]["bands"] == {k: list(v) for k, v in demo.BANDS.items()}
    bands = demo.frame_bands(offline_demo_root)
    assert len(bands) == 15 * demo.FRAMES and list(dict.fromkeys(bands.values())) == list(demo.BANDS)
    for scene, frames in doc["frames"].items():
        assert [f["frame"] for f in frames] == [f"{k:04d}" for k in range(demo.FRAMES)]
        # Two frames of every scene (held-out ones included) in each band: frame k in band k % 3.
        assert [f["band"] for f in frames] == [list(demo.BANDS)[k % 3] for k in range(demo.FRAMES)]
        gt = (np.load(offline_demo_root / "gt" / scene / "long.npy") / 255.0) ** demo.GAMMA
        for f in frames:
            low, high = demo.BANDS[f["band"]]
            assert low <= f["exposure"] <= high and bands[f"{scene}_{f['frame']}"] == f["band"]
            assert demo.PHOTONS[0] <= f["photons"] <= demo.PHOTONS[1]
            assert demo.READ_NOISE[0] <= f["read_noise"] <= demo.READ_NOISE[1]
            # The frame was made with the recorded exposure: its mean linear light is the GT's times it (clipping
            # the read noise at 0 lifts the darkest frames a little).
            lq = (np.load(offline_demo_root / "lq" / scene / f"{f['frame']}.npy") / 255.0) ** demo.GAMMA
            assert 0.9 < lq.mean() / (gt.mean() * f["exposure"]) < 1.5, (scene, f)
    # The draws cover the range: each band's exposures spread over it, noise levels vary.
    for name, (low, high) in demo.BANDS.items():
        exposures = [f["exposure"] for fs in doc["frames"].values() for f in fs if f["band"] == name]
        assert min(exposures) < low * (high / low) ** 0.25 and max(exposures) > low * (high / low) ** 0.75
    photons = [f["photons"] for fs in doc["frames"].values() for f in fs]
    assert min(photons) < 2000 and max(photons) > 4000


def test_an_earlier_version_is_replaced(offline_demo_root, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(offline_demo_root, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    assert not demo.dataset_is_current(old)
    demo.make_demo_dataset(old)
    assert demo.dataset_is_current(old) and not list(tmp_path.glob(".old*"))
    assert filecmp.cmp(old / "manifest.json", offline_demo_root / "manifest.json", shallow=False)


def test_idempotent_and_deterministic(offline_demo_root, tmp_path):
    mtime = (offline_demo_root / "manifest.json").stat().st_mtime_ns
    demo.make_demo_dataset(offline_demo_root)  # already there: nothing is done
    assert (offline_demo_root / "manifest.json").stat().st_mtime_ns == mtime
    demo.make_demo_dataset(tmp_path / "again")
    cmp = filecmp.dircmp(offline_demo_root / "lq" / "rocket_zoom2", tmp_path / "again" / "lq" / "rocket_zoom2")
    assert cmp.left_list == cmp.right_list and len(cmp.left_list) == demo.FRAMES
    match, mismatch, errors = filecmp.cmpfiles(
        offline_demo_root,
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
def test_loaders_read_the_demo(offline_demo_root, loader):
    data = dict(
        dataset="demo",
        demo_root=str(offline_demo_root),
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


def test_a_short_training_validates_per_exposure_band(offline_demo_root, tmp_path, capsys):
    """A tiny model, a few steps: validation over every held-out frame, reported overall and per band."""
    from lfpv_fast.config import load_config
    from lfpv_fast.training.trainer import Trainer

    tiny = ["model.nf=8", "model.hr_nf=8", "model.light_blocks=1", "model.layers=1", "model.heads=1",
            "model.head_dim=16", "model.ffn_dim=32", "model.bank_size=8", "model.updater_width=2",
            "data.resize=[64, 48]", "data.crop=32", "data.batch_size=8", "data.num_workers=0",
            "train.iterations=3", "train.checkpoint_every=3", "val.every=3", "logging.every=1",
            "logging.progress=false", "logging.tensorboard=false", f"data.demo_root={offline_demo_root}"]
    trainer = Trainer(load_config("demo", tiny), tmp_path / "run")
    try:
        trainer.fit()
    finally:
        trainer.close()
    last = json.loads((tmp_path / "run" / "val.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["images"] == 3 * demo.FRAMES  # every frame of the 3 held-out scenes
    assert list(last["bands"]) == list(demo.BANDS)
    per_band = 3 * demo.FRAMES // len(demo.BANDS)
    assert all(b["images"] == per_band for b in last["bands"].values())
    # The overall figures are the mean of the bands' (equal sizes), and darker bands start darker.
    for key in ("psnr", "input_psnr", "ssim"):
        assert abs(last[key] - np.mean([b[key] for b in last["bands"].values()])) < 1e-9
    inputs = [b["input_psnr"] for b in last["bands"].values()]
    assert inputs == sorted(inputs)
    out = capsys.readouterr().out
    assert all(f"exposure {name} ({per_band} images): PSNR" in out for name in demo.BANDS)
    assert (tmp_path / "run" / "images" / "step_00000003_coffee_0002.png").is_file()  # save_images: 6

    # Fewer held-out frames (the first of each scene: all in the darkest band): only that band is reported.
    trainer = Trainer(load_config("demo", [*tiny, "data.test_frames=1"]), tmp_path / "run1")
    try:
        result = trainer.validate()
    finally:
        trainer.close()
    assert list(result["bands"]) == ["0.01-0.03"] and result["bands"]["0.01-0.03"]["images"] == 3


def test_the_png_copy_has_the_same_bands(offline_demo_root):
    png = demo.make_demo_png(offline_demo_root)
    bands = demo.frame_bands(offline_demo_root)
    stems = {p.stem for split in ("our485", "eval15") for p in (png / split / "low").glob("*.png")}
    assert stems == set(bands)


def test_a_brief_training_improves_psnr_in_every_exposure_band(offline_demo_root, tmp_path):
    """60 steps of a tiny model at 64x48 gain 3.7-5.0 dB on every band (seeds 0-3 tried when this was written);
    the test asks for 2 dB. The demo's own run (600 steps, the README's figures) is in bench/results."""
    from lfpv_fast.config import load_config
    from lfpv_fast.training.trainer import Trainer

    tiny = ["model.nf=8", "model.hr_nf=8", "model.light_blocks=1", "model.layers=1", "model.heads=1",
            "model.head_dim=16", "model.ffn_dim=32", "model.bank_size=8", "model.updater_width=2",
            "data.resize=[64, 48]", "data.crop=32", "data.batch_size=8", "data.num_workers=0",
            "train.iterations=60", "train.checkpoint_every=60", "train.restart_period=60", "train.lr=1e-3",
            "train.cpu_threads=1", "val.every=60", "logging.every=60", "logging.progress=false",
            "logging.tensorboard=false", f"data.demo_root={offline_demo_root}"]
    threads = torch.get_num_threads()  # train.cpu_threads sets it for the whole process
    trainer = Trainer(load_config("demo", tiny), tmp_path / "run")
    try:
        trainer.fit()
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    bands = json.loads((tmp_path / "run" / "val.jsonl").read_text().splitlines()[-1])["bands"]
    assert list(bands) == list(demo.BANDS)
    for name, band in bands.items():
        assert band["psnr"] > band["input_psnr"] + 2.0, (name, band)


def test_the_png_demo_is_validated_per_band_too(offline_demo_root, tmp_path):
    """demo_png's pairs have no scene, only the file stem `<scene>_<frame>`: the same bands are found."""
    from lfpv_fast.config import load_config
    from lfpv_fast.training.trainer import Trainer

    tiny = ["model.nf=8", "model.hr_nf=8", "model.light_blocks=1", "model.layers=1", "model.heads=1",
            "model.head_dim=16", "model.ffn_dim=32", "model.bank_size=8", "model.updater_width=2",
            "data.crop=32", "data.batch_size=8", "data.num_workers=0", "data.loader=torch",
            "train.iterations=1", "logging.progress=false", "logging.tensorboard=false",
            f"data.demo_root={offline_demo_root}"]
    trainer = Trainer(load_config("demo_png", tiny), tmp_path / "run")
    try:
        result = trainer.validate()
    finally:
        trainer.close()
    assert {name: band["images"] for name, band in result["bands"].items()} == {name: 6 for name in demo.BANDS}
