"""Enhancement as a Python API: the steps that `python -m lfpv_fast.enhance` and the web app share.

Tensors: `enhance_image(net, image, tile=None, overlap=64)` enhances RGB image(s) in [0, 1], the whole
image at once (exact, `lfpv_fast.inference.whole_image.whole_image_forward`) when its estimated peak memory fits,
in overlapping cross-faded tiles otherwise; `plan_enhancement(...)` is that decision, with its reason.

Files: `ImageEnhancer` holds a model prepared for inference and the settings of a run, and does the
steps for image files: `check` (the header alone: the decoded-size bound of `lfpv_fast.io.imageio` and the
minimum size), `read`, `plan` (once per batch of same-size images), `enhance` and `write` (atomic, the
input's format and bit depth, alpha re-attached). The CLI (`lfpv_fast.enhance`) adds file selection,
output naming and reporting on top; the app (`lfpv_fast.app`) adds uploads and previews.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lfpv_fast.inference.whole_image import (
    DEFAULT_STRIP_ROWS,
    PRECISIONS,
    autocast,
    available_memory,
    compile_stages,
    estimate_peak_bytes,
    prepare_for_inference,
    strip_path,
    whole_image_forward,
)
from lfpv_fast.io.imageio import (
    DEFAULT_MAX_DECODED_BYTES,
    ImageInfo,
    ImageReadError,
    LoadedImage,
    read_image,
    read_image_info,
    write_image,
)
from lfpv_fast.models import LFPVNet
from lfpv_fast.ops.backends import attention_is_memory_linear

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 64
# Share of the free memory that the whole-image path may plan to use (the estimate is not exact, and
# the allocator and the rest of the process need room too).
MEMORY_HEADROOM = 0.8
# The whole-image path's strip settings (rows per strip, recompute instead of keep): each later one needs less
# memory on a large photo (smaller strips hold less working set, low_memory keeps fewer maps) and more time
# (more halo rows recomputed, the recomputed maps). The plan takes the first whose estimate fits, then tiles.
STRIP_SETTINGS = ((DEFAULT_STRIP_ROWS, False), (64, False), (DEFAULT_STRIP_ROWS, True), (64, True), (32, True))


def size_problem(height: int, width: int, align: int) -> str | None:
    """Why an image of this size cannot be enhanced (it is below the model's alignment), or None.

    The one minimum-size rule of the tools; the model checks its own inputs as well (`LFPVNet.aligned_inputs`).
    """
    if height < align or width < align:
        return f"{width}x{height} pixels is smaller than the model's minimum {align}x{align}"
    return None


def alignment_rule(net: LFPVNet) -> str:
    """Where the model's alignment (`net.align`) comes from, for messages: the backbone's own alignment and, with
    LFPVs, whole bank patches at the site (e.g. SNR-Aware with token_size 8 aligns to 32)."""
    rule = f"the {net.config.backbone} backbone aligns to {net.backbone.align}"
    if net.lfpv is None:
        return rule
    patch, stride = net.config.lfpv.patch_size, net.site.stride
    return f"{rule}, and {patch}x{patch} LFPV patches at its 1/{stride} site need {patch * stride}"


def tile_problem(tile: int | None, overlap: int | None, align: int, rule: str = "") -> str | None:
    """Why --tile / --tile-overlap cannot be used with a model of this alignment (`LFPVNet.align`), or None.

    The one home of the tile rules of the tools: a tile is a positive multiple of the alignment (the model's
    smallest input side, as `size_problem`), an overlap given is in [0, tile). rule: where the alignment comes
    from (`alignment_rule`), quoted in the message."""
    if tile is not None and (tile < align or tile % align):
        why = f"the model's alignment: {rule}" if rule else "the model's alignment"
        return f"--tile must be a positive multiple of {align} ({why}), got {tile}"
    if overlap is not None and not 0 <= overlap < (tile or DEFAULT_TILE):
        return f"--tile-overlap must be in [0, {tile or DEFAULT_TILE}) (below the tile side), got {overlap}"
    return None


def overlap_for(tile: int, overlap: int | None) -> int:
    """The overlap of tiles of side `tile`: as asked, or DEFAULT_OVERLAP shrunk with the tile (at most half of it)."""
    return min(DEFAULT_OVERLAP, tile // 2) if overlap is None else overlap


def tile_starts(length: int, tile: int, overlap: int, align: int = 16) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours overlapping by >= overlap.

    Starts are multiples of `align` (when `length` and `tile` are), so that every tile sees the same
    16x16 token grid as the whole image. The last tile ends at `length`. A length <= tile gives [0] whatever
    the overlap (one tile has no neighbour to overlap).
    """
    if tile < 1 or overlap < 0:
        raise ValueError(f"need tile >= 1 and overlap >= 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    if overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
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
    estimated_bytes: int  # estimated peak of the whole-image path (with the strip settings below)
    budget_bytes: int | None  # memory it had to fit in (None: not considered)
    reason: str
    # The whole-image path's strips (see whole_image_forward): rows per strip, and whether to recompute maps
    # instead of keeping them. Chosen to fit the budget, fastest first.
    strip_rows: int = DEFAULT_STRIP_ROWS
    low_memory: bool = False

    def describe(self) -> str:
        if self.tiled:
            return f"tiled {self.tile}x{self.tile} ({self.reason})"
        strips = "" if (self.strip_rows, self.low_memory) == (DEFAULT_STRIP_ROWS, False) else \
            f"; strips of {self.strip_rows} rows{', low memory' if self.low_memory else ''}"
        return f"whole image, untiled ({self.reason}{strips})"


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
    if strip_path(net) is None:
        # Tiles would change the result (the backbone's attention spans the whole image): refuse, before any work.
        raise ValueError(f"{width}x{height}: the {net.config.backbone} backbone runs a whole image untiled and needs "
                         f"an estimated {_gib(estimate)}, more than {_gib(budget)} of {source}; use a smaller image, "
                         "a device with more memory, or --tile N for approximate tiles")
    # Smaller strips and recomputing kept maps cost time, not exactness: the first setting that fits (the estimate
    # above is STRIP_SETTINGS[0]'s).
    for strip_rows, low_memory in STRIP_SETTINGS[1:]:
        smaller = estimate_peak_bytes(net.config, batch, height, width, element, linear_attention=linear,
                                      strip_rows=strip_rows, low_memory=low_memory).total
        if smaller <= budget:
            return EnhancePlan(False, None, smaller, budget, f"estimated peak {_gib(smaller)} <= {_gib(budget)} "
                               f"of {source}", strip_rows, low_memory)
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
                  overlap: int | None = None, *, snr: torch.Tensor | None = None, batch_size: int = 4,
                  max_pixels: int | None = None, max_memory: int | None = None, precision: str = "fp32",
                  plan: EnhancePlan | None = None) -> np.ndarray | torch.Tensor:
    """Enhance RGB image(s) in [0, 1]; returns the result clamped to [0, 1] in the input's layout.

    image: (3,H,W) or (B,3,H,W) tensor, or an (H,W,3) numpy array; H, W >= net.align (16 for the published
    model). The model runs on its own device and dtype (the net is put in eval mode for the call); a tensor
    result is returned on the input's device.
    snr: the SNR map (B,1,H,W); default `net.snr_mask(image)`, computed from the whole image (None for a backbone
    without a guide map, e.g. Retinexformer).
    Whole image or tiles: as `plan_enhancement(net, ..., tile, max_pixels, max_memory)` decides (or
    `plan`): the whole image, exactly `net(x, snr)` in bounded memory (`whole_image_forward`), when it
    fits; else tiles of tile x tile pixels (a multiple of the model's alignment `net.align`), overlapping
      by at least `overlap` pixels (default: DEFAULT_OVERLAP, at most half a tile) and cross-faded with
      linear ramps, run `batch_size` at a time.
    precision: "fp32", or "bf16"/"fp16" autocast (the result is float32 either way).

    Tiling and the model: the convolutions are local, but the SNR map is normalised by its maximum over
    the image and the transformer attends across the whole input. So the SNR map is computed once on
    the whole image and cropped per tile (identical to the untiled one), and the remaining difference
    from untiled output comes from the transformer's attention seeing only its own tile (plus the
    convolutions' zero padding within a receptive field of a tile edge, which the cross-fade hides).
    Images whose sides are not multiples of the alignment are reflect-padded to a multiple for tiling instead
    of being resized as the untiled model does, so every tile is processed at native resolution.
    """
    x, layout = _as_batch(image)
    if not x.is_floating_point():
        raise TypeError(f"enhance_image expects a float image in [0, 1], got dtype {x.dtype}")
    b, _, height, width = x.shape
    align = net.align
    problem = size_problem(height, width, align)
    if problem is not None:
        raise ValueError(f"enhance_image: {problem}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tile is not None and (problem := tile_problem(tile, None, align)) is not None:
        raise ValueError(f"enhance_image: {problem.replace('--tile', 'tile')}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device, dtype = _net_device_dtype(net)
    if plan is None:
        plan = plan_enhancement(net, min(b, batch_size), height, width, tile=tile, max_pixels=max_pixels,
                                max_memory=max_memory, precision=precision, device=device)
    tile = plan.tile if plan.tiled else None
    if tile is not None:
        overlap = overlap_for(tile, overlap)
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
                out = torch.cat([whole_image_forward(net, x[i:i + batch_size],
                                                     None if snr is None else snr[i:i + batch_size],
                                                     strip_rows=plan.strip_rows, low_memory=plan.low_memory).float()
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


def _enhance_tiled(net: LFPVNet, x: torch.Tensor, snr: torch.Tensor | None, tile: int, overlap: int,
                   batch_size: int) -> torch.Tensor:
    b, _, height, width = x.shape
    align = net.align
    # Pad to a multiple of the alignment so that all tiles are aligned and none needs a resize.
    pad_h, pad_w = -height % align, -width % align
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        snr = None if snr is None else F.pad(snr, (0, pad_w, 0, pad_h), mode="reflect")
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
            masks = None if snr is None else torch.stack([snr[image, :, ys[i]:ys[i] + th, xs[j]:xs[j] + tw]
                                                          for i, j in chunk])
            out = whole_image_forward(net, crops, masks).float()
            for (i, j), result in zip(chunk, out, strict=True):
                weight = (wy[i][:, None] * wx[j][None, :]).to(result)
                acc[image, :, ys[i]:ys[i] + th, xs[j]:xs[j] + tw] += result * weight
    return (acc / weight_sum)[..., :height, :width]


# ------------------------------------------------------------------------------------------------
# Image files.


class ImageEnhancer:
    """A model ready for inference and the settings of a run; the steps from an image file to its result.

    tile, overlap, batch_size, max_pixels (tile images with more pixels), max_memory, precision: as
    `plan_enhancement` and `enhance_image` take them. max_decoded_bytes: the bound on a decoded input
    (`lfpv_fast.io.imageio.read_image_info`). compile: torch.compile the model's inference stages.
    """

    def __init__(self, net: LFPVNet, device: torch.device, *, tile: int | None = None,
                 overlap: int | None = None, batch_size: int = 1, max_pixels: int | None = None,
                 max_memory: int | None = None, precision: str = "fp32", compile: bool = False,
                 max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES) -> None:
        self.net = prepare_for_inference(net.to(device), device)
        # Said once per run: why images of this backbone are not tiled to fit memory.
        self.note = (None if strip_path(self.net) is not None else
                     f"note: the {net.config.backbone} backbone has no exact strip path (its attention spans the "
                     "whole image): each image runs untiled, and one that would not fit memory is refused")
        if compile:
            compile_stages(self.net)
        self.device = device
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.max_pixels, self.max_memory, self.precision = max_pixels, max_memory, precision
        self.max_decoded_bytes = max_decoded_bytes

    def check(self, path: str | Path) -> ImageInfo:
        """The file's header alone (nothing decoded): supported, within the decoded-size bound, large enough.

        ImageReadError (FileNotFoundError for a missing file) naming the file, else what decoding will give.
        """
        info = read_image_info(path, self.max_decoded_bytes)
        problem = size_problem(info.height, info.width, self.net.align)
        if problem is not None:
            raise ImageReadError(f"{path}: {problem}")
        if self.note is not None:  # untiled: an image that would not fit is refused now, before any work
            try:
                self.plan(1, info.height, info.width)
            except ValueError as exc:
                raise ImageReadError(f"{path}: {exc}") from None
        return info

    def read(self, path: str | Path) -> LoadedImage:
        """Decode the file (its header is checked first, by the reader); ImageReadError naming it if it cannot be."""
        image = read_image(path, self.max_decoded_bytes)
        problem = size_problem(*image.size, self.net.align)
        if problem is not None:
            raise ImageReadError(f"{path}: {problem}")
        return image

    def plan(self, batch: int, height: int, width: int) -> EnhancePlan:
        """Whole image or tiles for `batch` images of this size (see `plan_enhancement`)."""
        return plan_enhancement(self.net, batch, height, width, tile=self.tile, max_pixels=self.max_pixels,
                                max_memory=self.max_memory, precision=self.precision, device=self.device)

    def enhance(self, images: Sequence[LoadedImage], plan: EnhancePlan) -> torch.Tensor:
        """Images of one size, enhanced as planned: (B, 3, H, W) float32 in [0, 1] on the CPU."""
        batch = torch.stack([image.to_tensor() for image in images])
        return enhance_image(self.net, batch, overlap=self.overlap, batch_size=self.batch_size,
                             precision=self.precision, plan=plan).cpu()

    @staticmethod
    def write(path: str | Path, image: LoadedImage, result: torch.Tensor) -> None:
        """The result in the file type of `path`, at the input's bit depth, its alpha re-attached (atomic)."""
        write_image(path, result, bit_depth=image.bit_depth, alpha=image.alpha)
