"""Record one run of the built-in demo (`python -m lfpv_fast.train`) for the README's figures.

    python bench/demo_run.py [--fresh-data] [--tag NAME]

Runs the demo as a user would (a subprocess, the default config), samples the load average while it runs,
and writes bench/results/<date>-demo-<tag>.json: machine, whether the cores were shared (the load average
against the cores), wall time, whether the demo dataset was built in the run, and the held-out PSNR/SSIM.
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
    parser.add_argument("--tag", default="run", help="name part of the JSON file")
    args = parser.parse_args()

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    loads: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5.0):
            loads.append(os.getloadavg()[0])

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "lfpv_fast.train", "--out", str(run_dir), "--set", "logging.progress=false"]
        if args.fresh_data:
            cmd += ["--set", f"data.demo_root={Path(tmp) / 'demo'}"]
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
        last = json.loads((run_dir / "val.jsonl").read_text().splitlines()[-1])
        built = "building the demo dataset" in done.stdout
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
        "commit": git_commit(),
    }
    out = HERE / "results" / f"{time.strftime('%Y-%m-%d')}-demo-{args.tag}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    minutes, secs = divmod(round(seconds), 60)
    print(f"demo: {minutes} min {secs} s on {cores} core(s), load average {mean_load:.1f} "
          f"({'shared' if record['cores_shared'] else 'idle'}); held-out PSNR {last['input_psnr']:.2f} -> "
          f"{last['psnr']:.2f} dB, SSIM {last['input_ssim']:.4f} -> {last['ssim']:.4f}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
