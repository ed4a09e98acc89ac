"""Training-step throughput: the published way, then each fast feature added in turn.

    python bench/bench_train.py                      # CUDA: full shapes (batch 12, crops 256); CPU: the demo's
    python bench/bench_train.py --steps 50 --set data.lq_root=/data/SMID_LQ_np --set data.gt_root=/data/SMID_Long_np

Rows, each adding one switch to the row above: published (reference ops, eager, fp32, torch loader) -> + DALI
loader -> + Triton ops -> + fused Adam -> + torch.compile -> + bf16 -> + CUDA graphs. Each row runs in its own
process (so compile caches, CUDA graphs and peak memory do not leak between rows) through the real
Trainer.train_step, data loading included: images/s over --steps steps after --warmup steps, and the peak memory
(CUDA: max allocated after warm-up; CPU: the process's peak RSS). Rows that need CUDA are marked skipped on a CPU
machine; torch.compile on the CPU runs only with --cpu-compile (minutes of warm-up on a small machine).
Without SMID paths the data is the demo dataset (resized to data.resize, so full shapes work too).
Prints a table and writes JSON (--out, default bench/results/<date>-<device>-train.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lfpv_fast.config import load_config
from lfpv_fast.trainer import Trainer

# (name, overrides added by this row, needs CUDA)
ROWS: list[tuple[str, list[str], bool]] = [
    ("published", ["train.backend=reference", "train.compile=off", "train.bf16=off", "train.fused_adam=off",
                   "train.channels_last=false", "train.cuda_graphs=false", "data.loader=torch"], False),
    ("+ DALI loader", ["data.loader=dali", "data.device=gpu"], True),
    ("+ Triton ops", ["train.backend=triton"], True),
    ("+ fused Adam", ["train.fused_adam=on"], True),
    ("+ torch.compile", ["train.compile=on"], False),
    ("+ bf16", ["train.bf16=on"], True),
    ("+ CUDA graphs", ["train.cuda_graphs=true"], True),
]
FULL = ["data.batch_size=12", "data.crop=256", "data.resize=[960, 512]", "data.num_workers=6"]  # smid model
SMALL_CONFIG = "demo"


def device_name() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def measure(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """One row, in this process: build a Trainer and time train_step (data loading included)."""
    cfg = load_config(config, [*overrides, "logging.progress=false", "logging.tensorboard=false"])
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        batches = iter(trainer.train_loader)

        def batch():
            nonlocal batches
            b = next(batches, None)
            if b is None:
                batches = iter(trainer.train_loader)
                b = next(batches)
            return b

        t0 = time.perf_counter()
        for _ in range(warmup):
            loss = trainer.train_step(batch())
        float(loss)
        warmup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = trainer.train_step(batch())
        float(loss)  # waits for the last step
        elapsed = time.perf_counter() - t0
        trainer.close()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"images_per_s": steps * cfg.data.batch_size / elapsed, "step_ms": 1000 * elapsed / steps,
            "peak_memory_mib": peak / 2**20, "warmup_s": warmup_s, "features": trainer.features.describe()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="base config (default: smid at full shapes on CUDA, demo on the CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, help="timed steps per row (default: 30 on CUDA, 5 on the CPU)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, CUDA graph capture)")
    ap.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up (smoke run)")
    ap.add_argument("--cpu-compile", action="store_true", help="also run the torch.compile row on the CPU")
    ap.add_argument("--out", help="JSON path (default: bench/results/<date>-<device>-train.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # JSON list of overrides: measure one row, print JSON
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    config = args.config or ("smid" if cuda else SMALL_CONFIG)
    if args.quick:
        args.steps, args.warmup = args.steps or 3, 1
    steps = args.steps or (30 if cuda else 5)
    if args.child is not None:
        print(json.dumps(measure(config, json.loads(args.child), steps, args.warmup)))
        return 0

    full = cuda and args.config is None
    # Full shapes read the demo frames upscaled to data.resize unless SMID paths are given.
    smid_data = any(o.startswith(("data.lq_root=", "data.prepared_root=")) for o in args.overrides)
    base = (FULL + ([] if smid_data else ["data.dataset=demo"]) if full else []) + args.overrides
    results, applied = [], list(base)
    for name, overrides, needs_cuda in ROWS:
        row = {"name": name, "overrides": overrides}
        if needs_cuda and not cuda:
            row["skipped"] = "needs CUDA"
        elif name == "+ torch.compile" and not cuda and not args.cpu_compile:
            row["skipped"] = "CPU: pass --cpu-compile"
        else:
            applied += overrides
            cmd = [sys.executable, __file__, "--config", config, "--steps", str(steps), "--warmup", str(args.warmup),
                   "--child", json.dumps(applied)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                row["skipped"] = f"failed: {tail}"
                applied = applied[: len(applied) - len(overrides)]  # later rows build on the last working one
            else:
                row.update(json.loads(lines[-1]))
        results.append(row)
        done = row.get("skipped") or f"{row['images_per_s']:.2f} images/s"
        print(f"{name}: {done}", file=sys.stderr)

    baseline = next((r["images_per_s"] for r in results if "images_per_s" in r), None)
    print(f"\ntraining step, {config} config{' (full shapes)' if full else ''}, "
          f"device {device_name()}, torch {torch.__version__}, {steps} steps after {args.warmup} warm-up")
    print(f"{'row':<18}{'images/s':>10}{'vs published':>14}{'step ms':>10}{'peak MiB':>10}")
    for r in results:
        if "images_per_s" in r:
            print(f"{r['name']:<18}{r['images_per_s']:>10.2f}{r['images_per_s'] / baseline:>13.2f}x"
                  f"{r['step_ms']:>10.1f}{r['peak_memory_mib']:>10.0f}")
        else:
            print(f"{r['name']:<18}{'skipped: ' + r['skipped']:>52}")

    out = Path(args.out) if args.out else \
        Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-{device_name()}-train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_step", "config": config, "base_overrides": base, "steps": steps,
                               "warmup": args.warmup, "device": device_name(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
