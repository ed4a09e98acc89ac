"""Data-loading throughput (training samples/s, batch 12, 256 x 256 crops) of the loaders.

    python bench/bench_data.py [--published PATH] [--quick] [--workers N] [--threads N] [--out FILE]

Rows:
  published    with --published PATH (or $LFPV_PUBLISHED): the published training dataset itself
               (data/dataset_SMID_train.py: per sample np.load of the full-size LQ and GT, OpenCV resize to
               960x512, crop, flips, the 5x5 blur) in a DataLoader built as its create_dataloader does.
               Without the path: "reference ops (numerically the published model)", lfpv_fast's torch
               loader on the raw frames, which does the same work the same way.
  published-512  the same on raw frames that are already 512x960 (the resize is then a copy)
  torch-cache  torch loader on the prepared cache (512x960 frames: np.load, crop, flip)
  dali-cpu     DALI CPU pipeline on the cache (and on raw frames: dali-cpu-raw)
  dali-gpu     DALI with the image ops on the GPU, on the cache and raw (only when CUDA is available)
plus `prepare`: frames/s of `python -m lfpv_fast.prepare` building the cache.

Synthetic frames (random uint8, BGR) at 1424x2128 (H x W, SMID's size) are written to a temp folder
and prepared to 512x960; the files sit in the page cache, so this measures decode/resize/crop
work, not the disk. The first batch of each row (worker start, pipeline build) is not timed; then
each row times >= 5 repetitions of --batches batches from the same iterator: samples/s min / median /
max. Rows run one after another, not interleaved: a loader's workers prefetch in the background, so
interleaved loaders would time each other's prefetched batches.
Prints a table and writes JSON (default bench/results/<date>-<device>-data.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import common
import numpy as np
import published as pub_mod
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


def measure(loader, batches: int, reps: int) -> dict:
    """Samples/s (min/median/max) over `reps` repetitions of `batches` batches, after one untimed batch."""
    state = {"it": iter(loader)}
    next(state["it"])  # worker start / pipeline build

    def rep_batches() -> None:
        done = 0
        while done < batches:
            try:
                batch = next(state["it"])
            except StopIteration:  # a new epoch
                state["it"] = iter(loader)
                continue
            done += 1
        key = "lq" if "lq" in batch else "LQs"  # ours, the published dataset's
        if batch[key].is_cuda:
            torch.cuda.synchronize()

    timing = common.time_fn(rep_batches, reps, warmup=0)
    return timing.rate(batches * BATCH)


def published_loader(pub, root: Path, workers: int, lq: str = "lq", gt: str = "gt"):
    ds = pub_mod.dataset(pub, root / lq, root / gt, ["test"], CACHE_WH, CROP, flips=True)
    return pub_mod.loader(pub, ds, BATCH, workers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames and batches (about a minute on 2 cores)")
    ap.add_argument("--workers", type=int, default=min(3, os.cpu_count() or 1), help="torch DataLoader workers")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="DALI CPU threads")
    ap.add_argument("--reps", type=int, default=common.MIN_REPS, help="timed repetitions per row (at least 5)")
    ap.add_argument("--batches", type=int, default=None, help="batches per repetition (default 4; --quick 2)")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/<date>-<device>-data.json)")
    ap.add_argument("--rows", default=None, help="comma-separated subset of the rows (names as printed; "
                    "'published' and 'reference ops' both mean the baseline)")
    pub_mod.add_argument(ap)
    args = ap.parse_args(argv)
    scenes, frames = (2, 12) if args.quick else (4, 24)
    batches = args.batches or (2 if args.quick else 4)
    has_cuda = torch.cuda.is_available()
    env = common.environment()
    pub = pub_mod.from_args(args)
    baseline = "published" if pub else "reference"
    rows = []
    with tempfile.TemporaryDirectory(prefix="lfpv_bench_data_") as tmp:
        root = Path(tmp)
        write_raw(root, scenes, frames)
        # The published baseline pays for the size of the distributed arrays: measure it at both sizes.
        write_raw(root / "small", scenes, frames, SMALL_RAW_HW)
        raw_frame = f"{RAW_HW[0]}x{RAW_HW[1]}"
        caches, written = iter(range(10**6)), {}

        def prepare_once() -> None:  # a fresh cache folder each time; the last one is used below
            written["frames"] = prepare(root / "lq", root / "gt", root / f"cache{next(caches)}", CACHE_WH,
                                        progress=False).written

        prep = common.time_fn(prepare_once, args.reps, warmup=0)
        (root / f"cache{next(caches) - 1}").rename(root / "cache")
        rows.append(
            dict(
                name="prepare",
                loader="-",
                device="cpu",
                source="raw->cache",
                frame=raw_frame,
                workers=min(8, os.cpu_count() or 1),
                threads=0,
                samples_per_s=prep.rate(written["frames"]),  # frames/s
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
            (baseline, "torch", "cpu", {}, "raw"),
            (f"{baseline}-512", "torch", "cpu", {"lq_root": str(root / "small" / "lq"),
                                                "gt_root": str(root / "small" / "gt")}, "raw-512"),
            ("torch-cache", "torch", "cpu", cache, "cache"),
            ("dali-cpu", "dali", "cpu", cache, "cache"),
            ("dali-cpu-raw", "dali", "cpu", {}, "raw"),
        ]
        if has_cuda:
            plan += [("dali-gpu", "dali", "gpu", cache, "cache"), ("dali-gpu-raw", "dali", "gpu", {}, "raw")]
        if args.rows:
            wanted = {w.strip().replace("reference ops", baseline).replace("published", baseline)
                      for w in args.rows.split(",")}
            plan = [p for p in plan if p[0] in wanted]
        for name, loader, device, extra, source in plan:
            if name.startswith("published"):
                data_root = root / "small" if source == "raw-512" else root
                rate = measure(published_loader(pub, data_root, args.workers), batches, args.reps)
                loader = "its own"
            else:
                cfg = config_from_dict({"data": {**base, **extra, "loader": loader, "device": device}})
                rate = measure(build_loader(cfg, "train", seed=0), batches, args.reps)
            rows.append(
                dict(
                    name=name if not name.startswith("reference") else name.replace("reference", "reference ops"),
                    loader=loader,
                    device=device,
                    source=source,
                    frame=raw_frame if source == "raw" else f"{CACHE_WH[1]}x{CACHE_WH[0]}",  # raw-512: already small
                    workers=args.workers if loader in ("torch", "its own") else 0,
                    threads=args.threads if loader == "dali" else 0,
                    samples_per_s=rate,
                    batches=batches,
                )
            )
            print(f"  {name}: {common.fmt_spread(rate, '.1f')} samples/s", file=sys.stderr)

    if not pub:
        print(f"no --published PATH: the '{pub_mod.REFERENCE_LABEL}' rows stand in for the published data code")
    print(f"{common.machine_note(env)}")
    print(f"\n{'row':<18}{'loader':<8}{'device':<7}{'frames':<11}{'workers':>8}{'threads':>8}"
          f"{'samples/s: median (min-max)':>32}")
    for r in rows:
        print(
            f"{r['name']:<18}{r['loader']:<8}{r['device']:<7}{r['frame']:<11}{r['workers']:>8}{r['threads']:>8}"
            f"{common.fmt_spread(r['samples_per_s'], '.1f'):>32}"
        )
    doc = {
        "environment": env,
        "published": str(pub.root) if pub else None,
        "baseline_label": pub_mod.PUBLISHED_LABEL if pub else pub_mod.REFERENCE_LABEL,
        "batch": BATCH,
        "crop": CROP,
        "raw_frame_hw": list(RAW_HW),
        "cache_frame_hw": [CACHE_WH[1], CACHE_WH[0]],
        "train_frames": scenes * frames,
        "quick": args.quick,
        "rows": rows,
    }
    common.finish(doc, "data", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
