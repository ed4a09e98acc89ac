"""One convention for the four tools (train, evaluate, enhance, prepare): a usage or input error exits with
status 2 and one line on stderr that starts with `error:` and names what was wrong; nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run
from lfpv_fast import enhance as enhance_cli
from lfpv_fast import evaluate as evaluate_cli
from lfpv_fast import prepare as prepare_cli
from lfpv_fast import train as train_cli

TOOLS = {"train": train_cli.main, "evaluate": evaluate_cli.main, "enhance": enhance_cli.main,
         "prepare": prepare_cli.main}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def raw_smid(tmp_path_factory) -> tuple[Path, Path]:
    """Two raw SMID scenes (uint8 BGR .npy) for prepare."""
    root = tmp_path_factory.mktemp("smid")
    rng = np.random.default_rng(0)
    for scene in ("s1", "s2"):
        (root / "lq" / scene).mkdir(parents=True)
        (root / "gt" / scene).mkdir(parents=True)
        for k in range(2):
            np.save(root / "lq" / scene / f"{k:04d}.npy", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
        np.save(root / "gt" / scene / "long.npy", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return root / "lq", root / "gt"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_usage_error_is_one_line_with_status_2(tool, capsys):
    code, err = run(TOOLS[tool], ["--no-such-flag"], capsys)
    line = assert_one_line_error(code, err, "--help")
    assert "--no-such-flag" in line or "required" in line  # prepare: its required flags are missing


# ---------------------------------------------------------------------------------------------
# prepare (defects 1 and 7): bad arguments fail before anything is written


def prepare_args(raw_smid: tuple[Path, Path], out: Path, *extra: str | Path) -> list[str | Path]:
    return ["--lq", raw_smid[0], "--gt", raw_smid[1], "--out", out, "--no-progress", *extra]


@pytest.mark.parametrize("extra, named", [
    (["--resize", "0", "-5"], "--resize"),
    (["--workers", "-1"], "--workers"),
    (["--workers", "0"], "--workers"),
])
def test_prepare_bad_numbers_are_errors_that_leave_nothing_behind(raw_smid, tmp_path, capsys, extra, named):
    out = tmp_path / "cache"
    code, err = run(prepare_cli.main, prepare_args(raw_smid, out, *extra), capsys)
    assert_one_line_error(code, err, named)
    assert not out.exists()


def test_prepare_into_an_existing_file_is_an_error(raw_smid, tmp_path, capsys):
    out = tmp_path / "cache"
    out.write_text("not a folder")
    code, err = run(prepare_cli.main, prepare_args(raw_smid, out), capsys)
    assert_one_line_error(code, err, str(out))
    assert out.read_text() == "not a folder"


def test_prepare_with_the_same_folder_for_lq_and_gt_is_an_error(raw_smid, tmp_path, capsys):
    lq = raw_smid[0]
    code, err = run(prepare_cli.main, ["--lq", lq, "--gt", lq, "--out", tmp_path / "c", "--no-progress"], capsys)
    assert_one_line_error(code, err, "--gt", "--lq")
    # Also when spelled differently (a trailing "/.", a symlink).
    (tmp_path / "link").symlink_to(lq)
    code, err = run(prepare_cli.main, ["--lq", lq, "--gt", tmp_path / "link", "--out", tmp_path / "c"], capsys)
    assert_one_line_error(code, err, "--gt")
    assert not (tmp_path / "c").exists()


def test_prepare_output_inside_an_input_is_an_error(raw_smid, capsys):
    out = raw_smid[0] / "cache"
    code, err = run(prepare_cli.main, prepare_args(raw_smid, out), capsys)
    assert_one_line_error(code, err, "--out")
    assert not out.exists()


def test_prepare_refuses_to_rewrite_a_cache_of_another_size_unless_asked(raw_smid, tmp_path, capsys):
    out = tmp_path / "cache"
    assert prepare_cli.main([str(a) for a in prepare_args(raw_smid, out, "--resize", "24", "32")]) == 0
    frame = out / "lq" / "s1" / "0000.npy"
    before = frame.read_bytes()
    capsys.readouterr()
    code, err = run(prepare_cli.main, prepare_args(raw_smid, out, "--resize", "16", "32"), capsys)
    line = assert_one_line_error(code, err, str(out), "24x32", "16x32", "--overwrite")
    assert "--resize" in line
    assert frame.read_bytes() == before and (out / "manifest.json").is_file()  # the cache is untouched

    # The same check without a manifest (an interrupted run of the other size).
    (out / "manifest.json").unlink()
    code, err = run(prepare_cli.main, prepare_args(raw_smid, out, "--resize", "16", "32"), capsys)
    assert_one_line_error(code, err, "24x32")
    assert frame.read_bytes() == before

    # --overwrite rebuilds at the new size and says so.
    assert prepare_cli.main([str(a) for a in prepare_args(raw_smid, out, "--resize", "16", "32", "--overwrite")]) == 0
    assert np.load(frame).shape == (32, 16, 3)
    assert "24x32" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# evaluate (defects 1 and 9)


def test_evaluate_max_images_below_one_is_a_usage_error(tiny_checkpoint, tmp_path, capsys):
    for value in ("0", "-3"):
        code, err = run(evaluate_cli.main, ["-c", "demo", "--checkpoint", tiny_checkpoint, "--device", "cpu",
                                            "--max-images", value, "--set", f"data.demo_root={tmp_path}"], capsys)
        assert_one_line_error(code, err, "--max-images")
    assert not any(tmp_path.iterdir())  # failed before the demo dataset was built


@no_cuda
def test_evaluate_and_enhance_on_a_missing_cuda_device_exit_2(tiny_checkpoint, tmp_path, capsys):
    code, err = run(evaluate_cli.main, ["-c", "demo", "--checkpoint", tiny_checkpoint, "--device", "cuda",
                                        "--set", f"data.demo_root={tmp_path}"], capsys)
    assert_one_line_error(code, err, "--device cuda", "no CUDA")
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    code, err = run(enhance_cli.main, [tmp_path / "a.png", "--checkpoint", tiny_checkpoint, "-o", tmp_path / "o",
                                       "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "--device cuda", "no CUDA")
    assert not (tmp_path / "o").exists()


def test_evaluate_bad_device_name_is_a_usage_error(tiny_checkpoint, tmp_path, capsys):
    code, err = run(evaluate_cli.main, ["-c", "demo", "--checkpoint", tiny_checkpoint, "--device", "gpu0",
                                        "--set", f"data.demo_root={tmp_path}"], capsys)
    assert_one_line_error(code, err, "--device", "gpu0")


# ---------------------------------------------------------------------------------------------
# --help of every tool (enhance's once crashed: a literal '%' in a help string)


@pytest.mark.parametrize("tool", ["train", "evaluate", "enhance", "prepare", "app"])
def test_every_tool_prints_its_help(tool):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", f"lfpv_fast.{tool}", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m lfpv_fast.{tool}"), result.stdout[:200]
    assert "--help" in result.stdout and not result.stderr.strip(), result.stderr


# ---------------------------------------------------------------------------------------------
# The inference tools' start-up (lfpv_fast.cli.add_inference_args): one flag set, one meaning

INFERENCE_FLAGS = {"--checkpoint", "--device", "--backend", "--precision", "--compile"}
IMAGE_FLAGS = {"--tile", "--tile-overlap", "--max-pixels", "--max-memory", "--max-image-size"}
# What may differ for a flag two tools share: the app finds a checkpoint itself (not required, says where it
# looks), and its --max-image-size has its own default (its old 40 MP acceptance, said in the help).
MAY_DIFFER = {"--checkpoint": {"required", "help"}, "--max-image-size": {"default", "help"}}


def _flags(tool: str) -> dict[str, object]:
    import importlib

    parser = importlib.import_module(f"lfpv_fast.{tool}").build_parser()
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_the_inference_tools_share_one_flag_set():
    from itertools import combinations

    tools = {tool: _flags(tool) for tool in ("enhance", "evaluate", "app")}
    for tool, flags in tools.items():
        assert INFERENCE_FLAGS <= flags.keys(), (tool, INFERENCE_FLAGS - flags.keys())
    assert IMAGE_FLAGS <= tools["enhance"].keys() and IMAGE_FLAGS <= tools["app"].keys()
    assert not IMAGE_FLAGS & tools["evaluate"].keys()  # evaluate runs whole frames of a test split
    # Every flag that two tools share is the same flag: same destination, type, choices, default and help.
    shared = 0
    for a, b in combinations(tools, 2):
        for flag in sorted(tools[a].keys() & tools[b].keys() - {"-h", "--help"}):
            shared += 1
            ours, theirs = tools[a][flag], tools[b][flag]
            assert type(ours) is type(theirs), (flag, a, b)
            for field in ("dest", "type", "choices", "default", "nargs", "const", "metavar", "required", "help"):
                if field not in MAY_DIFFER.get(flag, ()):
                    assert getattr(ours, field) == getattr(theirs, field), (flag, field, a, b)
    assert shared == 2 * len(INFERENCE_FLAGS) + len(INFERENCE_FLAGS | IMAGE_FLAGS)
    # --max-pixels tiles (no default: images are tiled only when they do not fit) in both tools that take it.
    assert tools["enhance"]["--max-pixels"].default is tools["app"]["--max-pixels"].default is None
    assert "tile images with more pixels" in tools["app"]["--max-pixels"].help


def _checkpoint_of(config, path: Path) -> Path:
    from lfpv_fast.models import LFPVNet
    from lfpv_fast.training.checkpoint import atomic_save, weights_only_checkpoint

    torch.manual_seed(0)
    atomic_save(weights_only_checkpoint(LFPVNet(config, backend="reference")), path)
    return path


@pytest.mark.parametrize("model, align, rule", [
    ("snr_aware token_size 8", 32, "the snr_aware backbone aligns to 32, and 4x4 LFPV patches at its 1/4 site need 16"),
    ("retinexformer with LFPVs", 16,
     "the retinexformer backbone aligns to 4, and 4x4 LFPV patches at its 1/4 site need 16"),
])
def test_the_tile_minimum_is_the_loaded_models_alignment(model, align, rule, tmp_path, capsys):
    """--tile is checked once the model is loaded, against its alignment (one line naming --tile, the value and the
    model's rule; nothing written); a multiple of it is taken."""
    from dataclasses import replace

    from PIL import Image

    from helpers import TINY
    from lfpv_fast.models import ModelConfig

    config = (replace(TINY, token_size=8) if model.startswith("snr_aware") else
              ModelConfig("retinexformer", {"n_feat": 8, "num_blocks": [1, 1, 1]}, {"bank_size": 4,
                                                                                     "updater_width": 16}))
    checkpoint = _checkpoint_of(config, tmp_path / "model.pth")
    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 56, 3), 30, np.uint8)).save(image)
    for tile in (align // 2, align + align // 2):
        code, err = run(enhance_cli.main, [image, "--checkpoint", checkpoint, "-o", tmp_path / "out", "--device",
                                           "cpu", "--tile", tile], capsys)
        assert_one_line_error(code, err, f"--tile must be a positive multiple of {align}", rule, f"got {tile}")
        assert not (tmp_path / "out").exists()
    code, err = run(enhance_cli.main, [image, "--checkpoint", checkpoint, "-o", tmp_path / "out", "--device", "cpu",
                                       "--tile", align, "--tile-overlap", align // 4, "-q"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "out" / "a.png") as result:
        assert result.size == (56, 40)
