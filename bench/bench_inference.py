"""Inference: one frame against the published code, whole photos in bounded memory, bf16 against fp32.

    python bench/bench_inference.py --published ~/src/LFPVS_ICCV                 # all parts
    python bench/bench_inference.py --parts frame --reps 7
    python bench/bench_inference.py --parts frame --device cuda                    # the frame part on a GPU
    python bench/bench_inference.py --parts precision --checkpoint runs/demo-.../final_weights.pth

Parts:
  frame      One 512x960 frame, eval, the SMID model (random weights, random banks; the same in every
             row), timed interleaved in one process (min / median / max of >= 5 after warm-up) with the
             per-round ratio to the first row, and each output's largest difference from lfpv_fast's
             reference backend. Rows: the published code (--published; else "reference ops (numerically
             the published model)"), lfpv_fast reference backend (with --published), lfpv_fast auto
             (net(x, snr)), auto + channels_last (what enhance and evaluate run on the CPU), that through
             enhance's whole-image path (whole_image_forward: strips), and + bf16 autocast. Two inputs:
             a dark frame (see --input; its SNR map keeps few or no attention keys) and the same frame
             with an SNR map of ones (every key kept: the attention's worst case).
  memory     Peak memory and time of enhancing a whole photo untiled (enhance_image, backend auto) at
             1, 4 and 12 megapixels (4:3), each in a fresh subprocess: peak RSS (VmHWM of
             /proc/self/status) above the RSS before the call, against estimate_peak_bytes. Also the
             plain forward net(x, snr) with the auto and the reference backend at the sizes where they fit.
  precision  With --checkpoint (e.g. the demo model of `python -m lfpv_fast.train`): PSNR of the bf16
             output against the fp32 output on the demo's test images (whole images), and the times.

The frame and memory parts' input (--input, recorded in the JSON as "input"):
  photo      (default) the demo's coffee photo, resized, darkened by the demo's low-light model; needs
             scikit-image, which ships the photo
  synthetic  a deterministic photo-like scene made with numpy and torch alone (smooth shading, objects with
             sharp edges, fine texture), darkened by the same model: for a Python without scikit-image
             (gpu-check uses it there)
  PATH       your own image (PNG, JPEG or TIFF, read as `enhance` reads it), resized, used as it is (give a
             low-light photo); a file named photo or synthetic: ./photo

Prints tables and writes JSON (bench/results/<date>-<device>-inference.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import common
import numpy as np
import published as pub_mod
import torch
import torch.nn.functional as F

from lfpv_fast.enhance import enhance_image, plan_enhancement
from lfpv_fast.inference.whole_image import estimate_peak_bytes, prepare_for_inference, whole_image_forward
from lfpv_fast.model import LFPVNet, ModelConfig

FRAME_HW = (512, 960)
SIZES_MP = {1: (864, 1152), 4: (1728, 2304), 12: (3000, 4000)}
MODEL = ModelConfig()  # the published SMID model (the tests swap in a tiny one)
DARK_EXPOSURE = 0.02  # of the demo's low-light model (lfpv_fast.data.demo.darken), for photo and synthetic
INPUT_LABELS = {"photo": "dark photo", "synthetic": "dark synthetic frame"}


class InputError(Exception):
    """An --input that cannot be used (the message names it and what was expected)."""


def darken_like_the_recorded_benchmarks(image: np.ndarray) -> np.ndarray:
    """The demo's low-light model at its first (version 1) settings, drawn in the same order with seed 0:
    exposure DARK_EXPOSURE with 10% jitter, 2000 electrons at full scale, read noise 2. The photo is then
    the one the recorded benchmarks used."""
    from lfpv_fast.data.demo import FrameSettings, darken

    rng = np.random.default_rng(0)
    settings = FrameSettings("0.01-0.03", DARK_EXPOSURE * rng.uniform(0.9, 1.1), photons=2000.0, read_noise=2.0)
    return darken(image, rng, settings)


def dark_photo(height: int, width: int) -> torch.Tensor:
    """(1,3,H,W) in [0,1]: the demo's coffee photo resized, darkened by the demo's low-light model."""
    from PIL import Image

    from lfpv_fast.data.demo import load_photo

    photo = np.asarray(Image.fromarray(load_photo("coffee")).resize((width, height), Image.Resampling.BICUBIC))
    lq = darken_like_the_recorded_benchmarks(photo)
    return torch.from_numpy(lq).permute(2, 0, 1)[None].float() / 255


def _smooth_noise(rng: np.random.Generator, channels: int, height: int, width: int, cell: float) -> np.ndarray:
    """(channels,H,W) float32 noise with features about `cell` pixels wide: a coarse random grid, upsampled
    bicubically (torch on the CPU: deterministic)."""
    grid = rng.standard_normal((1, channels, max(2, round(height / cell) + 1), max(2, round(width / cell) + 1)))
    up = F.interpolate(torch.from_numpy(grid.astype(np.float32)), size=(height, width), mode="bicubic",
                       align_corners=True)
    return up[0].numpy()


def synthetic_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A well-lit, photo-like (H,W,3) uint8 scene from numpy and torch alone, the same for the same arguments:
    smooth coloured shading, a few dozen objects (discs and boxes) with sharp edges and their own shading, and
    fine texture. Object sizes scale with the frame; the texture is a few pixels wide, as in photos."""
    rng = np.random.default_rng(seed)
    side = min(height, width)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    # Background: a colour gradient across the frame plus large soft blotches (light falloff, walls, sky).
    base, slope_x, slope_y = rng.uniform(0.2, 0.8, (3, 3, 1, 1)).astype(np.float32)
    image = base + 0.3 * (slope_x - 0.5) * xs / width + 0.3 * (slope_y - 0.5) * ys / height
    image += 0.12 * _smooth_noise(rng, 3, height, width, side / 3)
    # Objects: a colour with a top-to-bottom shading ramp, hard edges; each drawn inside its bounding box.
    for _ in range(40):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        half_h = side * rng.uniform(0.03, 0.18)
        half_w = half_h * (1.0 if rng.uniform() < 0.5 else rng.uniform(0.4, 2.5))
        disc = half_w == half_h
        colour = rng.uniform(0.05, 0.95, (3, 1, 1)).astype(np.float32)
        y0, y1 = int(max(0, cy - half_h)), int(min(height, cy + half_h + 1))
        x0, x1 = int(max(0, cx - half_w)), int(min(width, cx + half_w + 1))
        dy, dx = ys[y0:y1] - cy, xs[:, x0:x1] - cx
        inside = (dy**2 + dx**2 < half_h**2) if disc else (np.abs(dy) < half_h) & (np.abs(dx) < half_w)
        shade = 1.0 - 0.5 * np.clip(dy / (2 * half_h) + 0.5, 0.0, 1.0)
        box = image[:, y0:y1, x0:x1]
        box[:] = np.where(inside, colour * shade, box)
    # Texture: mid-frequency (fabric, foliage) and pixel-scale (grain) variation of brightness.
    image *= 1.0 + 0.15 * _smooth_noise(rng, 1, height, width, 6.0) + 0.05 * _smooth_noise(rng, 1, height, width, 2.0)
    return np.round(np.clip(image, 0.0, 1.0).transpose(1, 2, 0) * 255.0).astype(np.uint8)


