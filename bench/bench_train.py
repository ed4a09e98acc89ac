"""Training-step time: the published code against lfpv_fast, side by side in one process.

    python bench/bench_train.py --published ~/src/LFPVS_ICCV    # the baseline row runs the published code
    python bench/bench_train.py                                 # baseline: our reference ops, labelled so
    python bench/bench_train.py --quick                         # smaller batch, for a smoke run

The SMID model (nf 64; the published class supports no other width) with the same initial weights in
every row, on the same batches (crops of the built-in demo dataset, darkened photos), fp32 unless a
row says otherwise. A step is forward, loss, backward and the Adam step; the pixel (Charbonnier)
loss on both outputs, the VGG term off on both sides (it needs downloaded weights). Data loading is
not timed here (bench/bench_data.py measures it).

Rows:
  published code                  its low_light_transformer4, its mask, loss and Adam (--published), or
  reference ops (...)             lfpv_fast with backend="reference", eager, fp32: numerically the same
  lfpv_fast reference backend     (with --published) lfpv_fast's eager twin, to see the framework cost
  lfpv_fast auto                  backend auto (CPU: lfpv_fast.ops.cpu_ops; CUDA: Triton), eager fp32
  + fused Adam, + torch.compile, + bf16, + CUDA graphs   each adding one switch (CUDA only; compile on
                                  the CPU with --cpu-compile)

All rows are timed interleaved (common.time_rows): min / median / max of >= 5 steps after warm-up, and
the per-round ratio to the first row. Prints a table and writes JSON (bench/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import common
import published as pub_mod
import torch

from lfpv_fast.config import load_config, model_config_to_dict
from lfpv_fast.models import LFPVNet, ModelConfig
from lfpv_fast.ops import reference
from lfpv_fast.training.fast_path import resolve_features
from lfpv_fast.training.trainer import Trainer

BASE = ["train.compile=off", "train.bf16=off", "train.fused_adam=off", "train.channels_last=false",
        "train.cuda_graphs=false", "train.perceptual_weight=0", "logging.progress=false",
        "logging.tensorboard=false", "data.dataset=demo", "data.num_workers=0", "data.loader=torch"]
# (name, overrides on top of the row above, needs CUDA)
FAST_ROWS: list[tuple[str, list[str], bool]] = [
    ("+ fused Adam", ["train.fused_adam=on"], True),
    ("+ torch.compile", ["train.compile=on"], False),
    ("+ bf16", ["train.bf16=on"], True),
    ("+ CUDA graphs", ["train.cuda_graphs=true"], True),
]


def demo_batches(count: int, batch: int, crop: int, overrides: list[str]) -> list[dict]:
    """`count` training batches of the demo dataset (RGB in [0,1]), with the published `nf` (5x5 blur)."""
    from lfpv_fast.data.loaders import build_loader

    data = [o for o in overrides if o.startswith("data.")]
    cfg = load_config("demo", [f"data.batch_size={batch}", f"data.crop={crop}", "data.num_workers=0",
                               "data.resize=[512, 384]", *data])
    batches = []
    for b in build_loader(cfg, "train", seed=0):
        batches.append({"lq": b["lq"], "gt": b["gt"], "nf": reference.box_blur5(b["lq"])})
        if len(batches) == count:
            return batches
    raise RuntimeError("the demo dataset gave too few batches")


def run_config(overrides: list[str], batch: int, crop: int, device: str):
    return load_config("smid", [*BASE, *overrides, f"train.device={device}", f"data.batch_size={batch}",
                                f"data.crop={crop}"])


def make_trainer(cfg, batches: list[dict], tmp: str) -> Trainer:
    features = resolve_features(cfg)
    if cfg.train.backend == "auto" and features.device.type == "cpu":
        # The trainer resolves "auto" to the reference ops on the CPU; this row shows the CPU op set
        # (lfpv_fast.ops.cpu_ops) that LFPVNet(backend="auto") uses there.
        features = dataclasses.replace(features, backend="auto")
    return Trainer(cfg, tmp, train_loader=batches, val_loader=batches, features=features)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pub_mod.add_argument(ap)
    ap.add_argument("--batch", type=int, help="images per step (default: 12 on CUDA, 2 on the CPU)")
    ap.add_argument("--crop", type=int, default=256, help="crop side (default 256, as published)")
    ap.add_argument("--reps", type=int, default=common.MIN_REPS, help="timed steps per row (at least 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (compile, CUDA graphs)")
    ap.add_argument("--quick", action="store_true", help="batch 1, crop 128: a smoke run")
    ap.add_argument("--cpu-compile", action="store_true", help="also run the torch.compile row on the CPU (slow)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for lfpv_fast's rows and the demo data (e.g. data.demo_root=DIR)")
    ap.add_argument("--out", help="JSON path (default bench/results/<date>-<device>-train.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    batch = args.batch or (1 if args.quick else 12 if cuda else 2)
    crop = 128 if args.quick else args.crop
    env = common.environment(device)
    pub = pub_mod.from_args(args)

    batches = demo_batches(3, batch, crop, args.overrides)
    gpu_batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    model_config = run_config(args.overrides, batch, crop, device).model
    if pub is not None and model_config.backbone != "snr_aware":
        ap.error(f"--published compares with the published SNR-Aware code; model.backbone is {model_config.backbone}")
    torch.manual_seed(0)
    initial = LFPVNet(model_config, backend="reference").state_dict()  # the same initial weights in every row

    rows, notes, trainers = {}, {}, []
    counter = {"i": 0}

    def next_batch() -> dict:
        counter["i"] += 1
        return gpu_batches[counter["i"] % len(gpu_batches)]

    with tempfile.TemporaryDirectory(prefix="lfpv_bench_train_") as tmp:
        def add_ours(name: str, overrides: list[str]) -> None:
            cfg = run_config([*args.overrides, *overrides], batch, crop, device)
            trainer = make_trainer(cfg, gpu_batches, str(Path(tmp) / str(len(trainers))))
            trainer.net.load_state_dict(initial)
            trainers.append(trainer)
            rows[name] = lambda: trainer.train_step(next_batch())
            notes[name] = trainer.features.describe()

        if pub is not None:
            model = pub_mod.build_model(pub, published_names(initial, model_config)).to(device)
            step = pub_mod.TrainStep(pub, model)

            def published_step() -> torch.Tensor:
                b = next_batch()
                return step(b["lq"], b["gt"], b["nf"])

            rows[pub_mod.PUBLISHED_LABEL] = published_step
            notes[pub_mod.PUBLISHED_LABEL] = f"{pub.root}: low_light_transformer4, eager fp32"
            add_ours("lfpv_fast reference backend", ["train.backend=reference"])
        else:
            add_ours(pub_mod.REFERENCE_LABEL, ["train.backend=reference"])
        applied = ["train.backend=auto"]
        add_ours("lfpv_fast auto", applied)
        skipped = {}
        for name, overrides, needs_cuda in FAST_ROWS:
            if needs_cuda and not cuda:
                skipped[name] = "needs CUDA"
                continue
            if name == "+ torch.compile" and not cuda and not args.cpu_compile:
                skipped[name] = "CPU: pass --cpu-compile"
                continue
            applied = applied + overrides
            add_ours(name, list(applied))

        timings = common.time_rows(rows, args.reps, args.warmup, device)
        peaks = {}
        if cuda:  # per-row peak: one more step after a reset
            for name, fn in rows.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        for trainer in trainers:
            trainer.close()

    base_name = next(iter(rows))
    base = timings[base_name]
    results = []
    for name in rows:
        t = timings[name]
        ratios = [b / s for b, s in zip(base.seconds, t.seconds, strict=True)]
        results.append({"name": name, "features": notes[name], "step_s": t.summary(),
                        "images_per_s": t.rate(batch), "speedup_vs_first_row": common.Timing(ratios).summary(),
                        "peak_memory_mib": peaks.get(name)})
    results += [{"name": name, "skipped": why} for name, why in skipped.items()]

    print(f"\ntraining step, SMID model, batch {batch}, crops {crop}, {device}: {common.machine_note(env)}")
    print(f"{'row':<48}{'step s: median (min-max)':>28}{'images/s':>10}{'vs first row':>22}")
    for r in results:
        if "skipped" in r:
            print(f"{r['name']:<48}{'skipped: ' + r['skipped']:>60}")
            continue
        print(f"{r['name']:<48}{common.fmt_spread(r['step_s'], '.3f'):>28}{r['images_per_s']['median']:>10.2f}"
              f"{common.fmt_spread(r['speedup_vs_first_row'], '.2f') + 'x':>22}")
    model = "smid" if model_config == ModelConfig() else model_config_to_dict(model_config)
    doc = {"benchmark": "train_step", "model": model, "batch": batch, "crop": crop, "published": str(pub.root)
           if pub else None, "baseline": base_name, "environment": env, "rows": results}
    common.finish(doc, "train", args.out)
    return 0


def published_names(our_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Our state dict under the published names (the same initial weights for the published row)."""
    net = LFPVNet(config, backend="reference")
    net.load_state_dict(our_state)
    return net.to_original_state_dict()


if __name__ == "__main__":
    sys.exit(main())
