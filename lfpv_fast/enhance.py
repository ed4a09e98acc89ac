"""Enhance low-light images with a trained LFPV model.

    python -m lfpv_fast.enhance INPUT... --checkpoint PATH -o OUTDIR [options]

INPUT: image files (PNG, JPEG, TIFF) or folders of them (--recursive for subfolders). Each result
is written to OUTDIR under the input's file name (inside a folder input: its path relative to that
folder), in the input's format and bit depth: 16-bit PNG/TIFF stay 16-bit.

- Grayscale images are enhanced as RGB (the gray channel replicated) and written as RGB.
- An alpha channel is set aside, the colour is enhanced, and the alpha is written back unchanged.
- The SNR map is computed from each input image, as the published test does.
- Sizes down to 16x16; the model aligns sizes internally; the output has the input's size.
- Never overwrites an input: an output path that is an input file is an error (nothing is written).
- An output folder inside an input folder is refused unless --allow-output-inside-input (files under
  it are then never taken as inputs). Existing outputs are skipped unless --overwrite.
- A side-by-side file records which output it belongs to: one left by an earlier call for another input
  (`a.png`, then `a.jpg`, share `a_side_by_side.png`) is an error, as two such inputs in one call are.
- Whole images, exactly: the whole image goes through the model at once (the transformer attends
  over all of it, as the published model does), with the full-resolution stages run in strips so
  that peak memory stays about 350 bytes per pixel with a memory-linear attention (backend "auto";
  see lfpv_fast/inference.py). This is chosen whenever the estimated peak fits the device's free
  memory (or --max-memory); otherwise, or with --tile or above --max-pixels, the image is enhanced in
  overlapping tiles (see `enhance_image`), which changes the result slightly. Each image's choice is
  printed.
- --precision bf16/fp16 (autocast; on the CPU only where it is faster than fp32) and --compile.

Python API: `enhance_image(net, image, tile=None, overlap=64)`, `plan_enhancement(...)`.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lfpv_fast.backends import BACKENDS, attention_is_memory_linear, require_backend
from lfpv_fast.cli import ArgumentParser, fail, resolve_device
from lfpv_fast.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    LoadedImage,
    list_images,
    read_image,
    to_integer,
    write_bytes_atomic,
    write_image,
)
from lfpv_fast.inference import (
    PRECISIONS,
    autocast,
    available_memory,
    check_precision,
    compile_stages,
    estimate_peak_bytes,
    prepare_for_inference,
    whole_image_forward,
)
from lfpv_fast.model import LFPVNet

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 64
# Share of the free memory that the whole-image path may plan to use (the estimate is not exact, and
# the allocator and the rest of the process need room too).
MEMORY_HEADROOM = 0.8
SIDE_BY_SIDE_SUFFIX = "_side_by_side.png"
# PNG text key of a side-by-side file: the output (relative to the output folder) it shows.
SIDE_BY_SIDE_KEY = "lfpv_fast.side_by_side_of"


def tile_starts(length: int, tile: int, overlap: int, align: int = 16) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours overlapping by >= overlap.

    Starts are multiples of `align` (when `length` and `tile` are), so that every tile sees the same
    16x16 token grid as the whole image. The last tile ends at `length`. A length <= tile gives [0].
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = sorted({s // align * align for s in range(0, length - tile, step)} | {length - tile})
    return starts


def _ramp(starts: list[int], index: int, size: int) -> torch.Tensor:
    """1-D blending weight of tile `index`: linear ramps across its overlaps with the neighbouring tiles.

    Two neighbours' ramps over a shared span add up to one (a linear cross-fade), so no seam shows; the
    weight is positive everywhere in the tile (half-pixel offsets), so every pixel is covered.
    """
    weight = torch.ones(size, dtype=torch.float64)
    pos = torch.arange(size, dtype=torch.float64)
    start = starts[index]
    if index > 0:
        lead = starts[index - 1] + size - start  # overlap with the previous tile
        if lead > 0:
            weight = torch.minimum(weight, (pos + 0.5) / lead)
    if index + 1 < len(starts):
        trail = start + size - starts[index + 1]
        if trail > 0:
            weight = torch.minimum(weight, (size - pos - 0.5) / trail)
    return weight


def _net_device_dtype(net: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(net.parameters())
    return param.device, param.dtype


def _as_batch(image: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, str]:
    """The image as a (B,3,H,W) float tensor, and how to give the result back."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"enhance_image expects a numpy image of shape (H,W,3), got {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float(), "numpy"
    if not torch.is_tensor(image):
        raise TypeError(f"enhance_image expects a torch tensor or numpy array, got {type(image).__name__}")
    if image.dim() == 3 and image.shape[0] == 3:
        return image[None], "chw"
    if image.dim() == 4 and image.shape[1] == 3:
        return image, "bchw"
    raise ValueError(f"enhance_image expects a (3,H,W) or (B,3,H,W) tensor, got {tuple(image.shape)}")


@dataclass
class EnhancePlan:
    """How one batch of images is enhanced: whole (exact) or in tiles, and why."""

    tiled: bool
    tile: int | None  # tile side when tiled
    estimated_bytes: int  # estimated peak of the whole-image path
    budget_bytes: int | None  # memory it had to fit in (None: not considered)
    reason: str

    def describe(self) -> str:
        return (f"tiled {self.tile}x{self.tile} ({self.reason})" if self.tiled
                else f"whole image, untiled ({self.reason})")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan_enhancement(net: LFPVNet, batch: int, height: int, width: int, *, tile: int | None = None,
                     max_pixels: int | None = None, max_memory: int | None = None,
                     precision: str = "fp32", device: torch.device | None = None) -> EnhancePlan:
    """Whole image when its estimated peak memory fits, tiles otherwise (or when asked for).

    tile: always tile (when the image is larger than a tile). max_pixels: tile images with more pixels.
    max_memory: the budget in bytes; default MEMORY_HEADROOM of the device's free memory now.
    """
    device = device or next(net.parameters()).device
    element = 2 if precision in ("bf16", "fp16") else 4
    linear = attention_is_memory_linear(net.backend, device)
    estimate = estimate_peak_bytes(net.config, batch, height, width, element, linear_attention=linear).total
    if tile is not None:
        if height <= tile and width <= tile:
            return EnhancePlan(False, None, estimate, None, f"the image fits one {tile}x{tile} tile")
        return EnhancePlan(True, tile, estimate, None, "--tile")
    if max_pixels is not None and height * width > max_pixels:
        return EnhancePlan(True, DEFAULT_TILE, estimate, None, f"{height * width} pixels > --max-pixels {max_pixels}")
    budget = max_memory if max_memory is not None else int(MEMORY_HEADROOM * available_memory(device))
    source = "--max-memory" if max_memory is not None else f"free {device.type} memory"
    if estimate <= budget:
        return EnhancePlan(False, None, estimate, budget, f"estimated peak {_gib(estimate)} <= {_gib(budget)} "
                           f"of {source}")
    if not linear:
        hint = "; backend 'reference' holds the whole L x L attention, --backend auto does not"
    else:
        hint = ""
    # The largest tile (halving from DEFAULT_TILE) whose own peak fits the budget.
    side = DEFAULT_TILE
    while side > 256 and estimate_peak_bytes(net.config, 1, side, side, element, linear).total > budget:
        side //= 2
    return EnhancePlan(True, side, estimate, budget, f"the whole image needs an estimated {_gib(estimate)}, "
                       f"more than {_gib(budget)} of {source}{hint}")


def enhance_image(net: LFPVNet, image: np.ndarray | torch.Tensor, tile: int | None = None,
                  overlap: int = DEFAULT_OVERLAP, *, snr: torch.Tensor | None = None, batch_size: int = 4,
                  max_pixels: int | None = None, max_memory: int | None = None, precision: str = "fp32",
                  plan: EnhancePlan | None = None) -> np.ndarray | torch.Tensor:
    """Enhance RGB image(s) in [0, 1]; returns the result clamped to [0, 1] in the input's layout.

    image: (3,H,W) or (B,3,H,W) tensor, or an (H,W,3) numpy array; H, W >= 16. The model runs on its
    own device and dtype (the net is put in eval mode for the call); a tensor result is returned on the
    input's device.
    snr: the SNR map (B,1,H,W); default `net.snr_mask(image)`, computed from the whole image.
    Whole image or tiles: as `plan_enhancement(net, ..., tile, max_pixels, max_memory)` decides (or
    `plan`): the whole image, exactly `net(x, snr)` in bounded memory (`whole_image_forward`), when it
    fits; else tiles of tile x tile pixels (a multiple of the model's alignment, 16), overlapping
      by at least `overlap` pixels and cross-faded with linear ramps, run `batch_size` at a time.
    precision: "fp32", or "bf16"/"fp16" autocast (the result is float32 either way).

    Tiling and the model: the convolutions are local, but the SNR map is normalised by its maximum over
    the image and the transformer attends across the whole input. So the SNR map is computed once on
    the whole image and cropped per tile (identical to the untiled one), and the remaining difference
    from untiled output comes from the transformer's attention seeing only its own tile (plus the
    convolutions' zero padding within a receptive field of a tile edge, which the cross-fade hides).
    Images whose sides are not multiples of 16 are reflect-padded to a multiple for tiling instead of
    being resized as the untiled model does, so every tile is processed at native resolution.
    """
    x, layout = _as_batch(image)
    if not x.is_floating_point():
        raise TypeError(f"enhance_image expects a float image in [0, 1], got dtype {x.dtype}")
    b, _, height, width = x.shape
    align = net.config.align
    if height < align or width < align:
        raise ValueError(f"enhance_image needs images of at least {align}x{align} pixels, got {height}x{width}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tile is not None and (tile < align or tile % align):
        raise ValueError(f"tile must be a positive multiple of {align}, got {tile}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device, dtype = _net_device_dtype(net)
    if plan is None:
        plan = plan_enhancement(net, min(b, batch_size), height, width, tile=tile, max_pixels=max_pixels,
                                max_memory=max_memory, precision=precision, device=device)
    tile = plan.tile if plan.tiled else None
    if tile is not None and not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")

    source_device = x.device
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), autocast(precision, device):  # no_grad: callers may use autograd on the result
            x = x.to(device, dtype)
            if snr is None:
                snr = net.snr_mask(x)
            else:
                if tuple(snr.shape) != (b, 1, height, width):
                    raise ValueError(f"snr must have shape {(b, 1, height, width)}, got {tuple(snr.shape)}")
                snr = snr.to(device, dtype)
            if tile is None:
                out = torch.cat([whole_image_forward(net, x[i:i + batch_size], snr[i:i + batch_size]).float()
                                 for i in range(0, b, batch_size)])
            else:
                out = _enhance_tiled(net, x, snr, tile, overlap, batch_size)
            out = out.clamp_(0.0, 1.0)
    finally:
        net.train(was_training)

    if layout == "numpy":
        return out[0].permute(1, 2, 0).float().cpu().numpy()
    out = out.to(source_device)
    return out[0] if layout == "chw" else out


def _enhance_tiled(net: LFPVNet, x: torch.Tensor, snr: torch.Tensor, tile: int, overlap: int,
                   batch_size: int) -> torch.Tensor:
    b, _, height, width = x.shape
    align = net.config.align
    # Pad to a multiple of the alignment so that all tiles are aligned and none needs a resize.
    pad_h, pad_w = -height % align, -width % align
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        snr = F.pad(snr, (0, pad_w, 0, pad_h), mode="reflect")
    hp, wp = height + pad_h, width + pad_w
    th, tw = min(tile, hp), min(tile, wp)
    ys, xs = tile_starts(hp, th, overlap, align), tile_starts(wp, tw, overlap, align)
    wy = [_ramp(ys, i, th) for i in range(len(ys))]
    wx = [_ramp(xs, j, tw) for j in range(len(xs))]
    tiles = [(i, j) for i in range(len(ys)) for j in range(len(xs))]

    acc = torch.zeros_like(x, dtype=torch.float32)
    weight_sum = torch.zeros((1, 1, hp, wp), dtype=torch.float32, device=x.device)
    for i, j in tiles:
        weight_sum[..., ys[i]:ys[i] + th, xs[j]:xs[j] + tw] += (wy[i][:, None] * wx[j][None, :]).to(x)
    for image in range(b):
        for first in range(0, len(tiles), batch_size):
            chunk = tiles[first:first + batch_size]
            crops = torch.stack([x[image, :, ys[i]:ys[i] + th, xs[j]:xs[j] + tw] for i, j in chunk])
            masks = torch.stack([snr[image, :, ys[i]:ys[i] + th, xs[j]:xs[j] + tw] for i, j in chunk])
            out = whole_image_forward(net, crops, masks).float()
            for (i, j), result in zip(chunk, out, strict=True):
                weight = (wy[i][:, None] * wx[j][None, :]).to(result)
                acc[image, :, ys[i]:ys[i] + th, xs[j]:xs[j] + tw] += result * weight
    return (acc / weight_sum)[..., :height, :width]


# ------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lfpv_fast.enhance",
        description="Enhance low-light images with an LFPV model (our checkpoints or the published SMID.pth).",
        epilog="Grayscale inputs are enhanced as RGB (channel replicated) and written as RGB; an alpha channel "
               "is kept unchanged; 16-bit PNG/TIFF stay 16-bit. Inputs are never overwritten. Supported: "
               + ", ".join(IMAGE_EXTENSIONS),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help="lfpv_fast checkpoint or published state dict")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--recursive", action="store_true", help="also enhance images in subfolders of folder inputs")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--batch-size", type=int, default=1, help="images of the same size run together (and tiles)")
    parser.add_argument("--tile", type=int, default=None, help="always enhance in tiles of this side in pixels "
                        "(multiple of 16); default: the whole image when it fits in memory, tiles otherwise")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP, help="minimum tile overlap in pixels")
    parser.add_argument("--max-pixels", type=int, default=None, help="tile images with more pixels than this")
    parser.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                        help="memory the whole-image path may use, e.g. 6G or 512M (default: "
                        f"{MEMORY_HEADROOM:.0%} of the device's free memory); larger images are tiled")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="bf16/fp16 autocast: on CUDA; on a CPU only where faster than fp32 (else refused)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (first images are slow)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--side-by-side", action="store_true",
                        help=f"also write an 8-bit PNG 'input | output' as NAME{SIDE_BY_SIDE_SUFFIX}")
    parser.add_argument("--allow-output-inside-input", action="store_true",
                        help="allow an output folder inside an input folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")
    return parser


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tile is not None and (args.tile < 16 or args.tile % 16):
        parser.error(f"--tile must be a positive multiple of 16, got {args.tile}")
    if args.tile_overlap < 0 or args.tile_overlap >= (args.tile or DEFAULT_TILE):
        parser.error(f"--tile-overlap must be in [0, tile), got {args.tile_overlap}")
    if args.max_pixels is not None and args.max_pixels < 1:
        parser.error(f"--max-pixels must be >= 1, got {args.max_pixels}")
    return parser, args