def dark_synthetic_frame(height: int, width: int) -> torch.Tensor:
    """(1,3,H,W) in [0,1]: synthetic_scene darkened by the demo's low-light model, as dark_photo is."""

    lq = darken_like_the_recorded_benchmarks(synthetic_scene(height, width))
    return torch.from_numpy(lq).permute(2, 0, 1)[None].float() / 255


def image_file_frame(path: str, height: int, width: int) -> torch.Tensor:
    """(1,3,H,W) in [0,1]: an image file read as `enhance` reads it, resized bicubically, not darkened."""
    from lfpv_fast.io.imageio import ImageReadError, read_image

    try:
        image = read_image(path)
    except (ImageReadError, FileNotFoundError) as exc:
        raise InputError(f"--input {path}: {exc} (expected photo, synthetic or a PNG, JPEG or TIFF file)") from exc
    x = image.to_tensor()[None]
    return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def input_frame(source: str, height: int, width: int) -> torch.Tensor:
    """The --input frame at (height, width): "photo", "synthetic" or an image file's path."""
    if source == "photo":
        from lfpv_fast.data.errors import DataError

        try:
            return dark_photo(height, width)
        except DataError as exc:
            raise InputError(f"--input photo: {exc}; without scikit-image use --input synthetic (needs no "
                             "optional package) or --input PATH") from exc
    if source == "synthetic":
        return dark_synthetic_frame(height, width)
    return image_file_frame(source, height, width)


