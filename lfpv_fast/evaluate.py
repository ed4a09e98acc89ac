"""`python -m lfpv_fast.evaluate -c CONFIG --checkpoint PATH [--save-images DIR] [--gt-mean]`

Runs the test split (SMID's 49 held-out scenes, first 30 frames each, the demo's test scenes, or the
test images of an image dataset such as LOL's eval15) through a model and reports PSNR/SSIM with the
published formulas. SMID-style datasets are averaged as the published test script does: a mean per
scene, then the mean of the scene means (the headline number); the mean over all frames is reported
too. Image datasets (pairs, lol_*) have no scenes: per-image values and their mean over images, as the
low-light literature reports LOL. --gt-mean adds the GT-mean-corrected PSNR (see
lfpv_fast.training.metrics.psnr_gt_mean), reported under that name. Accepts our checkpoints and the published
`SMID.pth`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lfpv_fast.cli import (
    ArgumentParser,
    add_inference_args,
    fail,
    inference_device,
    load_inference_model,
    os_error_line,
)
from lfpv_fast.config import ConfigError, RunConfig, load_config, model_config_to_dict
from lfpv_fast.data.errors import DataError
from lfpv_fast.inference.whole_image import autocast, prepare_for_inference
from lfpv_fast.io.files import write_output
from lfpv_fast.models import LFPVNet, ModelConfig
from lfpv_fast.training.checkpoint import (
    atomic_write_text,
    published_retinexformer_state_dict,
    published_state_dict,
    read_checkpoint,
)
from lfpv_fast.training.metrics import psnr, psnr_gt_mean, quantize, ssim


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) float in [0,1] -> uint8 HWC RGB, quantized as the published tensor2img does."""
    return quantize(image).permute(1, 2, 0).cpu().numpy()


def summarize(per_frame: list[dict]) -> dict:
    """Per-scene means and the two overall means (of scene means, as published; of all frames)."""
    scenes: dict[str, dict[str, list[float]]] = {}
    for row in per_frame:
        s = scenes.setdefault(row["scene"], {"psnr": [], "ssim": []})
        s["psnr"].append(row["psnr"])
        s["ssim"].append(row["ssim"])
    per_scene = {name: {"psnr": float(np.mean(v["psnr"])), "ssim": float(np.mean(v["ssim"])),
                        "frames": len(v["psnr"])} for name, v in scenes.items()}
    return {
        "psnr": float(np.mean([s["psnr"] for s in per_scene.values()])),
        "ssim": float(np.mean([s["ssim"] for s in per_scene.values()])),
        "psnr_all_frames": float(np.mean([r["psnr"] for r in per_frame])),
        "ssim_all_frames": float(np.mean([r["ssim"] for r in per_frame])),
        "frames": len(per_frame),
        "scenes": per_scene,
    }


def summarize_images(rows: list[dict]) -> dict:
    """Image datasets: the mean over images of each metric (every image counts once)."""
    out = {key: float(np.mean([r[key] for r in rows])) for key in ("psnr", "ssim", "psnr_gt_mean") if key in rows[0]}
    out["images"] = len(rows)
    return out


def format_image_table(summary: dict) -> str:
    gt_mean = "psnr_gt_mean" in summary
    head = f"{'image':<32}{'PSNR':>10}{'SSIM':>9}" + (f"{'GT-mean PSNR':>14}" if gt_mean else "")
    lines = [head]
    for r in summary["per_image"]:
        lines.append(f"{r['image']:<32}{r['psnr']:>10.4f}{r['ssim']:>9.4f}"
                     + (f"{r['psnr_gt_mean']:>14.4f}" if gt_mean else ""))
    lines.append(f"{'mean of ' + str(summary['images']) + ' images':<32}{summary['psnr']:>10.4f}{summary['ssim']:>9.4f}"
                 + (f"{summary['psnr_gt_mean']:>14.4f}" if gt_mean else ""))
    return "\n".join(lines)


