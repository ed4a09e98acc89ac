"""Run configs: the packaged files load, and bad keys or values give errors that say what to fix."""

from __future__ import annotations

import pytest

from lfpv_fast.config import ConfigError, config_from_dict, config_to_dict, configs_dir, load_config


def test_smid_config_carries_the_published_recipe():
    cfg = load_config("smid")
    assert (cfg.data.crop, cfg.data.batch_size, cfg.data.resize, cfg.data.flips) == (256, 12, [960, 512], True)
    t = cfg.train
    assert (t.lr, t.betas, t.restart_period, t.eta_min, t.iterations) == (4e-4, [0.9, 0.99], 200_000, 1e-7, 200_000)
    assert (t.pixel_weight, t.perceptual_weight, t.checkpoint_every, cfg.val.every) == (1.0, 0.1, 5000, 5000)
    assert cfg.model.nf == 64 and cfg.model.d_model == 1024


@pytest.mark.parametrize("name", sorted(p.name for p in configs_dir().glob("*.yaml")))
def test_every_packaged_config_loads(name):
    cfg = load_config(name)
    assert config_from_dict(config_to_dict(cfg)).model == cfg.model


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("smid", ["data.lq_root=/x", "train.lr=1e-4", "data.resize=[64, 32]", "val.max_images=null",
                               "train.compile=off", "data.crop=32"])
    assert (cfg.data.lq_root, cfg.train.lr, cfg.data.resize, cfg.val.max_images) == ("/x", 1e-4, [64, 32], None)
    assert cfg.train.compile == "off"


def test_unknown_key_names_file_key_and_closest(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  iteration: 10\n")
    with pytest.raises(ConfigError, match=r"run.yaml.*train.*'iteration'.*did you mean 'iterations'"):
        load_config(p)
    p.write_text("trian:\n  iterations: 10\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(p)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config("smid", ["data.batchsize=4"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train.iterations: expected int, got 'many'"):
        load_config("smid", ["train.iterations=many"])
    with pytest.raises(ConfigError, match=r"data.loader: expected 'dali' \| 'torch'"):
        load_config("smid", ["data.loader=opencv"])
    with pytest.raises(ConfigError, match=r"data.flips: expected bool"):
        load_config("smid", ["data.flips=3"])
    with pytest.raises(ConfigError, match="model.options: model.nf must be >= 1"):
        load_config("smid", ["model.nf=0"])
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)


