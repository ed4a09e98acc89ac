"""The LOL presets on every layout the well-known low-light codebases use (SNR-Aware's, Retinexformer's; BasicSR-style
paired folders through `pairs`): the loader finds which one is on disk and says so, trains and evaluates on it, and
explains names that fit no layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_MODEL_RUN, preset_cfg, write_png
from lfpv_fast.config import config_from_dict, load_config
from lfpv_fast.data.config import DATASETS
from lfpv_fast.data.errors import DataError
from lfpv_fast.data.loaders import build_loader

H, W = 24, 32
TRAIN_KEYS = ["00001", "00002", "00003", "00004"]
TEST_KEYS = ["00090", "00091"]

# (preset, LQ/GT folders of train and test, LQ and GT name of key k): the trees as the codebases have them.
TREES = {
    # SNR-Aware's options (LOLv1.yml: LOLv1/our485/{low,high}); LOL as distributed.
    "snr_aware_lol_v1": ("lol_v1", ("our485/low", "our485/high"), ("eval15/low", "eval15/high"),
                         lambda k: (f"{k}.png", f"{k}.png")),
    # Retinexformer's Options/RetinexFormer_LOL_v1.yml: LOL_v1/Train/input, Train/target, Test/input, Test/target.
    "retinexformer_lol_v1": ("lol_v1", ("Train/input", "Train/target"), ("Test/input", "Test/target"),
                             lambda k: (f"{k}.png", f"{k}.png")),
    # SNR-Aware's LOLv2_real.yml: LOLv2/Real_captured/Train/{Low,Normal}, names low00001.png / normal00001.png.
    "snr_aware_lol_v2_real": ("lol_v2_real", ("Train/Low", "Train/Normal"), ("Test/Low", "Test/Normal"),
                              lambda k: (f"low{k}.png", f"normal{k}.png")),
    # Retinexformer's LOLv2 Real_captured: the same folders, 00001.png on both sides (its paired dataset pairs
    # identical names).
    "retinexformer_lol_v2_real": ("lol_v2_real", ("Train/Low", "Train/Normal"), ("Test/Low", "Test/Normal"),
                                  lambda k: (f"{k}.png", f"{k}.png")),
    "lol_v2_synthetic": ("lol_v2_synthetic", ("Train/Low", "Train/Normal"), ("Test/Low", "Test/Normal"),
                         lambda k: (f"{k}.png", f"{k}.png")),
}


def build_tree(root: Path, tree: str) -> dict[str, np.ndarray]:
    """The tree `tree` under root; returns {LQ stem: GT}. LQ = GT // 4 + k shows which GT an LQ was paired with."""
    _, train, test, names = TREES[tree]
    rng = np.random.default_rng(len(tree))
    gts = {}
    for (lq_dir, gt_dir), keys in ((train, TRAIN_KEYS), (test, TEST_KEYS)):
        for k, key in enumerate(keys):
            lq_name, gt_name = names(key)
            gt = rng.integers(0, 200, (H, W, 3)).astype(np.uint8)
            write_png(root / lq_dir / lq_name, (gt // 4 + k).astype(np.uint8))
            write_png(root / gt_dir / gt_name, gt)
            gts[Path(lq_name).stem] = gt
    return gts


def layout_name(tree: str) -> str:
    preset = TREES[tree][0]
    owner = "Retinexformer" if tree.startswith("retinexformer") else "as distributed"
    (layout,) = [lay for lay in DATASETS[preset].layouts if owner in lay.name]
    return layout.name


@pytest.mark.parametrize("tree", list(TREES))
def test_each_preset_finds_the_layout_on_disk_pairs_it_and_says_which(tmp_path, tree):
    preset = TREES[tree][0]
    gts = build_tree(tmp_path, tree)
    said: list[str] = []
    cfg = preset_cfg(tmp_path, preset)
    train = build_loader(cfg, "train", seed=1, log=said.append)
    frames = []
    for batch in train:
        for j, frame in enumerate(batch["frame"]):
            k = [Path(TREES[tree][3](key)[0]).stem for key in TRAIN_KEYS].index(frame)
            lq = np.round(batch["lq"][j].numpy() * 255).astype(np.int64)
            gt = np.round(batch["gt"][j].numpy() * 255).astype(np.int64)
            assert (lq == gt // 4 + k).all(), frame  # each LQ with its own GT
            frames.append(frame)
    assert sorted(frames) == sorted(Path(TREES[tree][3](key)[0]).stem for key in TRAIN_KEYS)
    test = list(build_loader(cfg, "test", log=said.append))
    assert [b["frame"][0] for b in test] == [Path(TREES[tree][3](key)[0]).stem for key in TEST_KEYS]
    for b in test:
        assert (np.round(b["gt"][0].permute(1, 2, 0).numpy() * 255) == gts[b["frame"][0]]).all()
    # One line per split names the preset, the layout found, its folders, its naming and the number of pairs.
    (lq_dir, gt_dir), naming = TREES[tree][1], "low<key>.<ext> with normal<key>.<ext>" if "snr_aware_lol_v2" in tree \
        else "the same name on both sides"
    assert len(said) == 2 and said[0].startswith(f"data: train split: {preset} in {tmp_path}: {layout_name(tree)}")
    assert f"{lq_dir} with {gt_dir}, {naming}" in said[0] and said[0].endswith(f"; {len(TRAIN_KEYS)} pairs")
    assert said[1].startswith("data: test split:") and said[1].endswith(f"; {len(TEST_KEYS)} pairs")


def test_the_log_line_goes_to_stdout_by_default_and_pairs_say_their_naming(tmp_path, capsys):
    # BasicSR-style paired folders (lq/ and gt/, the same names): dataset `pairs`.
    for k, key in enumerate(TRAIN_KEYS):
        gt = np.full((H, W, 3), 10 * k, np.uint8)
        write_png(tmp_path / "lq" / f"{key}.png", gt // 2)
        write_png(tmp_path / "gt" / f"{key}.png", gt)
    cfg = config_from_dict({"data": dict(dataset="pairs", lq_root=str(tmp_path / "lq"), gt_root=str(tmp_path / "gt"),
                                         resize=None, crop=16, batch_size=2, num_workers=0)})
    assert len(build_loader(cfg, "train")) == 2
    out = capsys.readouterr().out
    assert out == (f"data: train split: pairs: {tmp_path / 'lq'} with {tmp_path / 'gt'}, the same name on both sides "
                   f"(<key>.<ext>); {len(TRAIN_KEYS)} pairs\n")
    build_loader(cfg, "train", rank=1, world_size=2)  # other ranks say nothing
    assert capsys.readouterr().out == ""




@pytest.mark.parametrize("tree", ["retinexformer_lol_v1", "retinexformer_lol_v2_real"])
def test_train_and_evaluate_through_the_preset_on_retinexformers_tree(tmp_path, tree, capsys):
    from lfpv_fast.evaluate import main as evaluate_main
    from lfpv_fast.train import main as train_main

    preset = TREES[tree][0]
    root = tmp_path / "data"
    build_tree(root, tree)
    sets = [*TINY_MODEL_RUN, f"data.root={root}", "data.crop=16", "data.batch_size=2", "data.num_workers=0",
            "train.iterations=2", "train.checkpoint_every=2", "val.every=2", "logging.every=1",
            "logging.progress=false", "logging.tensorboard=false"]
    args = ["-c", preset, "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    assert train_main(args) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"data: train split: {preset} in {root}: {layout_name(tree)}" in log  # the layout, in train.log too
    val = json.loads((tmp_path / "run" / "val.jsonl").read_text().splitlines()[-1])
    assert val["images"] == len(TEST_KEYS)
    capsys.readouterr()
    out = tmp_path / "eval.json"
    # --backend reference: NCHW convolutions as in the trainer's validation. evaluate's default CPU path runs them
    # channels_last, whose float32 rounding (up to 4e-7) can move one pixel of these 32x24 images by one uint8
    # level (2e-5 dB); this test compares the data path (the same images, in the same order), not that arithmetic.
    assert evaluate_main(["-c", str(tmp_path / "run" / "config.yaml"), "--checkpoint",
                          str(tmp_path / "run" / "final_weights.pth"), "--device", "cpu", "--no-progress",
                          "--backend", "reference", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["image"] for r in res["per_image"]] == TEST_KEYS
    assert res["psnr"] == pytest.approx(val["psnr"], abs=1e-6)
    assert f"data: test split: {preset} in {root}: {layout_name(tree)}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Messages


def test_a_root_with_no_known_layout_lists_every_layout_and_what_is_there(tmp_path):
    (tmp_path / "Train" / "low").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        build_loader(preset_cfg(tmp_path, "lol_v1"), "train")
    msg = str(info.value)
    assert msg.startswith(f"data.root {tmp_path} does not have the lol_v1 layout: expected the folders "
                          "our485/low and our485/high, eval15/low and eval15/high (LOL as distributed")
    assert "or Train/input and Train/target, Test/input and Test/target (Retinexformer's LOL_v1)" in msg
    assert msg.endswith("(found: Train)")
    # A root one level too high: the error says which folder would do, for any of the layouts.
    build_tree(tmp_path / "LOL_v1", "retinexformer_lol_v1")
    with pytest.raises(DataError, match=re.escape(f"did you mean data.root={tmp_path / 'LOL_v1'}?")):
        build_loader(preset_cfg(tmp_path, "lol_v1"), "train")


def test_names_that_fit_no_layout_say_each_form_expected_and_show_a_file(tmp_path):
    # Half renamed: the LQ files keep the low prefix, the GT files lost theirs.
    for key in TRAIN_KEYS:
        write_png(tmp_path / "Train" / "Low" / f"low{key}.png", np.zeros((H, W, 3), np.uint8))
        write_png(tmp_path / "Train" / "Normal" / f"{key}.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError) as info:
        build_loader(preset_cfg(tmp_path, "lol_v2_real"), "train")
    msg = str(info.value)
    assert "hold no pair of images in any layout of lol_v2_real" in msg
    assert "expected low<key>.<ext> with normal<key>.<ext> (LOL-v2 Real_captured as distributed" in msg
    assert "or the same name on both sides (<key>.<ext>) (Retinexformer's" in msg
    assert msg.endswith(f"e.g. {tmp_path / 'Train' / 'Low' / 'low00001.png'} has no partner")

    # One stray name among a layout's files: named, with the form the found layout asks for.
    build_tree(tmp_path / "v2", "snr_aware_lol_v2_real")
    write_png(tmp_path / "v2" / "Train" / "Low" / "dark7.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'v2' / 'Train' / 'Low' / 'dark7.png'}: the name does "
                                                  "not have the form low<key>.png that the lol_v2_real layout found")):
        build_loader(preset_cfg(tmp_path / "v2", "lol_v2_real"), "train")


def test_pairs_whose_names_lack_the_prefix_say_so_and_an_empty_override_clears_it(tmp_path):
    for key in TRAIN_KEYS:
        gt = np.full((H, W, 3), 100, np.uint8)
        write_png(tmp_path / "Low" / f"{key}.png", gt // 2)
        write_png(tmp_path / "Normal" / f"{key}.png", gt)
    config = tmp_path / "pairs.yaml"
    config.write_text(f"data:\n  dataset: pairs\n  lq_root: {tmp_path / 'Low'}\n  gt_root: {tmp_path / 'Normal'}\n"
                      "  lq_prefix: low\n  gt_prefix: normal\n  resize: null\n  crop: 16\n  batch_size: 2\n"
                      "  num_workers: 0\n")
    with pytest.raises(DataError) as info:
        build_loader(load_config(config), "train")
    # Not "holds no images": the folder holds images whose names lack the prefix; one of them is shown.
    assert str(info.value) == (f"LQ folder of the training split {tmp_path / 'Low'} holds 4 image(s) but none named "
                               "low<key>.<ext> as data.lq_prefix='low' and data.lq_suffix='' asks, e.g. "
                               f"{tmp_path / 'Low' / '00001.png'}")
    cfg = load_config(config, ["data.lq_prefix=", "data.gt_prefix="])
    assert (cfg.data.lq_prefix, cfg.data.gt_prefix) == ("", "")
    assert len(build_loader(cfg, "train")) == 2