def parse_size(text: str) -> int:
    """'6G', '512M', '1.5GiB', '2000000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size (e.g. 6G, 512M or a number of bytes)")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def _plan(args: argparse.Namespace) -> list[tuple[Path, Path, Path | None]]:
    """(input, output, side-by-side output or None) per image, after every safety check."""
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder")
    out_resolved = out_dir.resolve()
    input_dirs = [Path(p) for p in args.inputs if Path(p).is_dir()]
    for folder in input_dirs:
        if out_resolved.is_relative_to(folder.resolve()) and not args.allow_output_inside_input:
            raise ValueError(f"output folder {out_dir} is inside input folder {folder}; choose another output "
                             "folder or pass --allow-output-inside-input")
    # An output folder strictly inside an input folder (allowed above) is not searched for inputs.
    inside = any(out_resolved != f.resolve() and out_resolved.is_relative_to(f.resolve()) for f in input_dirs)
    images = list_images(args.inputs, recursive=args.recursive, exclude=[out_dir] if inside else None)
    if not images:
        raise ValueError(f"no images found in {', '.join(args.inputs)} (supported: {', '.join(IMAGE_EXTENSIONS)})")

    # The same file named twice (or a file and its folder) is enhanced once.
    unique: dict[Path, tuple[Path, Path]] = {}
    for path, relative in images:
        unique.setdefault(path.resolve(), (path, relative))
    images = list(unique.values())
    inputs = {resolved: path for resolved, (path, _) in unique.items()}
    # Also compare file identities: a hard link or a differently spelled path to an input is the input.
    identities = {(st.st_dev, st.st_ino): path for path in inputs.values() for st in [os.stat(path)]}
    plan: list[tuple[Path, Path, Path | None]] = []
    claimed: dict[Path, Path] = {}
    for path, relative in images:
        output = out_dir / relative
        side = output.with_name(output.stem + SIDE_BY_SIDE_SUFFIX) if args.side_by_side else None
        for target in (output, side):
            if target is None:
                continue
            resolved = target.resolve()
            same = inputs.get(resolved)
            if same is None and target.exists():
                st = os.stat(target)
                same = identities.get((st.st_dev, st.st_ino))
            if same is not None:
                raise ValueError(f"refusing to overwrite input {same}: it is also the output for {path}; "
                                 "choose another output folder")
            if resolved in claimed:
                raise ValueError(f"{path} and {claimed[resolved]} would both be written to {target}; "
                                 "enhance them into different output folders")
            claimed[resolved] = path
        owner = side_by_side_owner(side) if side is not None and not args.overwrite else None
        if owner is not None and owner != relative.as_posix():
            raise ValueError(f"{path} would write its side-by-side to {side}, which holds the side-by-side of "
                             f"{owner} from an earlier call; enhance them into different output folders (or pass "
                             "--overwrite to replace it)")
        plan.append((path, output, side))
    return plan


def _side_by_side(image: LoadedImage, enhanced: torch.Tensor) -> np.ndarray:
    """(H, 2W, 3) float: the input (as RGB, alpha ignored) left of the output."""
    return np.concatenate([image.rgb, enhanced.permute(1, 2, 0).float().numpy()], axis=1)


def write_side_by_side(path: Path, pixels: np.ndarray, output: str) -> None:
    """An 8-bit PNG that records (SIDE_BY_SIDE_KEY) the output it belongs to, relative to the output folder."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(SIDE_BY_SIDE_KEY, output)
    buffer = io.BytesIO()
    Image.fromarray(to_integer(pixels, 8)).save(buffer, format="PNG", pnginfo=info)
    write_bytes_atomic(path, buffer.getvalue())


