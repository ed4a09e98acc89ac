"""From a RunConfig to a data loader: `build_loader(cfg, split, rank, world_size, seed)`.

The loaders themselves live in `lfpv_fast.pipelines` (the torch loader and the DALI pipelines) and take plain
inputs; this module gives them the split's pairs (`source.resolve_split`) as a `PairList`, the torch loader the
reader of a pair's frames (`FrameReader`), and both the data layer's `DataError` to raise for a frame they cannot
use. See `lfpv_fast.pipelines` for what the batches hold and how they are drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lfpv_fast.data.errors import ConfigError, DataError
from lfpv_fast.data.smid import load_frame, resize_linear
from lfpv_fast.data.source import SplitData, resolve_split
from lfpv_fast.io.imageio import ImageReadError, read_pixels
from lfpv_fast.pipelines.loader import PairList, PairLoader
from lfpv_fast.pipelines.sampling import per_rank_batch

if TYPE_CHECKING:  # for the annotation only: lfpv_fast.config imports the data layer, never the reverse
    from lfpv_fast.config import RunConfig


def read_image_frame(path: Path, bits: int, size: tuple[int, int]) -> np.ndarray:
    """An image file's H x W x 3 samples (uint8 or uint16), checked against what the header scan found."""
    try:
        color, _alpha, depth, _mode = read_pixels(path)
    except (ImageReadError, OSError) as exc:
        raise DataError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
    if depth != bits or (color.shape[1], color.shape[0]) != size:
        raise DataError(f"{path}: decoded as {color.shape[1]}x{color.shape[0]}, {depth} bit, but the scan before "
                        f"training found {size[0]}x{size[1]}, {bits} bit; was the file changed?")
    return color


@dataclass(frozen=True)
class FrameReader:
    """The torch loader's reader: pair i's LQ and GT frames (H x W x 3, uint8 or uint16, in their stored channel
    order), checked against the split's scan and resized to data.resize (OpenCV's INTER_LINEAR formula; skipped
    where frames are stored at that size). Bad files raise `DataError` naming them. A plain dataclass, so that
    the loader's worker processes can receive it."""

    data: SplitData

    def _read(self, index: int, side: int) -> np.ndarray:
        pair, data = self.data.pairs[index], self.data
        path = (pair.lq, pair.gt)[side]
        if data.format == "image":
            img = read_image_frame(path, data.bits[side], data.sizes[index])
        else:  # .npy frames: stored at data.size where nothing is resized on reading
            stored = (data.size[1], data.size[0], 3) if data.resize is None and data.size is not None else None
            img = load_frame(path, stored)
        if data.resize is not None:
            img = resize_linear(img, *data.resize)
        return img

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._read(index, 0), self._read(index, 1)


def pair_list(data: SplitData) -> PairList:
    """The split's pairs as the loaders take them: files, names and each pair's size as read."""
    if data.size is not None:
        sizes = [data.size] * len(data.pairs)
    else:  # images kept at their own, differing sizes
        assert data.sizes is not None and data.resize is None
        sizes = list(data.sizes)
    return PairList(
        lq=[str(p.lq) for p in data.pairs],
        gt=[str(p.gt) for p in data.pairs],
        scene=[p.scene for p in data.pairs],
        frame=[p.frame for p in data.pairs],
        sizes=sizes,
        resize=data.resize,
        bgr=data.bgr,
        encoded=data.format == "image",
        bits=data.bits,
    )


def build_loader(cfg: RunConfig, split: str, rank: int = 0, world_size: int = 1, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> PairLoader:
    """The loader of `split` ("train" | "test") for `rank` of `world_size`, as cfg.data says.

    What was found (the dataset's layout, folders and naming, the number of pairs) is one line given to `log`
    on rank 0 (default: printed on stdout, beside the tools' other progress lines).

    cfg.data.loader "dali" where DALI cannot be imported is a ConfigError naming the import failure.
    cfg.data.device "gpu" needs a visible CUDA device.
    """
    d = cfg.data
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if split == "train":
        try:
            per_rank_batch(d.batch_size, world_size)  # the one place of the rule: the global batch splits evenly
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from exc
    if d.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError(f"{cfg.source}: data.device is 'gpu' but no CUDA device is visible; use data.device=cpu")
    if d.loader == "dali":
        from lfpv_fast.pipelines import dali

        if not dali.HAVE_DALI:  # an error, not the torch loader in its place: the run would not be what was asked
            raise ConfigError(f"{cfg.source}: data.loader is 'dali' but nvidia.dali cannot be imported "
                              f"({dali.DALI_IMPORT_ERROR}); install nvidia-dali-cuda120 (Linux only) or set "
                              "data.loader=torch")
    data = resolve_split(d, split)
    if rank == 0 and data.found:
        (log or print)(f"data: {data.found}")
    common = dict(
        split=split,
        crop=d.crop,
        global_batch=d.batch_size,
        flips=d.flips,
        rank=rank,
        world_size=world_size,
        seed=seed,
        error=DataError,
    )
    if d.loader == "dali":
        from lfpv_fast.pipelines import dali

        return dali.DaliPairLoader(pair_list(data), device=d.device, num_threads=d.num_threads, **common)
    from lfpv_fast.pipelines.torch_loader import TorchPairLoader

    return TorchPairLoader(pair_list(data), FrameReader(data), num_workers=d.num_workers,
                           pin_memory=torch.cuda.is_available(), **common)
