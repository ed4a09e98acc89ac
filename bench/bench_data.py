"""Data-loading throughput (training samples/s, batch 12, 256 x 256 crops) of the loaders.

    python bench/bench_data.py [--quick] [--workers N] [--threads N] [--out FILE]
    python bench/bench_data.py decode [--quick] [--cores N] [--out FILE]   # image datasets: see decode_main

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


# ---------------------------------------------------------------------------------------------
# Decode section (image datasets): `python bench/bench_data.py decode [--quick] [--cores N] [--out FILE]`
#
# Self-contained (its own timing loop and image writer) so that it stays separate from the rest of this file.
# Training samples/s of DALI decode + crop + flips (CPU; GPU where CUDA is available, else the row says "not
# measured: no GPU") against the torch loader decoding with Pillow, on 600x400 PNG pairs (LOL's size) and on
# 12-megapixel (4000x3000) JPEG pairs (a camera's), each loader given `--cores` workers / threads, so that
# samples/s per core is samples/s / cores. Rows are interleaved over repeats (torch, DALI, torch, ...) and
# the DALI/torch ratio is reported as min/median/max over the repeats. Then the data-wait share of a training
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


def _decode_rate(cfg, batches: int) -> float:
    """Training samples/s over `batches` batches after one untimed batch (worker start, pipeline build)."""
    loader = build_loader(cfg, "train", seed=0)
    it = iter(loader)
    next(it)
    done, t0 = 0, time.perf_counter()
    while done < batches:
        batch = next(it, None)
        if batch is None:
            it = iter(loader)
            continue
        done += 1
    if batch["lq"].is_cuda:
        torch.cuda.synchronize()
    return done * cfg.data.batch_size / (time.perf_counter() - t0)


def _data_wait_share(cfg, steps: int, run_dir: Path) -> tuple[float, float]:
    """(share of wall time spent waiting for batches, seconds per step) of a training loop on the CPU."""
    from lfpv_fast.trainer import Trainer

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
    repeats, batches, steps = (2, 3, 2) if args.quick else (3, 8, 3)
    has_cuda = torch.cuda.is_available()
    model = yaml.safe_load((configs_dir() / "demo.yaml").read_text())["model"]
    load_before = os.getloadavg()
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
            rates: dict[str, list[float]] = {label: [] for label, _, _ in loaders}
            for _ in range(repeats):  # interleaved: a change of machine load hits every row alike
                for label, loader, device in loaders:
                    rates[label].append(_decode_rate(_decode_cfg(root, name, loader, device, args.cores), batches))
            for label, _loader, _device in loaders:
                r = rates[label]
                ratio = [d / t for d, t in zip(r, rates["torch-pillow"], strict=True)]
                rows.append(dict(set=name, row=label, cores=args.cores, samples_per_s_median=statistics.median(r),
                                 samples_per_s=r, per_core_median=statistics.median(r) / args.cores,
                                 vs_torch_min=min(ratio), vs_torch_median=statistics.median(ratio),
                                 vs_torch_max=max(ratio)))
                print(f"  {name} {label}: {statistics.median(r):.1f} samples/s", file=sys.stderr)
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
        print(f"{r['set']:<13}{r['row']:<14}{r['cores']:>6}{r['samples_per_s_median']:>11.1f}"
              f"{r['per_core_median']:>10.1f}{ratio:>26}")
    print(f"\n{'set':<13}{'row':<14}{'s/step':>8}{'data wait':>11}   (demo model, CPU training step)")
    for w in waits:
        print(f"{w['set']:<13}{w['row']:<14}{w['seconds_per_step']:>8.2f}{w['data_wait_share']:>11.0%}")
    doc = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dali": _dali_version(),
        "pillow": _pillow_version(),
        "crop": DECODE_CROP,
        "sets": {k: dict(zip(("width", "height", "pairs", "batch", "format"), v, strict=True))
                 for k, v in DECODE_SETS.items()},
        "repeats": repeats,
        "timed_batches": batches,
        "quick": args.quick,
        "rows": rows,
        "data_wait": waits,
        "data_wait_model": "configs/demo.yaml model section, CPU, eager, fp32",
    }
    out = Path(args.out or f"bench/results/{datetime.date.today()}-{doc['device']}-decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


def _pillow_version() -> str:
    import PIL
    from PIL import features

    return f"{PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')})"


if __name__ == "__main__":
    sys.exit(decode_main(sys.argv[2:]) if sys.argv[1:2] == ["decode"] else main())
