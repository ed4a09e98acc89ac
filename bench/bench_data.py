"""Data-loading throughput (training samples/s, batch 12, 256 x 256 crops) of the loaders.

    python bench/bench_data.py [--published PATH] [--quick] [--workers N] [--threads N] [--out FILE]
    python bench/bench_data.py decode [--quick] [--cores N] [--out FILE]   # image datasets: see decode_main

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
import time
from pathlib import Path

import common
import numpy as np
import published as pub_mod
import torch

from lfpv_fast.config import config_from_dict
from lfpv_fast.data.loaders import build_loader
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


# ---------------------------------------------------------------------------------------------
# Decode section (image datasets): `python bench/bench_data.py decode [--quick] [--cores N] [--out FILE]`
#
# Training samples/s of DALI decode + crop + flips (CPU; GPU where CUDA is available, else the row says "not
# measured: no GPU") against the torch loader decoding with Pillow, on 600x400 PNG pairs (LOL's size) and on
# 12-megapixel (4000x3000) JPEG pairs (a camera's), each loader given `--cores` workers / threads, so that
# samples/s per core is samples/s / cores. Each row is timed by common.time_fn (>= 5 repetitions of `batches`
# batches after a warm-up run), rows one after another (see the module docstring); the DALI/torch ratio is
# min/median/max over the repetitions, paired in order. Then the data-wait share of a training
# step: the fraction of wall time a training loop (the demo config's small model at the same crop and batch,
# on the CPU) spends waiting for the next batch. Images are synthetic (smooth colour gradients plus noise,
# written to a temporary folder at run time); files sit in the page cache, so this is decode work, not disk.

DECODE_SETS = {  # name: (width, height, pairs, batch, format); 12 batches an epoch, as in a real dataset
    "png-600x400": (600, 400, 96, 8, "png"),
    "jpeg-12mp": (4000, 3000, 24, 2, "jpeg"),
}
DECODE_CROP = 256


def _decode_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth gradients at a few scales plus mild noise (compresses like a photo)."""
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        f1, f2, ph = rng.uniform(2, 9), rng.uniform(2, 9), rng.uniform(0, 6)
        img[:, :, c] = 0.5 + 0.3 * np.sin(f1 * xx * 6.28 + ph) * np.cos(f2 * yy * 6.28) + 0.1 * np.sin(40 * xx * yy)
    img += rng.normal(0, 0.01, (h, w, 1)).astype(np.float32)
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)