def describe_input(source: str) -> dict:
    """What the JSON records about the input."""
    if source == "photo":
        return {"kind": "photo", "label": INPUT_LABELS["photo"],
                "description": "the demo's coffee photo (scikit-image), resized, darkened by the demo's "
                               f"low-light model (exposure {DARK_EXPOSURE}, seed 0)"}
    if source == "synthetic":
        return {"kind": "synthetic", "label": INPUT_LABELS["synthetic"],
                "description": "bench_inference.synthetic_scene (seed 0), darkened by the demo's low-light "
                               f"model (exposure {DARK_EXPOSURE}, seed 0)"}
    path = os.path.abspath(source)
    return {"kind": "file", "label": f"image {os.path.basename(path)}", "path": path,
            "description": "read as enhance reads it, resized bicubically, not darkened"}


def kept_fraction(net: LFPVNet, snr: torch.Tensor | None) -> float | None:
    """Share of attention keys kept (token patches with mean SNR > 0.5), as the model computes it (SNR-Aware only)."""
    if net.config.backbone != "snr_aware":
        return None
    a, t = net.config.align, net.config.token_size
    h, w = snr.shape[-2] // a * a, snr.shape[-1] // a * a
    quarter = F.interpolate(F.interpolate(snr, size=[h, w], mode="bilinear"), size=[h // 4, w // 4], mode="nearest")
    return float((F.avg_pool2d(quarter, t) > 0.5).float().mean())


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def smid_net(backend: str, seed: int = 0) -> LFPVNet:
    """The benchmarked network: MODEL (the published SMID model, or what --set model.KEY=V makes it)."""
    torch.manual_seed(seed)
    net = LFPVNet(MODEL, backend=backend).eval()
    if net.lfpv_enabled:
        with torch.no_grad():
            net.bank_vectors.normal_()
            net.bank_patches.normal_()
    return net


def set_model(overrides: list[str]) -> None:
    """MODEL from `--set model.KEY=V` overrides (any backend: e.g. model.backbone=retinexformer)."""
    global MODEL
    if overrides:
        from lfpv_fast.config import load_config

        MODEL = load_config(None, overrides).model


def frame_part(pub, reps: int, device: torch.device, source: str = "photo") -> dict:
    x = input_frame(source, *FRAME_HW).to(device)
    reference_net = smid_net("reference").to(device)
    auto_net = smid_net("auto").to(device)
    enhance_net = prepare_for_inference(smid_net("auto").to(device), device)  # what enhance/evaluate run
    rows: dict = {}
    if pub is not None:
        model = pub_mod.build_model(pub, reference_net.to_original_state_dict()).to(device).eval()
        rows[pub_mod.PUBLISHED_LABEL] = lambda x, snr: model(x, snr)
        rows["lfpv_fast reference backend"] = lambda x, snr: reference_net(x, snr)
    else:
        rows[pub_mod.REFERENCE_LABEL] = lambda x, snr: reference_net(x, snr)
    rows["lfpv_fast auto"] = lambda x, snr: auto_net(x, snr)
    rows["lfpv_fast auto + channels_last (enhance, evaluate)"] = lambda x, snr: enhance_net(
        x.contiguous(memory_format=torch.channels_last), snr)
    rows["lfpv_fast enhance's whole-image path (strips)"] = lambda x, snr: whole_image_forward(enhance_net, x, snr)

    def bf16(x, snr):
        with torch.autocast("cpu" if not x.is_cuda else "cuda", dtype=torch.bfloat16):
            return enhance_net(x.contiguous(memory_format=torch.channels_last), snr).float()

    rows["lfpv_fast auto + channels_last + bf16 autocast"] = bf16
    inputs = {describe_input(source)["label"]: (x, reference_net.snr_mask(x)), "SNR map of ones (every key kept)":
              (x, torch.ones_like(x[:, :1]))}
    results = []
    for input_name, (xi, snr) in inputs.items():
        with torch.no_grad():
            expected = reference_net(xi, snr)
            diffs = {name: float((fn(xi, snr).float() - expected).abs().max()) for name, fn in rows.items()}
            timings = common.time_rows({name: (lambda fn=fn, xi=xi, snr=snr: fn(xi, snr)) for name, fn in rows.items()},
                                       reps, 1, device)
        base_name = next(iter(rows))
        for name in rows:
            ratios = [b / s for b, s in zip(timings[base_name].seconds, timings[name].seconds, strict=True)]
            results.append({"input": input_name, "kept_keys": kept_fraction(reference_net, snr), "name": name,
                            "seconds": timings[name].summary(),
                            "speedup_vs_first_row": common.Timing(ratios).summary(),
                            "max_abs_diff_vs_reference": diffs[name]})
        kept = _share(results[-1]["kept_keys"])
        print(f"\n{FRAME_HW[0]}x{FRAME_HW[1]} frame, {input_name} (kept attention keys {kept})")
        print(f"{'row':<46}{'s: median (min-max)':>24}{'vs first row':>22}{'max |diff|':>12}")
        for r in results[-len(rows):]:
            print(f"{r['name']:<46}{common.fmt_spread(r['seconds'], '.3f'):>24}"
                  f"{common.fmt_spread(r['speedup_vs_first_row'], '.2f') + 'x':>22}"
                  f"{r['max_abs_diff_vs_reference']:>12.2e}")
    return {"frame_hw": list(FRAME_HW), "input": describe_input(source), "baseline": next(iter(rows)),
            "rows": results}



def _peak_rss() -> int:
    return common.status_bytes("VmHWM")


def _rss() -> int:
    return common.status_bytes("VmRSS")


def memory_child(spec: dict) -> dict:
    """In a fresh process: one whole-image run, its time and peak RSS above the RSS before it."""
    height, width = spec["hw"]
    net = smid_net(spec["backend"])
    if spec["path"] == "enhance":
        prepare_for_inference(net, torch.device("cpu"))
    x = input_frame(spec.get("input", "photo"), height, width)
    snr = net.snr_mask(x)
    before = _rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        if spec["path"] == "enhance":
            plan = plan_enhancement(net, 1, height, width, max_memory=2**62)
            out = enhance_image(net, x, snr=snr, plan=plan)
        else:
            out = net(x, snr)
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    est = estimate_peak_bytes(net.config, 1, height, width, linear_attention=spec["backend"] != "reference")
    return {**spec, "seconds": seconds, "peak_rss_above_start_bytes": peak - before, "peak_rss_bytes": peak,
            "estimate_bytes": est.whole_image, "kept_keys": kept_fraction(net, snr), "out_mean": float(out.mean())}


def memory_part(sizes: list[int], source: str = "photo", model_overrides: list[str] | None = None) -> dict:
    specs = []
    for mp in sizes:
        common_spec = {"megapixels": mp, "hw": SIZES_MP[mp], "input": source, "model_overrides": model_overrides or []}
        specs.append({**common_spec, "backend": "auto", "path": "enhance"})
        if mp <= 4:
            specs.append({**common_spec, "backend": "auto", "path": "net(x, snr)"})
        if mp <= 1:
            specs.append({**common_spec, "backend": "reference", "path": "net(x, snr)"})
    rows = []
    print(f"\n{'MP':>4} {'size':>10} {'backend':>10} {'path':>12} {'s':>8} {'peak GiB':>9} {'estimate':>9} {'kept':>6}")
    for spec in specs:
        model = [a for item in spec.get("model_overrides", []) for a in ("--set", item)]
        proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec), *model],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
            rows.append({**spec, "failed": tail})
            print(f"{spec['megapixels']:>4} {spec['backend']:>10} {spec['path']:>12} failed: {tail}")
            continue
        row = json.loads(lines[-1])
        rows.append(row)
        h, w = row["hw"]
        print(f"{row['megapixels']:>4} {f'{w}x{h}':>10} {row['backend']:>10} {row['path']:>12} {row['seconds']:>8.1f} "
              f"{row['peak_rss_above_start_bytes'] / 2**30:>9.2f} {row['estimate_bytes'] / 2**30:>9.2f} "
              f"{_share(row['kept_keys']):>6}")
    return {"rows": rows}