def format_table(summary: dict) -> str:
    lines = [f"{'scene':<24}{'frames':>8}{'PSNR':>10}{'SSIM':>9}"]
    for name, s in summary["scenes"].items():
        lines.append(f"{name:<24}{s['frames']:>8}{s['psnr']:>10.4f}{s['ssim']:>9.4f}")
    lines.append(f"{'mean of scenes':<24}{summary['frames']:>8}{summary['psnr']:>10.4f}{summary['ssim']:>9.4f}")
    lines.append(f"{'mean of frames':<24}{summary['frames']:>8}"
                 f"{summary['psnr_all_frames']:>10.4f}{summary['ssim_all_frames']:>9.4f}")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(net: LFPVNet, cfg: RunConfig, device: torch.device, save_images: Path | None = None,
             max_images: int | None = None, progress: bool = True, gt_mean: bool = False, precision: str = "fp32",
             compile: bool = False) -> dict:
    """Evaluate `net` on the config's test split; returns the summary with per-frame (per-image) rows.

    precision: "fp32" or "bf16"/"fp16" autocast (metrics are computed on the float32 result).
    compile: run the model through torch.compile (the first frames pay the compilation).
    """
    from lfpv_fast.data.loaders import build_loader

    net = prepare_for_inference(net.to(device), device)
    model = torch.compile(net, dynamic=True) if compile else net
    images = cfg.data.is_images
    loader = build_loader(cfg, "test")
    total = len(loader) if max_images is None else min(len(loader), max_images)
    per_frame: list[dict] = []
    input_rows: list[float] = []
    if save_images is not None:
        save_images.mkdir(parents=True, exist_ok=True)
    image_error: str | None = None  # the first image that could not be written (saving stops there)
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress)
    for batch in loader:
        lq = batch["lq"].to(device, non_blocking=True)
        with autocast(precision, device):
            out = model(lq, net.snr_mask(lq)).float()
        for i in range(lq.shape[0]):
            if len(per_frame) >= total:
                break
            pred, gt = to_uint8_hwc(out[i]), to_uint8_hwc(batch["gt"][i])
            scene, frame = batch["scene"][i], batch["frame"][i]
            if images:  # named by the LQ file's path relative to its folder, without extension
                row = {"image": f"{scene}/{frame}" if scene else frame}
            else:
                row = {"scene": scene, "frame": frame}
            row.update(psnr=float(psnr(pred, gt)), ssim=float(ssim(pred, gt)))
            if gt_mean:
                row["psnr_gt_mean"] = float(psnr_gt_mean(pred, gt))
            input_rows.append(float(psnr(to_uint8_hwc(batch["lq"][i]), gt)))
            per_frame.append(row)
            if save_images is not None and image_error is None:
                target = save_images / (f"{row['image']}.png" if images else f"{scene}.{Path(frame).stem}.png")
                try:
                    _save_png(target, pred)
                except OSError as exc:  # a disk that filled up: the evaluation goes on, its results come first
                    image_error = f"{exc}; the images after it were not saved"
            bar.update(1)
            bar.set_postfix(psnr=f"{np.mean([r['psnr'] for r in per_frame]):.2f}")
        if len(per_frame) >= total:
            break
    bar.close()
    if not per_frame:
        raise DataError(f"{cfg.source}: the test split has no frames (data.dataset={cfg.data.dataset}); check "
                        "data.test_scenes and the dataset folders")
    if images:
        summary = summarize_images(per_frame)
        summary["input_psnr"] = float(np.mean(input_rows))
        summary["per_image"] = per_frame
    else:
        summary = _frame_summary(per_frame, input_rows, gt_mean)
    if image_error is not None:
        summary["save_images_error"] = image_error
    return summary


def _save_png(target: Path, pixels: np.ndarray) -> None:
    """An 8-bit PNG, written atomically (no partial file); OutputWriteError naming it when it cannot be."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_output(target, lambda f: f.write(buffer.getvalue()))


def _frame_summary(per_frame: list[dict], input_rows: list[float], gt_mean: bool) -> dict:
    summary = summarize(per_frame)
    if gt_mean:
        summary["psnr_gt_mean_all_frames"] = float(np.mean([r["psnr_gt_mean"] for r in per_frame]))
    summary["input_psnr_all_frames"] = float(np.mean(input_rows))
    summary["per_frame"] = per_frame
    return summary


def json_ready(summary: dict) -> dict:
    """The summary as valid JSON values: a non-finite number (the PSNR of an output equal to its target is
    infinite; JSON has no infinity) is written as null, and the keys that hold one are listed under "non_finite"."""
    found: list[str] = []

    def clean(value, key: str):
        if isinstance(value, float) and not np.isfinite(value):
            found.append(f"{key} = {value}")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    ready = clean(summary, "")
    if found:
        ready["non_finite"] = {"note": "these values are not finite (an infinite PSNR: the output equals its "
                                       "target); JSON has no infinity, so they are written as null",
                               "values": found[:100], "count": len(found)}
    return ready


def describe_model_config(used: ModelConfig, from_checkpoint: bool, cfg: RunConfig) -> str:
    """One line: which model config runs and where it came from (the checkpoint's wins over the config file's)."""
    if not from_checkpoint:
        return f"model config: the model section of {cfg.source} (the published format carries none)"
    ours, theirs = _flat_fields(used), _flat_fields(cfg.model)
    differs = [f"{k}={ours[k]} (config: {k}={theirs.get(k)})" for k in ours if ours[k] != theirs.get(k)]
    if not differs:
        return f"model config: from the checkpoint (the same as the model section of {cfg.source})"
    return (f"model config: from the checkpoint, which differs from the model section of {cfg.source} in "
            + ", ".join(differs))


def _flat_fields(config: ModelConfig) -> dict[str, object]:
    """backbone, options.KEY, lfpv.KEY: the model config's fields as one flat mapping (for messages)."""
    values = model_config_to_dict(config)
    flat = {"backbone": values["backbone"]}
    flat.update({f"options.{k}": v for k, v in values["options"].items()})
    flat.update({f"lfpv.{k}": v for k, v in values["lfpv"].items()})
    return flat