def test_cross_key_validation_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="data.crop"):
        load_config("smid", ["data.crop=1024"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("smid", ["train.iterations"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_errors_from_a_set_override_name_the_override_not_the_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  iterations: 10\n")
    cases = {
        "train.iteration=3": "did you mean 'iterations'",  # unknown key
        "train.iterations=many": "expected int",  # wrong type
        "data.num_workers=-1": "data.num_workers must be >= 0",  # refused by the section itself
        "modle.nf=8": "did you mean 'model'",  # unknown section
    }
    for override, named in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(p, [override])
        message = str(info.value)
        assert message.startswith(f"--set {override}: ") and named in message, message
        assert str(p) not in message, message
    # A key the file itself gets wrong is still the file's.
    p.write_text("train:\n  iteration: 10\n")
    with pytest.raises(ConfigError, match=f"^{p}: train: unknown key 'iteration'"):
        load_config(p, ["train.lr=1e-3"])
    # A check across keys names both the file and the overrides that took part.
    p.write_text("data:\n  resize: [64, 48]\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, ["data.crop=60"])
    assert str(p) in str(info.value) and "--set data.crop=60" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The data section: each kind of dataset's keys and checks


def test_every_dataset_kind_is_one_entry_of_the_table():
    from lfpv_fast.data.config import DATASETS

    # The names a config accepts are the table's: an unknown one lists them and suggests the closest.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.dataset=lol_v3"])
    message = str(info.value)
    assert message.startswith("--set data.dataset=lol_v3: ") and "unknown data.dataset 'lol_v3'" in message
    assert "did you mean 'lol_v1'?" in message and f"(the datasets: {', '.join(DATASETS)})" in message
    assert set(DATASETS) == {"smid", "demo", "pairs", "lol_v1", "lol_v2_real", "lol_v2_synthetic", "demo_png"}
    # A key that the dataset would not read is an error naming it, whichever kind refuses it.
    refused = {
        "smid": ("data.root=/x", "data.root is read by image datasets"),
        "demo": ("data.lq_root=/x", "data.lq_root is not read by dataset 'demo'"),
        "pairs": ("data.prepared_root=/x", "data.prepared_root is for SMID-style datasets"),
        "lol_v1": ("data.gt_prefix=n", "data.gt_prefix cannot be set"),
        "demo_png": ("data.root=/x", "dataset 'demo_png' is written to data.demo_root"),
    }
    for kind, (override, named) in refused.items():
        with pytest.raises(ConfigError, match=named):
            load_config(None, [f"data.dataset={kind}", "data.resize=[64, 64]", "data.crop=64", override])
    presets = r"data.root is read by the presets \(lol_v1, lol_v2_real, lol_v2_synthetic\)"
    with pytest.raises(ConfigError, match=presets):
        load_config(None, ["data.dataset=pairs", "data.root=/x"])


def test_a_new_dataset_kind_is_one_entry(tmp_path, monkeypatch):
    """A preset of our own: one entry in DATASETS (its check, its layout, its resolver) and a config can name it,
    the data checks apply to it and its splits resolve; nothing else is edited."""
    import numpy as np

    from helpers import write_png
    from lfpv_fast.data import config as data_config
    from lfpv_fast.data.images import Layout, Naming
    from lfpv_fast.data.source import resolve_preset_split, resolve_split

    layout = Layout(("train/dark", "train/lit"), ("val/dark", "val/lit"), Naming(lq_suffix="_d"), name="ours")
    entry = data_config.DatasetKind(data_config.check_preset, resolve_preset_split, images=True, layouts=(layout,))
    monkeypatch.setitem(data_config.DATASETS, "ours_v1", entry)
    for split, keys in (("train", ["a", "b"]), ("val", ["c"])):
        for k in keys:
            image = np.full((20, 24, 3), ord(k), np.uint8)
            write_png(tmp_path / split / "dark" / f"{k}_d.png", image // 4)
            write_png(tmp_path / split / "lit" / f"{k}.png", image)
    cfg = load_config(None, ["data.dataset=ours_v1", f"data.root={tmp_path}", "data.resize=null", "data.crop=16"])
    assert cfg.data.kind is entry and cfg.data.is_images
    train, test = resolve_split(cfg.data, "train"), resolve_split(cfg.data, "test")
    assert [p.lq.name for p in train.pairs] == ["a_d.png", "b_d.png"] and [p.gt.name for p in test.pairs] == ["c.png"]
    assert train.format == "image" and train.size == (24, 20) and "ours_v1 in" in train.found and "ours" in test.found
    # The preset's check and the names of the presets come from the entry too.
    with pytest.raises(ConfigError, match="dataset 'ours_v1' takes its folders and file names from its layout"):
        load_config(None, ["data.dataset=ours_v1", "data.lq_root=/x"])
    with pytest.raises(ConfigError, match=r"read by the presets \(lol_v1, lol_v2_real, lol_v2_synthetic, ours_v1\)"):
        load_config(None, ["data.dataset=pairs", "data.root=/x"])
    with pytest.raises(ConfigError, match=r"did you mean 'ours_v1'\? \(the datasets: .*, demo_png, ours_v1\)"):
        load_config(None, ["data.dataset=ours_v2"])


@pytest.mark.parametrize("overrides, align", [
    (["model.options.token_size=8"], 32),  # SNR-Aware: 4 x token_size
    (["model.options.token_size=8", "model.lfpv.enabled=false"], 32),
    (["model.backbone=retinexformer"], 16),  # two stride-2 levels (4) and whole 4 x 4 bank patches at stride 4
    (["model.backbone=retinexformer", "model.lfpv.enabled=false"], 4),
])
def test_the_smallest_crop_and_resize_are_the_models(overrides, align):
    """data.crop and data.resize are checked against the model's alignment when the config loads: a crop the model
    cannot take is refused naming the key, the value and the model's requirement, not at the first step."""
    base = [*overrides, "data.resize=[64, 64]"]
    assert load_config(None, [*base, f"data.crop={align}"]).model.align == align
    with pytest.raises(ConfigError) as info:
        load_config(None, [*base, f"data.crop={align - 1}"])
    message = str(info.value)
    assert f"data.crop must be in [{align}, min(data.resize)]" in message and f"got {align - 1}" in message
    assert f"its alignment model.align = {align}" in message and "backbone '" in message
    if align > 16:  # a crop of 16, the published model's alignment, fails at the first step of this model
        with pytest.raises(ConfigError, match=rf"data.crop must be in \[{align}, min\(data.resize\)\].* got 16"):
            load_config(None, [*base, "data.crop=16"])
    with pytest.raises(ConfigError, match=rf"data.resize must be \[width, height\], each >= {align} .*model.align = "
                                          rf"{align}\), or null, got \[64, {align - 1}\]"):
        load_config(None, [*overrides, f"data.resize=[64, {align - 1}]", f"data.crop={align - 1}"])


def test_an_empty_set_value_clears_a_text_key_and_nulls_a_nullable_one(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("data:\n  dataset: pairs\n  lq_root: /a\n  gt_root: /b\n  lq_prefix: low\n  gt_suffix: _gt\n"
                 "  test_list: t.txt\n")
    cfg = load_config(p, ["data.lq_prefix=", "data.gt_suffix=", "data.test_list="])
    assert (cfg.data.lq_prefix, cfg.data.gt_suffix, cfg.data.test_list) == ("", "", None)
    with pytest.raises(ConfigError, match=r"--set data.lq_prefix=null: data.lq_prefix: expected str"):
        load_config(p, ["data.lq_prefix=null"])  # null is not text: only the empty value clears


def test_data_resize_has_an_upper_bound():
    from lfpv_fast.config import MAX_RESIZE_PIXELS

    with pytest.raises(ConfigError, match=rf"data.resize \[100000, 100000\] is 10000000000 pixels a frame; at most "
                                          rf"{MAX_RESIZE_PIXELS}"):
        load_config("smid", ["data.resize=[100000, 100000]"])
    assert load_config("smid", ["data.resize=[8192, 4096]"]).data.resize == [8192, 4096]
