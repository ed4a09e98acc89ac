"""`python -m lfpv_fast.evaluate -c CONFIG --checkpoint PATH [--save-images DIR]`

Runs the test split (SMID's 49 held-out scenes, first 30 frames each, or the demo's test scenes)
through a model and reports PSNR/SSIM with the published formulas, averaged as the published test
script does: a mean per scene, then the mean of the scene means (the headline number). The mean
over all frames is reported too. Accepts our checkpoints and the published `SMID.pth`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lfpv_fast.checkpoint import atomic_write_text, is_original_state_dict, load_model, read_checkpoint
from lfpv_fast.config import ConfigError, RunConfig, load_config
from lfpv_fast.data.smid import DataError
from lfpv_fast.inference import PRECISIONS, autocast, check_precision, prepare_for_inference
from lfpv_fast.metrics import psnr, quantize, ssim
from lfpv_fast.model import LFPVNet


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


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
             max_images: int | None = None, progress: bool = True, precision: str = "fp32",
             compile: bool = False) -> dict:
    """Evaluate `net` on the config's test split; returns the summary with per-frame rows.

    precision: "fp32" or "bf16"/"fp16" autocast (metrics are computed on the float32 result).
    compile: run the model through torch.compile (the first frames pay the compilation).
    """
    from lfpv_fast.pipelines import build_loader

    net = prepare_for_inference(net.to(device), device)
    model = torch.compile(net, dynamic=True) if compile else net
    loader = build_loader(cfg, "test")
    total = len(loader) if max_images is None else min(len(loader), max_images)
    per_frame: list[dict] = []
    input_rows: list[float] = []
    if save_images is not None:
        save_images.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress)
    for batch in loader:
        lq = batch["lq"].to(device, non_blocking=True)
        with autocast(precision, device):
            out = model(lq, net.snr_mask(lq)).float()
        for i in range(lq.shape[0]):
            if len(per_frame) >= total:
                break
            pred, gt = to_uint8_hwc(out[i]), to_uint8_hwc(batch["gt"][i])
            row = {"scene": batch["scene"][i], "frame": batch["frame"][i],
                   "psnr": float(psnr(pred, gt)), "ssim": float(ssim(pred, gt))}
            input_rows.append(float(psnr(to_uint8_hwc(batch["lq"][i]), gt)))
            per_frame.append(row)
            if save_images is not None:
                from PIL import Image

                stem = f"{row['scene']}.{Path(row['frame']).stem}"
                Image.fromarray(pred).save(save_images / f"{stem}.png")
            bar.update(1)
            bar.set_postfix(psnr=f"{np.mean([r['psnr'] for r in per_frame]):.2f}")
        if len(per_frame) >= total:
            break
    bar.close()
    if not per_frame:
        raise RuntimeError("the test split is empty: check data.test_scenes and the dataset folders")
    summary = summarize(per_frame)
    summary["input_psnr_all_frames"] = float(np.mean(input_rows))
    summary["per_frame"] = per_frame
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lfpv_fast.evaluate", description=__doc__.split("\n\n")[1])
    p.add_argument("-c", "--config", required=True, help="run config (path, or a packaged name: smid, demo)")
    p.add_argument("--checkpoint", required=True, help="our checkpoint or the published SMID.pth")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. data.lq_root=/data/SMID_LQ_np (repeatable)")
    p.add_argument("--save-images", type=Path, default=None, help="write the enhanced frames as PNG here")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default: eval_<checkpoint name>.json next to the checkpoint)")
    p.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--max-images", type=int, default=None, help="stop after this many frames")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                   help="bf16/fp16 autocast: on CUDA; on a CPU only where faster than fp32 (else refused)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the first frames are slow)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    try:
        check_precision(args.precision, device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        raw = read_checkpoint(args.checkpoint)
        published = is_original_state_dict(raw.get("params", raw.get("state_dict", raw)))
        # A published checkpoint carries no config: the config file's model section describes it.
        net = load_model(args.checkpoint, backend=args.backend, config=cfg.model if published else None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = "published SMID format" if published else "lfpv_fast"
    print(f"checkpoint {args.checkpoint} ({kind}); device {device}, {args.precision}"
          f"{', compiled' if args.compile else ''}; test split of {cfg.source}")
    start = time.perf_counter()
    try:
        summary = evaluate(net, cfg, device, args.save_images, args.max_images, progress=not args.no_progress,
                           precision=args.precision, compile=args.compile)
    except (DataError, ConfigError) as exc:  # a dataset problem names the file; no traceback for it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary.update(checkpoint=str(args.checkpoint), checkpoint_format=kind, config=cfg.source,
                   device=str(device), precision=args.precision, compiled=args.compile,
                   seconds=round(time.perf_counter() - start, 2),
                   model_config=asdict(net.config))
    out = args.out or Path(args.checkpoint).with_name(f"eval_{Path(args.checkpoint).stem}.json")
    atomic_write_text(out, json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"input (dark) PSNR, mean of frames: {summary['input_psnr_all_frames']:.4f}")
    print(f"results written to {out}" + (f"; images in {args.save_images}" if args.save_images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