def check_writable(target: Path, flag: str, folder: bool = False) -> None:
    """Fail now, not after the whole evaluation, if `target` (a file, or a folder with folder=True) cannot be
    written: a file is created and removed in its nearest existing folder (the missing ones are made later)."""
    if not folder and target.is_dir():
        raise ValueError(f"{flag} {target} is a folder; give a file name, e.g. {target / 'results.json'}")
    existing = target if folder else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {target} cannot be written: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lfpv-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {target} cannot be written ({exc.strerror} in {existing}); choose another place "
                         f"with {flag}") from None


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lfpv_fast.evaluate", description=__doc__.split("\n\n")[1])
    p.add_argument("-c", "--config", required=True, help="run config (path, or a packaged name: smid, demo)")
    add_inference_args(p, images=False)  # the flags shared with enhance and the app (lfpv_fast.cli)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. data.lq_root=/data/SMID_LQ_np (repeatable)")
    p.add_argument("--save-images", type=Path, default=None, help="write the enhanced frames as PNG here")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default: eval_<checkpoint name>.json next to the checkpoint)")
    p.add_argument("--max-images", type=int, default=None, help="stop after this many frames")
    p.add_argument("--gt-mean", action="store_true",
                   help="also report the GT-mean-corrected PSNR (the output scaled so that its mean gray level is the "
                        "ground truth's, as several LOL papers report it; not comparable with the plain PSNR)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    out = args.out or Path(args.checkpoint).with_name(f"eval_{Path(args.checkpoint).stem}.json")
    try:
        # First: where the results go. A run of hours must not end with nowhere to write them.
        check_writable(out, "--out" if args.out else "--out (default: next to the checkpoint)")
        if args.save_images is not None:
            check_writable(args.save_images, "--save-images", folder=True)
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    except OSError as exc:  # a name too long for the file system, a file that cannot be read
        return fail(os_error_line(exc))
    try:
        device = inference_device(args)
    except ValueError as exc:  # enhance's line for it (a usage error), and its status
        print(parser.usage_error_line(str(exc)), file=sys.stderr)
        return 2
    try:
        raw = read_checkpoint(args.checkpoint)
        published_lfpv = published_state_dict(raw) is not None
        published_retinexformer = not published_lfpv and published_retinexformer_state_dict(raw) is not None
        published = published_lfpv or published_retinexformer
        # A published checkpoint carries no config: the config file's model section describes it.
        net = load_inference_model(parser, args, config=cfg.model if published else None, loaded=raw)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    except OSError as exc:  # a name too long for the file system, a file that cannot be read
        return fail(os_error_line(exc))
    kind = ("published SMID format" if published_lfpv else
            "published Retinexformer format, plain Retinexformer" if published_retinexformer else "lfpv_fast")
    print(f"checkpoint {args.checkpoint} ({kind}); device {device}, {args.precision}"
          f"{', compiled' if args.compile else ''}; test split of {cfg.source}")
    print(describe_model_config(net.config, not published, cfg))
    start = time.perf_counter()
    try:
        summary = evaluate(net, cfg, device, args.save_images, args.max_images, progress=not args.no_progress,
                           gt_mean=args.gt_mean, precision=args.precision, compile=args.compile)
    except (DataError, ConfigError, OSError) as exc:  # a dataset problem names the file; no traceback for it
        return fail(str(exc))
    summary.update(checkpoint=str(args.checkpoint), checkpoint_format=kind, config=cfg.source,
                   device=str(device), precision=args.precision, compiled=args.compile,
                   seconds=round(time.perf_counter() - start, 2),
                   model_config=model_config_to_dict(net.config),
                   model_config_source="config" if published else "checkpoint")
    if "per_image" in summary:
        print(format_image_table(summary))
        print(f"input (dark) PSNR, mean of images: {summary['input_psnr']:.4f}")
    else:
        print(format_table(summary))
        if "psnr_gt_mean_all_frames" in summary:
            print(f"GT-mean PSNR, mean of frames: {summary['psnr_gt_mean_all_frames']:.4f}")
        print(f"input (dark) PSNR, mean of frames: {summary['input_psnr_all_frames']:.4f}")
    sys.stdout.flush()
    try:  # the results are printed above, so a failure here (a disk that filled up meanwhile) loses nothing shown
        atomic_write_text(out, json.dumps(json_ready(summary), indent=2, allow_nan=False))
    except OSError as exc:
        fail(f"could not write the results file {out}: {exc.strerror or exc}; the results are printed above")
        return 1
    if "save_images_error" in summary:  # the tools' rule for a write that fails during the work: status 1
        print(f"results written to {out}")
        fail(f"{summary['save_images_error']}; the results are printed above")
        return 1
    print(f"results written to {out}" + (f"; images in {args.save_images}" if args.save_images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
