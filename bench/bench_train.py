"""Training-step time: the published code against lfpv_fast, side by side in one process; and Retinexformer's.

    python bench/bench_train.py --published ~/src/LFPVS_ICCV    # the baseline row runs the published code
    python bench/bench_train.py                                 # baseline: our reference ops, labelled so
    python bench/bench_train.py --quick                         # smaller batch, for a smoke run
    python bench/bench_train.py --backbone retinexformer        # Retinexformer, and Retinexformer + LFPVs

--backbone snr_aware (default): the SMID model (nf 64; the published class supports no other width) of
configs/smid.yaml. --backbone retinexformer: two models of the LOL-v1 preset
(configs/retinexformer_lfpv_lol_v1.yaml: n_feat 40, num_blocks [1, 2, 2], 128x128 crops, batch 8), Retinexformer
alone (model.lfpv.enabled=false) and Retinexformer + LFPVs (at its bottleneck, 160 channels). The preset's crop and
batch on CUDA; on the CPU batch 2 (--batch, --crop to change them). The same initial weights in every row of a
model, the same batches (crops of the built-in demo dataset, darkened photos) in every row, fp32 unless a row
says otherwise. A step is forward, loss, backward and the Adam step; the pixel (Charbonnier) loss on both
outputs (on its one output for a model without LFPVs), the VGG term off on both sides (it needs downloaded
weights). Data loading is not timed here (bench/bench_data.py measures it).

Rows (per model):
  published code                  its low_light_transformer4, its mask, loss and Adam (--published, SMID only), or
  reference ops (...)             lfpv_fast with backend="reference", eager, fp32: numerically the same
  lfpv_fast reference backend     (with --published) lfpv_fast's eager twin, to see the framework cost
  lfpv_fast auto                  backend auto: on the CPU lfpv_fast.ops.cpu_ops (for Retinexformer the same
                                  eager ops as the reference: the IG-MSA kernels are GPU only); on CUDA the
                                  Triton kernels (IG-MSA forward and backward, the LFPV ops), eager fp32
  + fused Adam, + torch.compile, + bf16, + CUDA graphs   each adding one switch (CUDA only; compile on
                                  the CPU with --cpu-compile)

All rows are timed interleaved (common.time_rows; with two models, every row of both): min / median / max of
>= 5 steps after warm-up, and the per-round ratio to the model's first row. Prints a table and writes JSON
(bench/results/<date>-<device>-train.json; -train-retinexformer.json for --backbone retinexformer).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import common
import published as pub_mod
import torch

from lfpv_fast.config import load_config, model_config_to_dict
from lfpv_fast.models import LFPVNet, ModelConfig
from lfpv_fast.ops import reference
from lfpv_fast.ops.backends import resolve_backend
from lfpv_fast.training.fast_path import resolve_features
from lfpv_fast.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

DEMO_RESIZE = "data.resize=[512, 384]"  # the demo photos' size in the batches (every row's config says the same)
BASE = ["train.compile=off", "train.bf16=off", "train.fused_adam=off", "train.channels_last=false",
        "train.cuda_graphs=false", "train.perceptual_weight=0", "logging.progress=false",
        "logging.tensorboard=false", "data.dataset=demo", "data.num_workers=0", "data.loader=torch", DEMO_RESIZE]
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
                               DEMO_RESIZE, *data])
    batches = []
    for b in build_loader(cfg, "train", seed=0):
        batches.append({"lq": b["lq"], "gt": b["gt"], "nf": reference.box_blur5(b["lq"])})
        if len(batches) == count:
            return batches
    raise RuntimeError("the demo dataset gave too few batches")


RETINEXFORMER_PRESET = "configs/retinexformer_lfpv_lol_v1.yaml"


@dataclass(frozen=True)
class Model:
    """One model of the benchmark: a preset and the overrides that make it."""

    label: str
    preset: str  # a packaged config name or a path relative to the repository
    overrides: tuple[str, ...] = ()


MODELS = {
    "snr_aware": [Model("SMID model", "smid")],
    "retinexformer": [Model("Retinexformer", RETINEXFORMER_PRESET, ("model.lfpv.enabled=false",)),
                      Model("Retinexformer + LFPVs", RETINEXFORMER_PRESET)],
}


def preset_path(preset: str) -> str:
    return str(ROOT / preset) if preset.endswith(".yaml") else preset


def run_config(model: Model, overrides: list[str], batch: int, crop: int, device: str):
    return load_config(preset_path(model.preset), [*BASE, *overrides, *model.overrides, f"train.device={device}",
                                                   f"data.batch_size={batch}", f"data.crop={crop}"])


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
    ap.add_argument("--backbone", choices=list(MODELS), default="snr_aware",
                    help="snr_aware: the SMID model (default); retinexformer: Retinexformer and Retinexformer + LFPVs")
    ap.add_argument("--batch", type=int, help="images per step (default: the preset's on CUDA, 2 on the CPU)")
    ap.add_argument("--crop", type=int, help="crop side (default: the preset's, 256 SMID, 128 Retinexformer)")
    ap.add_argument("--reps", type=int, default=common.MIN_REPS, help="timed steps per row (at least 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (compile, CUDA graphs)")
    ap.add_argument("--quick", action="store_true", help="batch 1, crop 128: a smoke run")
    ap.add_argument("--cpu-compile", action="store_true", help="also run the torch.compile row on the CPU (slow)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for lfpv_fast's rows and the demo data (e.g. data.demo_root=DIR)")
    ap.add_argument("--out", help="JSON path (default bench/results/<date>-<device>-train[-retinexformer].json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    models = MODELS[args.backbone]
    preset = load_config(preset_path(models[0].preset), [*BASE, *args.overrides, *models[0].overrides])
    batch = args.batch or (1 if args.quick else preset.data.batch_size if cuda else 2)
    crop = args.crop or (128 if args.quick else preset.data.crop)
    env = common.environment(device)
    pub = pub_mod.from_args(args)

    batches = demo_batches(3, batch, crop, args.overrides)
    gpu_batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    configs = {m.label: run_config(m, args.overrides, batch, crop, device).model for m in models}
    if pub is not None and (len(models) > 1 or configs[models[0].label].backbone != "snr_aware"):
        backbone = configs[models[-1].label].backbone
        ap.error(f"--published compares with the published SNR-Aware code; model.backbone is {backbone}")

    rows, notes, backends, owner, trainers = {}, {}, {}, {}, []
    counter = {"i": 0}

    def next_batch() -> dict:
        counter["i"] += 1
        return gpu_batches[counter["i"] % len(gpu_batches)]

    def row_name(model: Model, name: str) -> str:
        return name if len(models) == 1 else f"{model.label}: {name}"

    skipped = {}
    with tempfile.TemporaryDirectory(prefix="lfpv_bench_train_") as tmp:
        for model in models:
            torch.manual_seed(0)
            # The same initial weights in every row of this model.
            initial = LFPVNet(configs[model.label], backend="reference").state_dict()

            def add_ours(name: str, overrides: list[str], model=model, initial=initial) -> None:
                cfg = run_config(model, [*args.overrides, *overrides], batch, crop, device)
                trainer = make_trainer(cfg, gpu_batches, str(Path(tmp) / str(len(trainers))))
                trainer.net.load_state_dict(initial)
                trainers.append(trainer)
                key = row_name(model, name)
                rows[key] = lambda: trainer.train_step(next_batch())
                notes[key] = trainer.features.describe()
                backends[key] = resolve_backend(trainer.features.backend, device).name  # the op set the row runs
                owner[key] = model.label

            if pub is not None:
                pub_model = pub_mod.build_model(pub, published_names(initial, configs[model.label])).to(device)
                step = pub_mod.TrainStep(pub, pub_model)

                def published_step(step=step) -> torch.Tensor:
                    b = next_batch()
                    return step(b["lq"], b["gt"], b["nf"])

                rows[pub_mod.PUBLISHED_LABEL] = published_step
                notes[pub_mod.PUBLISHED_LABEL] = f"{pub.root}: low_light_transformer4, eager fp32"
                owner[pub_mod.PUBLISHED_LABEL] = model.label
                backends[pub_mod.PUBLISHED_LABEL] = "published"
                add_ours("lfpv_fast reference backend", ["train.backend=reference"])
            else:
                # For SMID the reference ops are numerically the published model (tests/test_golden.py).
                label = pub_mod.REFERENCE_LABEL if args.backbone == "snr_aware" else "reference ops"
                add_ours(label, ["train.backend=reference"])
            applied = ["train.backend=auto"]
            add_ours("lfpv_fast auto", applied)
            for name, overrides, needs_cuda in FAST_ROWS:
                if needs_cuda and not cuda:
                    skipped[row_name(model, name)] = ("needs CUDA", model.label)
                    continue
                if name == "+ torch.compile" and not cuda and not args.cpu_compile:
                    skipped[row_name(model, name)] = ("CPU: pass --cpu-compile", model.label)
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

    baselines = {}  # model label -> its first row
    for name in rows:
        baselines.setdefault(owner[name], name)
    results = []
    for name in rows:
        t, base = timings[name], timings[baselines[owner[name]]]
        ratios = [b / s for b, s in zip(base.seconds, t.seconds, strict=True)]
        results.append({"name": name, "model": owner[name], "backend": backends[name], "features": notes[name],
                        "step_s": t.summary(),
                        "images_per_s": t.rate(batch), "speedup_vs_first_row": common.Timing(ratios).summary(),
                        "peak_memory_mib": peaks.get(name)})
    results += [{"name": name, "model": label, "skipped": why} for name, (why, label) in skipped.items()]

    what = ", ".join(m.label for m in models)
    print(f"\ntraining step, {what}, batch {batch}, crops {crop}, {device}: {common.machine_note(env)}")
    print(f"{'row':<60}{'backend':>10}{'step s: median (min-max)':>28}{'images/s':>10}{'vs first row':>22}")
    for r in results:
        if "skipped" in r:
            print(f"{r['name']:<60}{'skipped: ' + r['skipped']:>70}")
            continue
        print(f"{r['name']:<60}{r['backend']:>10}{common.fmt_spread(r['step_s'], '.3f'):>28}"
              f"{r['images_per_s']['median']:>10.2f}{common.fmt_spread(r['speedup_vs_first_row'], '.2f') + 'x':>22}")
    model_docs = {}
    for m in models:
        cfg = configs[m.label]
        model_docs[m.label] = "smid" if cfg == ModelConfig() else model_config_to_dict(cfg)
    doc = {"benchmark": "train_step", "backbone": args.backbone,
           "model": next(iter(model_docs.values())) if len(models) == 1 else model_docs,
           "preset": models[0].preset, "batch": batch, "crop": crop,
           "published": str(pub.root) if pub else None, "baseline": baselines[models[0].label],
           "baselines": baselines, "environment": env, "rows": results}
    common.finish(doc, "train" if args.backbone == "snr_aware" else f"train-{args.backbone}", args.out)
    return 0


def published_names(our_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Our state dict under the published names (the same initial weights for the published row)."""
    net = LFPVNet(config, backend="reference")
    net.load_state_dict(our_state)
    return net.to_original_state_dict()


if __name__ == "__main__":
    sys.exit(main())
