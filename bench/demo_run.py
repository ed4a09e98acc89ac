"""Record one run of the built-in demo (`python -m lfpv_fast.train`) for the README's figures.

    python bench/demo_run.py [--fresh-data] [--tag NAME] [--out DIR] [--picture docs/demo.png] [--set K=V]

Runs the demo as a user would (a subprocess, the default config), samples the load average while it runs,
and writes bench/results/<date>-demo-<tag>.json and .md: machine, whether the cores were shared (the load
average against the cores), wall time, whether the demo dataset was built in the run, and the held-out
PSNR/SSIM of input and output, overall and per exposure band of the demo dataset (lfpv_fast.data.demo).
--picture writes the README's picture from the run's last validation images: the held-out `coffee` photo at
one exposure of each band, input | output | ground truth, each row labelled with its exposure and PSNRs.
This is a record, not a benchmark of the code's speed: on shared cores the time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh-data", action="store_true",
                        help="build the demo dataset in a temporary folder (as a first run does)")
    parser.add_argument("--tag", default="run", help="name part of the JSON and Markdown files")
    parser.add_argument("--out", type=Path, help="keep the run folder here (default: a temporary folder)")
    parser.add_argument("--picture", type=Path, help="write the README's picture (PNG) from the run's images")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to the demo (e.g. train.cpu_threads=1 on cores shared with other work)")
    args = parser.parse_args()

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    loads: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5.0):
            loads.append(os.getloadavg()[0])

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.out or Path(tmp) / "run"
        cmd = [sys.executable, "-m", "lfpv_fast.train", "--out", str(run_dir), "--set", "logging.progress=false"]
        if args.fresh_data:
            cmd += ["--set", f"data.demo_root={Path(tmp) / 'demo'}"]
        for override in args.set:
            cmd += ["--set", override]
        load_before = os.getloadavg()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        validations = [json.loads(line) for line in (run_dir / "val.jsonl").read_text().splitlines()]
        last = validations[-1]
        built = "building the demo dataset" in done.stdout
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        demo_root = Path(config["data"]["demo_root"]).expanduser()
        settings = {f"{scene}_{f['frame']}": f for scene, frames in
                    json.loads((demo_root / "manifest.json").read_text())["frames"].items() for f in frames}
        if args.picture:
            write_picture(run_dir, last["step"], settings, args.picture)
    mean_load = sum(loads) / len(loads) if loads else os.getloadavg()[0]
    record = {
        "what": "demo training: python -m lfpv_fast.train (configs/demo.yaml)",
        "command": " ".join(["python", "-m", "lfpv_fast.train", *cmd[3:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpu": cpu_model(), "cores_available": cores, "torch": torch.__version__,
                    "python": platform.python_version()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_during": {"mean": round(mean_load, 2), "min": round(min(loads, default=mean_load), 2),
                                "max": round(max(loads, default=mean_load), 2), "samples": len(loads)},
        "cores_shared": mean_load > 0.5 * cores,  # more than half the cores busy on average: not an idle machine
        "dataset_built_in_this_run": built,
        "wall_seconds": round(seconds, 1),
        "steps": last["step"],
        "validation": {k: last[k] for k in ("images", "input_psnr", "input_ssim", "psnr", "ssim")},
        "validation_per_exposure_band": last.get("bands", {}),
        "every_validation": validations,
        "exposure_bands": config_bands(),
        "picture": str(args.picture) if args.picture else None,
        "commit": git_commit(),
    }
    out = HERE / "results" / f"{time.strftime('%Y-%m-%d')}-demo-{args.tag}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    minutes, secs = divmod(round(seconds), 60)
    print(f"demo: {minutes} min {secs} s on {cores} core(s), load average {mean_load:.1f} "
          f"({'shared' if record['cores_shared'] else 'idle'}); held-out PSNR {last['input_psnr']:.2f} -> "
          f"{last['psnr']:.2f} dB, SSIM {last['input_ssim']:.4f} -> {last['ssim']:.4f}; written to {out} and .md")
    for name, band in record["validation_per_exposure_band"].items():
        print(f"  exposure {name}: PSNR {band['input_psnr']:.2f} -> {band['psnr']:.2f} dB "
              f"({band['images']} images)")
    return 0


def config_bands() -> dict[str, list[float]]:
    from lfpv_fast.data.demo import BANDS

    return {name: list(edges) for name, edges in BANDS.items()}


def markdown(record: dict) -> str:
    """The record as the table the README quotes."""
    minutes, secs = divmod(round(record["wall_seconds"]), 60)
    load = record["load_average_during"]
    v = record["validation"]
    lines = [
        f"# Demo training, {record['date']}",
        "",
        f"`{record['command']}` (recorded by `python bench/demo_run.py`), commit {record['commit']}, on "
        f"{record['machine']['cores_available']} core(s) of {record['machine']['cpu']}, torch "
        f"{record['machine']['torch']}: {minutes} min {secs} s for {record['steps']} steps and the validations "
        f"({'dataset built in this run' if record['dataset_built_in_this_run'] else 'dataset already built'}). "
        f"Cores {'shared' if record['cores_shared'] else 'idle'}: load average {load['mean']} on average "
        f"({load['min']}-{load['max']}, {load['samples']} samples).",
        "",
        "Held-out images (the `coffee` photo's three scenes, never seen in training), PSNR / SSIM against the "
        "ground truth:",
        "",
        "| exposure band | images | input PSNR | output PSNR | gain | input SSIM | output SSIM |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [*record["validation_per_exposure_band"].items(), ("all", v)]
    for name, b in rows:
        lines.append(f"| {name} | {b['images']} | {b['input_psnr']:.2f} dB | {b['psnr']:.2f} dB | "
                     f"{b['psnr'] - b['input_psnr']:+.2f} dB | {b['input_ssim']:.4f} | {b['ssim']:.4f} |")
    lines += ["", "Exposure: the fraction of the normal exposure in linear light (lfpv_fast/data/demo.py)."]
    if len(record.get("every_validation", [])) > 1:
        names = list(record["validation_per_exposure_band"])
        lines += ["", "Output PSNR at each validation of the run:", "",
                  "| step | " + " | ".join(names) + " | all |", "| --- |" + " --- |" * (len(names) + 1)]
        for val in record["every_validation"]:
            bands = [f"{val['bands'][n]['psnr']:.2f} dB" for n in names]
            lines.append(f"| {val['step']} | " + " | ".join(bands) + f" | {val['psnr']:.2f} dB |")
    if record.get("note"):
        lines += ["", record["note"]]
    if record.get("picture"):
        lines += ["", f"Picture: `{record['picture']}` (input | output | ground truth, one row per band)."]
    return "\n".join(lines) + "\n"


def write_picture(run_dir: Path, step: int, settings: dict[str, dict], path: Path) -> None:
    """The last validation's grids of `coffee` frames 0000-0002 (one per band, frame k in band k % 3), stacked,
    each with a label strip: band, exposure, and the PSNR of input and output against the ground truth."""
    import numpy as np
    from PIL import Image, ImageDraw

    from lfpv_fast.training.metrics import psnr

    rows = []
    for frame in ("0000", "0001", "0002"):
        name = f"coffee_{frame}"
        grid = np.asarray(Image.open(run_dir / "images" / f"step_{step:08d}_{name}.png").convert("RGB"))
        w = grid.shape[1] // 3
        lq, out, gt = grid[:, :w], grid[:, w:2 * w], grid[:, 2 * w:]
        s = settings[name]
        label = (f"exposure {s['exposure']:.3f} (band {s['band']}): input {psnr(lq, gt):.1f} dB | "
                 f"output {psnr(out, gt):.1f} dB | ground truth")
        strip = Image.new("RGB", (grid.shape[1], 16), (255, 255, 255))
        ImageDraw.Draw(strip).text((4, 2), label, fill=(0, 0, 0))
        rows += [np.asarray(strip), grid]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