def side_by_side_owner(path: Path) -> str | None:
    """The output a side-by-side file belongs to; None if there is no such file or it does not say."""
    from PIL import Image

    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get(SIDE_BY_SIDE_KEY)
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from lfpv_fast.checkpoint import load_model

    parser, args = _parse_args(argv)
    try:
        device = resolve_device(args.device)
        check_precision(args.precision, device)
        require_backend(args.backend, device)
        plan = _plan(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))  # exits with status 2

    def note(message: str) -> None:
        if not args.quiet:
            tqdm.write(message, file=sys.stderr)

    # Per image, the files still to write: existing ones are kept unless --overwrite.
    todo: list[tuple[Path, Path | None, Path | None]] = []
    skipped = 0
    out_dir = Path(args.output)
    side_owner = {side: output.relative_to(out_dir).as_posix() for _, output, side in plan if side is not None}
    for path, output, side in plan:
        keep = [t for t in (output, side) if t is not None and t.exists() and not args.overwrite]
        if keep and len(keep) == (1 if side is None else 2):
            note(f"skip {path}: {output} exists (--overwrite replaces it)")
            skipped += 1
            continue
        todo.append((path, None if output in keep else output, None if side in keep else side))
    if not todo:
        note(f"nothing to do: {skipped} outputs already exist in {args.output}")
        return 0

    try:
        net = load_model(args.checkpoint, backend=args.backend)
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc))
    prepare_for_inference(net.to(device), device)
    if args.compile:
        compile_stages(net)

    failed = 0
    done = 0
    pending: list[tuple[LoadedImage, Path | None, Path | None]] = []

    def flush() -> None:
        nonlocal done, failed
        if not pending:
            return
        batch = torch.stack([img.to_tensor() for img, _, _ in pending])
        height, width = batch.shape[-2:]
        how = plan_enhancement(net, len(pending), height, width, tile=args.tile, max_pixels=args.max_pixels,
                               max_memory=args.max_memory, precision=args.precision, device=device)
        note(f"{', '.join(str(img.path) for img, _, _ in pending)} ({height}x{width}): {how.describe()}")
        try:
            results = enhance_image(net, batch, overlap=args.tile_overlap, batch_size=args.batch_size,
                                    precision=args.precision, plan=how).cpu()
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: report, go on with the next images
            for img, _, _ in pending:
                print(f"error: {img.path}: enhancement failed ({height}x{width}): {exc}", file=sys.stderr)
            failed += len(pending)
            pending.clear()
            return
        for (img, output, side), result in zip(pending, results, strict=True):
            try:
                if output is not None:
                    write_image(output, result, bit_depth=img.bit_depth, alpha=img.alpha)
                if side is not None:
                    write_side_by_side(side, _side_by_side(img, result), side_owner[side])
            except (OSError, ValueError) as exc:
                print(f"error: {img.path}: could not write the result: {exc}", file=sys.stderr)
                failed += 1
                continue
            done += 1
        pending.clear()

    for path, output, side in tqdm(todo, desc="enhance", unit="img", disable=args.quiet or None):
        try:
            image = read_image(path)
        except (ImageReadError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        height, width = image.size
        if min(height, width) < net.config.align:
            print(f"error: {path}: {height}x{width} is smaller than the model's minimum "
                  f"{net.config.align}x{net.config.align}", file=sys.stderr)
            failed += 1
            continue
        if image.source_mode.startswith("gray"):
            note(f"note: {path} is grayscale: enhanced as RGB (channel replicated), written as RGB")
        if image.alpha is not None:
            note(f"note: {path} has an alpha channel: kept unchanged in the output")
        if pending and (pending[0][0].size != image.size or len(pending) >= args.batch_size):
            flush()
        pending.append((image, output, side))
        tiled = plan_enhancement(net, len(pending), height, width, tile=args.tile, max_pixels=args.max_pixels,
                                 max_memory=args.max_memory, precision=args.precision, device=device).tiled
        if tiled:  # a tiled image fills the batch with its own tiles
            flush()
    flush()

    note(f"enhanced {done}, skipped {skipped}, failed {failed}; outputs in {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