def _write_decode_set(root: Path, name: str) -> None:
    from PIL import Image

    w, h, n, _, fmt = DECODE_SETS[name]
    rng = np.random.default_rng(11)
    for k in range(n + 1):  # the last pair is the (unused) test split
        split = "test" if k == n else "train"
        gt = _decode_image(rng, w, h)
        for side, img in (("low", (gt // 4 + 2)), ("high", gt)):
            folder = root / name / split / side
            folder.mkdir(parents=True, exist_ok=True)
            if fmt == "png":
                Image.fromarray(img).save(folder / f"{k:04d}.png")
            else:
                Image.fromarray(img).save(folder / f"{k:04d}.jpg", quality=90)  # 4:2:0, as cameras write


def _decode_cfg(root: Path, name: str, loader: str, device: str, cores: int, model: dict | None = None):
    _, _, _, batch, _ = DECODE_SETS[name]
    base = root / name
    data = dict(dataset="pairs", lq_root=str(base / "train/low"), gt_root=str(base / "train/high"),
                test_lq_root=str(base / "test/low"), test_gt_root=str(base / "test/high"), resize=None,
                crop=DECODE_CROP, batch_size=batch, loader=loader, device=device, num_workers=cores,
                num_threads=cores)
    raw = {"data": data, "logging": {"progress": False, "tensorboard": False}}
    if model is not None:
        raw["model"] = model
    return config_from_dict(raw)


def _batches_row(cfg, batches: int):
    """A row for common.time_rows: each call takes the next `batches` batches of one loader (a new epoch
    when one ends), so that worker start and pipeline build fall in the warm-up call."""
    loader = build_loader(cfg, "train", seed=0)
    state = {"it": iter(loader)}

    def run() -> None:
        done = 0
        while done < batches:
            batch = next(state["it"], None)
            if batch is None:
                state["it"] = iter(loader)
                continue
            done += 1
        if batch["lq"].is_cuda:
            torch.cuda.synchronize()

    return run


def _data_wait_share(cfg, steps: int, run_dir: Path) -> tuple[float, float]:
    """(share of wall time spent waiting for batches, seconds per step) of a training loop on the CPU."""
    from lfpv_fast.training.trainer import Trainer

    loader = build_loader(cfg, "train", seed=0)
    trainer = Trainer(cfg, run_dir, train_loader=loader, val_loader=loader)
    try:
        it = iter(loader)
        trainer.train_step(next(it))  # untimed: first allocations, worker start
        wait, t0 = 0.0, time.perf_counter()
        for _ in range(steps):
            t1 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                it = iter(loader)
                batch = next(it)
            wait += time.perf_counter() - t1
            trainer.train_step(batch)
        total = time.perf_counter() - t0
    finally:
        trainer.close()
    return wait / total, total / steps


def decode_main(argv: list[str] | None = None) -> int:
    import shutil
    import statistics

    import yaml

    from lfpv_fast.config import configs_dir

    ap = argparse.ArgumentParser(prog="python bench/bench_data.py decode",
                                 description="decode + crop throughput of image datasets: DALI against Pillow")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, batches and steps")
    ap.add_argument("--cores", type=int, default=1, help="torch workers = DALI threads (default 1: per core)")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/<date>-<device>-decode.json)")
    args = ap.parse_args(argv)
    batches, steps = (3, 2) if args.quick else (8, 3)
    has_cuda = torch.cuda.is_available()
    model = yaml.safe_load((configs_dir() / "demo.yaml").read_text())["model"]
    env = common.environment()
    rows, waits = [], []
    with tempfile.TemporaryDirectory(prefix="lfpv_bench_decode_") as tmp:
        root = Path(tmp)
        for name in DECODE_SETS:
            t0 = time.perf_counter()
            _write_decode_set(root, name)
            print(f"  wrote {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            loaders = [("torch-pillow", "torch", "cpu"), ("dali-cpu", "dali", "cpu")]
            if has_cuda:
                loaders.append(("dali-gpu", "dali", "gpu"))
            # One row after another, each loader shut down before the next starts: idle loaders' workers
            # would otherwise prefetch in the background while another row is timed.
            timed = {}
            for label, loader, device in loaders:
                row = _batches_row(_decode_cfg(root, name, loader, device, args.cores), batches)
                timed[label] = common.time_fn(row)
                del row
            samples = batches * DECODE_SETS[name][3]
            for label, _loader, _device in loaders:
                rate = timed[label].rate(samples)
                ratio = [t / d for d, t in zip(timed[label].seconds, timed["torch-pillow"].seconds, strict=True)]
                rows.append(dict(set=name, row=label, cores=args.cores, samples_per_s=rate,
                                 per_core_median=rate["median"] / args.cores, vs_torch_min=min(ratio),
                                 vs_torch_median=statistics.median(ratio), vs_torch_max=max(ratio)))
                print(f"  {name} {label}: {common.fmt_spread(rate, '.1f')} samples/s", file=sys.stderr)
            if not has_cuda:
                rows.append(dict(set=name, row="dali-gpu", note="not measured: no GPU"))
            for label, loader, device in loaders:
                if device == "gpu":
                    continue  # the training step runs on the CPU here; a GPU step belongs to a GPU session
                cfg = _decode_cfg(root, name, loader, device, args.cores, model)
                share, per_step = _data_wait_share(cfg, steps, root / f"run-{name}-{label}")
                shutil.rmtree(root / f"run-{name}-{label}", ignore_errors=True)
                waits.append(dict(set=name, row=label, cores=args.cores, data_wait_share=share,
                                  seconds_per_step=per_step, steps=steps))
                print(f"  {name} {label}: data wait {share:.0%} of a {per_step:.2f} s step", file=sys.stderr)
    print(f"\n{'set':<13}{'row':<14}{'cores':>6}{'samples/s':>11}{'per core':>10}{'DALI/torch min/med/max':>26}")
    for r in rows:
        if "note" in r:
            print(f"{r['set']:<13}{r['row']:<14}{'':>6}  {r['note']}")
            continue
        ratio = f"{r['vs_torch_min']:.2f}/{r['vs_torch_median']:.2f}/{r['vs_torch_max']:.2f}"
        print(f"{r['set']:<13}{r['row']:<14}{r['cores']:>6}{r['samples_per_s']['median']:>11.1f}"
              f"{r['per_core_median']:>10.1f}{ratio:>26}")
    print(f"\n{'set':<13}{'row':<14}{'s/step':>8}{'data wait':>11}   (demo model, CPU training step)")
    for w in waits:
        print(f"{w['set']:<13}{w['row']:<14}{w['seconds_per_step']:>8.2f}{w['data_wait_share']:>11.0%}")
    doc = {
        "environment": env,
        "pillow": _pillow_version(),
        "crop": DECODE_CROP,
        "sets": {k: dict(zip(("width", "height", "pairs", "batch", "format"), v, strict=True))
                 for k, v in DECODE_SETS.items()},
        "timed_batches_per_rep": batches,
        "quick": args.quick,
        "rows": rows,
        "data_wait": waits,
        "data_wait_model": "configs/demo.yaml model section, CPU, eager, fp32",
    }
    print(common.machine_note(env))
    common.finish(doc, "decode", args.out)
    return 0


def _pillow_version() -> str:
    import PIL
    from PIL import features

    return f"{PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')})"


if __name__ == "__main__":
    sys.exit(decode_main(sys.argv[2:]) if sys.argv[1:2] == ["decode"] else main())
