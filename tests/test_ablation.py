"""bench/ablation.py: the two arms differ in model.lfpv.enabled only, and the table pairs them by seed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
ablation = importlib.import_module("ablation")


def test_the_two_arms_differ_in_one_key_only(tmp_path):
    plain = ablation.train_command("retinexformer", "plain", 3, 10, tmp_path / "a", None, ["data.crop=64"])
    lfpv = ablation.train_command("retinexformer", "lfpv", 3, 10, tmp_path / "a", None, ["data.crop=64"])
    differ = [(a, b) for a, b in zip(plain, lfpv, strict=True) if a != b]
    assert differ == [("model.lfpv.enabled=false", "model.lfpv.enabled=true")]
    assert "train.seed=3" in plain and "train.iterations=10" in plain and "data.crop=64" in plain


def _run(arm: str, seed: int, psnr: float, band_psnr: float) -> dict:
    return {"backbone": "snr_aware", "arm": arm, "seed": seed, "psnr": psnr, "ssim": psnr / 100,
            "bands": {"0.01-0.03": {"psnr": band_psnr, "ssim": band_psnr / 100}}}


def test_table_gives_medians_ranges_and_paired_differences():
    results = [_run("plain", 0, 20.0, 15.0), _run("lfpv", 0, 21.0, 15.5),
               _run("plain", 1, 22.0, 16.0), _run("lfpv", 1, 21.5, 17.0),
               _run("plain", 2, 19.0, 14.0), _run("lfpv", 2, 20.0, 14.0)]
    table = {row["band"]: row for row in ablation.summarize(results)}
    overall = table["all"]
    assert overall["plain_psnr"] == {"median": 20.0, "min": 19.0, "max": 22.0, "n": 3}
    assert overall["lfpv_psnr"]["median"] == 21.0
    assert overall["delta_psnr"] == {"median": 1.0, "min": -0.5, "max": 1.0}  # paired by seed: +1, -0.5, +1
    assert table["0.01-0.03"]["delta_psnr"] == {"median": 0.5, "min": 0.0, "max": 1.0}
    text = ablation.format_table(ablation.summarize(results))
    assert "| snr_aware | all | 20.00 (19.00-22.00) | 21.00 (20.00-21.50) | +1.00 (-0.50 to +1.00) |" in text


def test_dry_run_prints_every_run(capsys):
    assert ablation.main(["--dry-run", "--steps", "2", "--seeds", "0", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 2 * 2  # backbones x seeds x arms
