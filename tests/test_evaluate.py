"""`python -m lfpv_fast.evaluate` on the demo's test scenes, with our checkpoint and a published one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import TINY, one_error_line
from lfpv_fast import LFPVNet
from lfpv_fast.evaluate import main, summarize
from lfpv_fast.training.checkpoint import atomic_save, weights_only_checkpoint
from lfpv_fast.training.metrics import psnr


def demo_overrides(root) -> list[str]:
    return ["data.dataset=demo", f"data.demo_root={root}", "data.resize=[256, 192]", "data.crop=128",
            "data.num_workers=0"]


def demo_args(root) -> list[str]:
    args = ["-c", "smid", "--device", "cpu", "--no-progress"]
    for override in demo_overrides(root):
        args += ["--set", override]
    return args


def test_summary_averages_scene_means_like_the_published_script():
    rows = [{"scene": "a", "psnr": 10.0, "ssim": 0.1}, {"scene": "a", "psnr": 20.0, "ssim": 0.3},
            {"scene": "b", "psnr": 40.0, "ssim": 0.8}]
    s = summarize(rows)
    assert s["psnr"] == pytest.approx((15.0 + 40.0) / 2) and s["ssim"] == pytest.approx((0.2 + 0.8) / 2)
    assert s["psnr_all_frames"] == pytest.approx(70.0 / 3)
    assert s["scenes"]["a"] == {"psnr": 15.0, "ssim": pytest.approx(0.2), "frames": 2}


def test_evaluate_our_checkpoint_writes_json_table_and_images(demo_root, tmp_path, capsys):
    torch.manual_seed(0)
    net = LFPVNet(TINY)
    atomic_save(weights_only_checkpoint(net), tmp_path / "ours.pth")
    out_json = tmp_path / "res.json"
    code = main(demo_args(demo_root) + ["--checkpoint", str(tmp_path / "ours.pth"), "--out", str(out_json),
                                        "--max-images", "3", "--save-images", str(tmp_path / "img")])
    assert code == 0
    res = json.loads(out_json.read_text())
    assert res["frames"] == 3 and res["checkpoint_format"] == "lfpv_fast"
    assert set(res["scenes"]) <= {line.strip() for line in (demo_root / "test_scenes.txt").read_text().split()}
    pngs = sorted((tmp_path / "img").glob("*.png"))
    assert len(pngs) == 3
    # The reported PSNR is the published formula on the saved (quantized) output and the ground truth.
    from PIL import Image

    from lfpv_fast.config import load_config
    from lfpv_fast.data.loaders import build_loader

    cfg = load_config("smid", demo_overrides(demo_root))
    first = next(iter(build_loader(cfg, "test")))
    gt = (first["gt"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    row = res["per_frame"][0]
    assert row["scene"] == first["scene"][0] and row["frame"] == first["frame"][0]
    saved = np.asarray(Image.open(tmp_path / "img" / f"{row['scene']}.{row['frame']}.png"))
    assert row["psnr"] == pytest.approx(psnr(saved, gt), abs=1e-9)
    assert "mean of scenes" in capsys.readouterr().out


def test_evaluate_published_format_checkpoint(demo_root, tmp_path):
    torch.manual_seed(0)
    torch.save(LFPVNet().to_original_state_dict(), tmp_path / "SMID.pth")
    code = main(demo_args(demo_root) + ["--checkpoint", str(tmp_path / "SMID.pth"), "--max-images", "1",
                                        "--out", str(tmp_path / "r.json")])
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["checkpoint_format"] == "published SMID format" and res["model_config"]["options"]["nf"] == 64
    assert np.isfinite(res["psnr"])


def test_evaluate_bad_checkpoint_is_a_clear_error(demo_root, tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    assert main(demo_args(demo_root) + ["--checkpoint", str(tmp_path / "bad.pth")]) == 2
    assert "bad.pth" in capsys.readouterr().err


def test_evaluate_missing_dataset_is_a_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "ours.pth"
    atomic_save(weights_only_checkpoint(LFPVNet(TINY)), ckpt)
    args = ["-c", "smid", "--checkpoint", str(ckpt), "--device", "cpu", "--no-progress",
            "--set", f"data.lq_root={tmp_path / 'nope_lq'}", "--set", f"data.gt_root={tmp_path / 'nope_gt'}"]
    assert main(args) == 2
    assert "nope_lq" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Issue 17 item 4: where the results go is checked first; a late failure prints the results before the error


def test_evaluate_checks_where_its_results_go_before_evaluating(demo_root, tmp_path, capsys, monkeypatch,
                                                                small_filesystem):
    import subprocess

    from lfpv_fast import evaluate as evaluate_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although the results could not be written")

    monkeypatch.setattr(evaluate_module, "evaluate", must_not_run)
    ckpt = tmp_path / "ours.pth"
    atomic_save(weights_only_checkpoint(LFPVNet(TINY)), ckpt)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    for out, named in [(tmp_path / "a_file" / "res.json", "is a file, not a folder"),
                       (tmp_path / "a_folder", "is a folder")]:
        assert main(demo_args(demo_root) + ["--checkpoint", str(ckpt), "--out", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"--out {out}" in line and named in line, line
    # The default, next to the checkpoint, on a read-only filesystem.
    folder = small_filesystem(1024)
    atomic_save(weights_only_checkpoint(LFPVNet(TINY)), folder / "ours.pth")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    assert main(demo_args(demo_root) + ["--checkpoint", str(folder / "ours.pth")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(folder / "eval_ours.json") in line and "default: next to the checkpoint" in line, line
    assert "Read-only file system" in line


def test_evaluate_prints_its_results_before_a_late_write_error(demo_root, tmp_path, capsys, monkeypatch,
                                                               small_filesystem):
    import os

    from lfpv_fast import evaluate as evaluate_module

    folder = small_filesystem(256)
    real_evaluate = evaluate_module.evaluate

    def evaluate_then_fill_the_disk(*args, **kwargs):  # the disk fills up while the evaluation runs
        summary = real_evaluate(*args, **kwargs)
        stat = os.statvfs(folder)
        (folder / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize))
        return summary

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate_then_fill_the_disk)
    ckpt = tmp_path / "ours.pth"
    atomic_save(weights_only_checkpoint(LFPVNet(TINY)), ckpt)
    out = folder / "res.json"
    code = main(demo_args(demo_root) + ["--checkpoint", str(ckpt), "--out", str(out), "--max-images", "2"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "mean of scenes" in captured.out and "mean of frames" in captured.out  # the results were printed
    line = one_error_line(captured.err)
    assert f"could not write the results file {out}" in line and "No space left on device" in line
    assert "printed above" in line
    assert sorted(p.name for p in folder.iterdir()) == ["filler"]  # no temporary file left


def test_evaluate_reads_the_checkpoint_file_once(demo_root, tmp_path, monkeypatch):
    """Which format a file is in (ours or published) is learned from the one read that loads it."""
    ours, published = tmp_path / "ours.pth", tmp_path / "SMID.pth"
    atomic_save(weights_only_checkpoint(LFPVNet(TINY)), ours)
    torch.save(LFPVNet().to_original_state_dict(), published)
    reads: list[str] = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    for checkpoint in (ours, published):
        reads.clear()
        assert main(demo_args(demo_root) + ["--checkpoint", str(checkpoint), "--max-images", "1",
                                            "--out", str(tmp_path / f"{checkpoint.stem}.json")]) == 0
        assert reads.count(str(checkpoint)) == 1, reads
