"""The paper's claim at small scale: a backbone alone against the same backbone with LFPVs.

    python bench/ablation.py [--steps N] [--seeds 0 1 2] [--backbones snr_aware retinexformer] [--tag NAME]
                             [--demo-root DIR] [--set K=V ...] [--dry-run]

For each backbone (SNR-Aware: configs/demo.yaml; Retinexformer: configs/demo_retinexformer.yaml) and each
seed, two runs of `python -m lfpv_fast.train` on the built-in demo data that differ in one key only,
`model.lfpv.enabled` (true / false): the same data and batch order, steps, schedule, loss terms and seed
(`train.seed`; LFPVNet builds the backbone before the plug-in, so its initial weights are the same in both arms).
Each run's last validation (the held-out scenes, overall and per exposure band, as the trainer reports it)
is collected; the table gives, per backbone, arm and band, the median PSNR/SSIM over the seeds and their range,
and the median difference with - without LFPVs. Writes bench/results/<date>-ablation-<tag>.json and .md.
--dry-run prints the commands without running them. Nothing is tuned for one arm only: both take the
config as it is (plus --set, applied to both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = {"snr_aware": ROOT / "configs" / "demo.yaml", "retinexformer": ROOT / "configs" / "demo_retinexformer.yaml"}
ARMS = {"plain": "false", "lfpv": "true"}


def train_command(backbone: str, arm: str, seed: int, steps: int, out: Path, demo_root: str | None,
                  extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "lfpv_fast.train", "--config", str(CONFIGS[backbone]), "--out", str(out),
               "--set", f"model.lfpv.enabled={ARMS[arm]}", "--set", f"train.seed={seed}",
               "--set", f"train.iterations={steps}", "--set", f"train.restart_period={steps}",
               "--set", f"val.every={steps}", "--set", f"train.checkpoint_every={steps}",
               "--set", "logging.progress=false", "--set", "logging.tensorboard=false"]
    if demo_root is not None:
        command += ["--set", f"data.demo_root={demo_root}"]
    for item in extra:
        command += ["--set", item]
    return command


def last_validation(run_dir: Path) -> dict:
    """The last row of the run's val.jsonl: overall and per-band PSNR/SSIM of input and output."""
    rows = [json.loads(line) for line in (run_dir / "val.jsonl").read_text().splitlines() if line.strip()]
    return rows[-1]


def _value(run: dict, band: str, metric: str) -> float:
    return run[metric] if band == "all" else run["bands"][band][metric]


def summarize(results: list[dict]) -> list[dict]:
    """Median and range over seeds per backbone, arm and band ('all' is the whole held-out set)."""
    table = []
    backbones = sorted({r["backbone"] for r in results})
    for backbone in backbones:
        bands = ["all"] + sorted({b for r in results if r["backbone"] == backbone for b in r["bands"]})
        for band in bands:
            row = {"backbone": backbone, "band": band}
            for arm in ARMS:
                runs = [r for r in results if r["backbone"] == backbone and r["arm"] == arm]
                for metric in ("psnr", "ssim"):
                    values = [_value(r, band, metric) for r in runs]
                    row[f"{arm}_{metric}"] = {"median": statistics.median(values), "min": min(values),
                                              "max": max(values), "n": len(values)}
            for metric in ("psnr", "ssim"):
                paired = []
                for seed in sorted({r["seed"] for r in results if r["backbone"] == backbone}):
                    pair = {r["arm"]: r for r in results if r["backbone"] == backbone and r["seed"] == seed}
                    if len(pair) == 2:
                        paired.append(_value(pair["lfpv"], band, metric) - _value(pair["plain"], band, metric))
                row[f"delta_{metric}"] = {"median": statistics.median(paired), "min": min(paired),
                                          "max": max(paired)} if paired else None
            table.append(row)
    return table


def format_table(table: list[dict]) -> str:
    lines = ["| backbone | band | PSNR plain | PSNR + LFPVs | dPSNR (range) | SSIM plain | SSIM + LFPVs | dSSIM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(stat: dict, digits: int) -> str:
        return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"

    for row in table:
        dp, ds = row["delta_psnr"], row["delta_ssim"]
        delta_psnr = f"{dp['median']:+.2f} ({dp['min']:+.2f} to {dp['max']:+.2f})" if dp else "-"
        delta_ssim = f"{ds['median']:+.4f}" if ds else "-"
        lines.append(f"| {row['backbone']} | {row['band']} | {cell(row['plain_psnr'], 2)} | {cell(row['lfpv_psnr'], 2)}"
                     f" | {delta_psnr} | {cell(row['plain_ssim'], 4)} | {cell(row['lfpv_ssim'], 4)} | {delta_ssim} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of every run (default 600)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of the runs")
    parser.add_argument("--backbones", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--demo-root", default=None, help="data.demo_root (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override applied to every run (both arms)")
    parser.add_argument("--tag", default="demo")
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder of the JSON and table")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.steps < 1 or not args.seeds:
        parser.error("--steps must be >= 1 and --seeds must name at least one seed")

    out = args.out or (Path("<temp dir>") if args.dry_run else Path(tempfile.mkdtemp(prefix="lfpv-ablation-")))
    plan = [(backbone, arm, seed) for backbone in args.backbones for seed in args.seeds for arm in ARMS]
    results = []
    for backbone, arm, seed in plan:
        run_dir = out / f"{backbone}-{arm}-seed{seed}"
        command = train_command(backbone, arm, seed, args.steps, run_dir, args.demo_root, args.overrides)
        if args.dry_run:
            print(" ".join(command))
            continue
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"error: {backbone} {arm} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-2000:]}",
                  file=sys.stderr)
            return 1
        val = last_validation(run_dir)
        seconds = round(time.perf_counter() - start, 1)
        results.append({"backbone": backbone, "arm": arm, "seed": seed, "seconds": seconds,
                        "psnr": val["psnr"], "ssim": val["ssim"], "input_psnr": val["input_psnr"],
                        "bands": {name: {"psnr": b["psnr"], "ssim": b["ssim"]}
                                  for name, b in val.get("bands", {}).items()}})
        print(f"{backbone} {arm} seed {seed}: PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f} "
              f"({results[-1]['seconds']} s)", flush=True)
    if args.dry_run:
        return 0
    table = summarize(results)
    text = format_table(table)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"{time.strftime('%Y-%m-%d')}-ablation-{args.tag}"
    meta = {"steps": args.steps, "seeds": args.seeds, "backbones": args.backbones, "overrides": args.overrides,
            "command": " ".join(["python", "bench/ablation.py", *(argv if argv is not None else sys.argv[1:])])}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "runs": results, "table": table}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(f"# Ablation: plain backbone vs + LFPVs\n\n`{meta['command']}`\n\n"
                                       f"{args.steps} steps, seeds {args.seeds}; median (range) over seeds.\n\n"
                                       f"{text}\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
