"""Data-loading throughput (training samples/s, batch 12, 256 x 256 crops) of the loaders.

    python bench/bench_data.py [--quick] [--workers N] [--threads N] [--out FILE]

Rows:
  published    torch loader on raw frames: per sample np.load 1424x2128 LQ + GT, resize to 960x512, crop, flip
  published-512  the same on raw frames that are already 512x960 (the resize is then a copy)
  torch-cache  torch loader on the prepared cache (512x960 frames: np.load, crop, flip)
  dali-cpu     DALI CPU pipeline on the cache (and on raw frames: dali-cpu-raw)
  dali-gpu     DALI with the image ops on the GPU, on the cache and raw (only when CUDA is available)
plus `prepare`: frames/s of `python -m lfpv_fast.prepare` building the cache.

Synthetic frames (random uint8, BGR) at 1424x2128 (H x W, SMID's size) are written to a temp folder
and prepared to 512x960; the files sit in the page cache, so this measures decode/resize/crop
work, not the disk. The first batch of each row (worker start, pipeline build) is not timed.
Prints a table and writes JSON (default bench/results/<date>-<device>-data.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lfpv_fast.config import config_from_dict
from lfpv_fast.pipelines import build_loader
from lfpv_fast.prepare import prepare

RAW_HW = (1424, 2128)
SMALL_RAW_HW = (512, 960)
CACHE_WH = (960, 512)
BATCH, CROP = 12, 256


def write_raw(root: Path, scenes: int, frames: int, hw: tuple[int, int] = RAW_HW) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    names = [f"{i:04d}" for i in range(scenes)] + ["test"]
    for si, scene in enumerate(names):
        (root / "lq" / scene).mkdir(parents=True)
        (root / "gt" / scene).mkdir(parents=True)
        np.save(root / "gt" / scene / "long.npy", np.roll(base, si, axis=1))
        for k in range(frames if scene != "test" else 1):
            np.save(root / "lq" / scene / f"{k:04d}.npy", base // 8 + k)
    (root / "test.txt").write_text("test\n")


def device_name() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def measure(cfg, batches: int) -> tuple[float, int]:
    """Samples/s over `batches` timed batches (after one untimed batch), epochs as needed."""
    loader = build_loader(cfg, "train", seed=0)
    it = iter(loader)
    next(it)  # worker start / pipeline build
    done, t0 = 0, time.perf_counter()
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        done += 1
    if batch["lq"].is_cuda:
        torch.cuda.synchronize()
    return done * BATCH / (time.perf_counter() - t0), done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames and batches (about a minute on 2 cores)")
    ap.add_argument("--workers", type=int, default=min(3, os.cpu_count() or 1), help="torch DataLoader workers")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="DALI CPU threads")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/<date>-<device>-data.json)")
    args = ap.parse_args(argv)
    scenes, frames, batches = (2, 12, 3) if args.quick else (4, 24, 12)
    has_cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lfpv_bench_data_") as tmp:
        root = Path(tmp)
        write_raw(root, scenes, frames)
        # The published baseline pays for the size of the distributed arrays: measure it at both sizes.
        write_raw(root / "small", scenes, frames, SMALL_RAW_HW)
        t0 = time.perf_counter()
        rep = prepare(root / "lq", root / "gt", root / "cache", CACHE_WH, progress=False)
        prep_rate = rep.written / (time.perf_counter() - t0)
        rows.append(
            dict(
                name="prepare",
                loader="-",
                device="cpu",
                source="raw->cache",
                frame="1424x2128",
                workers=min(8, os.cpu_count() or 1),
                threads=0,
                samples_per_s=prep_rate,
                batches=0,
            )
        )
        base = dict(
            lq_root=str(root / "lq"),
            gt_root=str(root / "gt"),
            test_scenes=str(root / "test.txt"),
            resize=list(CACHE_WH),
            crop=CROP,
            batch_size=BATCH,
            flips=True,
            num_workers=args.workers,
            num_threads=args.threads,
        )
        cache = dict(prepared_root=str(root / "cache"))
        plan = [
            ("published", "torch", "cpu", {}, "raw"),
            ("published-512", "torch", "cpu", {"lq_root": str(root / "small" / "lq"),
                                               "gt_root": str(root / "small" / "gt")}, "raw-512"),
            ("torch-cache", "torch", "cpu", cache, "cache"),
            ("dali-cpu", "dali", "cpu", cache, "cache"),
            ("dali-cpu-raw", "dali", "cpu", {}, "raw"),
        ]
        if has_cuda:
            plan += [("dali-gpu", "dali", "gpu", cache, "cache"), ("dali-gpu-raw", "dali", "gpu", {}, "raw")]
        for name, loader, device, extra, source in plan:
            cfg = config_from_dict({"data": {**base, **extra, "loader": loader, "device": device}})
            rate, n = measure(cfg, batches)
            rows.append(
                dict(
                    name=name,
                    loader=loader,
                    device=device,
                    source=source,
                    frame="1424x2128" if source == "raw" else "512x960",  # raw-512: arrays already 512x960
                    workers=args.workers if loader == "torch" else 0,
                    threads=args.threads if loader == "dali" else 0,
                    samples_per_s=rate,
                    batches=n,
                )
            )
            print(f"  {name}: {rate:.1f} samples/s", file=sys.stderr)

    print(f"\n{'row':<14}{'loader':<7}{'device':<7}{'frames':<11}{'workers':>8}{'threads':>8}{'samples/s':>11}")
    for r in rows:
        print(
            f"{r['name']:<14}{r['loader']:<7}{r['device']:<7}{r['frame']:<11}{r['workers']:>8}{r['threads']:>8}"
            f"{r['samples_per_s']:>11.1f}"
        )
    doc = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dali": _dali_version(),
        "batch": BATCH,
        "crop": CROP,
        "raw_frame_hw": list(RAW_HW),
        "cache_frame_hw": [CACHE_WH[1], CACHE_WH[0]],
        "train_frames": scenes * frames,
        "quick": args.quick,
        "rows": rows,
    }
    out = Path(args.out or f"bench/results/{datetime.date.today()}-{doc['device']}-data.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


def _dali_version() -> str | None:
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