def precision_part(checkpoint: str, reps: int) -> dict:
    from lfpv_fast.config import load_config
    from lfpv_fast.data.loaders import build_loader
    from lfpv_fast.training.checkpoint import load_model

    net = prepare_for_inference(load_model(checkpoint), torch.device("cpu"))
    cfg = load_config("demo", ["data.num_workers=0"])
    images = [b["lq"] for b in build_loader(cfg, "test")]
    rows = []
    for lq in images:
        fp32 = enhance_image(net, lq, max_memory=2**62)
        bf16 = enhance_image(net, lq, max_memory=2**62, precision="bf16")
        mse = float(((bf16 - fp32) ** 2).mean())
        rows.append({"psnr_bf16_vs_fp32": 10 * math.log10(1 / mse) if mse > 0 else float("inf")})
    x = images[0]
    timings = common.time_rows({"fp32": lambda: enhance_image(net, x, max_memory=2**62),
                                "bf16": lambda: enhance_image(net, x, max_memory=2**62, precision="bf16")}, reps, 1)
    psnrs = [r["psnr_bf16_vs_fp32"] for r in rows]
    result = {"checkpoint": checkpoint, "images": len(rows), "image_hw": list(x.shape[-2:]),
              "psnr_bf16_vs_fp32": {"min": min(psnrs), "median": float(np.median(psnrs)), "max": max(psnrs)},
              "seconds": {k: t.summary() for k, t in timings.items()}}
    print(f"\nbf16 vs fp32 on {len(rows)} demo test images ({checkpoint}): PSNR "
          f"{common.fmt_spread(result['psnr_bf16_vs_fp32'], '.1f')} dB; time per image fp32 "
          f"{common.fmt_spread(result['seconds']['fp32'], '.3f')} s, "
          f"bf16 {common.fmt_spread(result['seconds']['bf16'], '.3f')} s")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pub_mod.add_argument(ap)
    ap.add_argument("--parts", default="frame,memory,precision", help="comma-separated: frame, memory, precision")
    ap.add_argument("--reps", type=int, default=common.MIN_REPS, help="timed repetitions per row (at least 5)")
    ap.add_argument("--sizes", default="1,4,12", help="megapixels for the memory part (of 1, 4, 12)")
    ap.add_argument("--checkpoint", help="model for the precision part (skipped without one)")
    ap.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="model.KEY=VALUE",
                    help="the network benchmarked (default: the published SMID model), e.g. "
                    "model.backbone=retinexformer")
    ap.add_argument("--out", help="JSON path (default bench/results/<date>-<device>-inference.json)")
    ap.add_argument("--device", default="cpu", help="where the frame part runs: cpu (default) or cuda; the memory "
                    "and precision parts measure the CPU")
    ap.add_argument("--input", default="photo", metavar="photo|synthetic|PATH",
                    help="the frame and memory parts' input: the demo's darkened photo (default; needs scikit-image), "
                    "a synthetic dark frame made with numpy (no optional package), or an image file (PNG, JPEG, TIFF; "
                    "resized, not darkened); recorded in the JSON")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    set_model(args.model_overrides)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    device = torch.device(args.device)
    parts = args.parts.split(",")
    if "frame" in parts or "memory" in parts:
        try:  # a bad --input is a usage error before anything is timed (the frame is small: cheap to make twice)
            input_frame(args.input, 32, 32)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    env = common.environment(device)
    pub = pub_mod.from_args(args)
    doc = {"environment": env, "published": str(pub.root) if pub else None, "torch_threads": torch.get_num_threads(),
           "input": describe_input(args.input)}
    print(common.machine_note(env))
    print(f"input: {doc['input']['label']}: {doc['input']['description']}")
    if "frame" in parts:
        doc["frame"] = frame_part(pub, args.reps, device, args.input)
    if "memory" in parts:
        doc["memory"] = memory_part([int(s) for s in args.sizes.split(",")], args.input, args.model_overrides)
    if "precision" in parts:
        doc["precision"] = precision_part(args.checkpoint, args.reps) if args.checkpoint else {
            "skipped": "no --checkpoint"}
    doc["environment"]["loadavg_end"] = list(os.getloadavg())
    common.finish(doc, "inference", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
