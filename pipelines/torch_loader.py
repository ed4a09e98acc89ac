"""The reference loader: a torch DataLoader doing the published per-sample steps.

Per sample: read the LQ frame and its GT (`.npy`: np.load; image files: decoded by Pillow, or
imagecodecs for 16-bit PNG and tifffile for TIFF, through `lfpv_fast.io.imageio.read_pixels`: gray to
RGB, alpha dropped, EXIF orientation applied), resize each to data.resize (OpenCV INTER_LINEAR,
rounded to the sample type; skipped where frames are stored at that size), crop both at the planned
anchor, flip both as planned, reverse BGR to RGB (SMID), and scale to float32 CHW in [0, 1] (x / 255,
or x / 65535 for 16-bit files). The choices come from `pipelines.sampling` through a batch sampler, so
worker processes hold no random state and the batches do not depend on num_workers.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lfpv_fast.data.errors import DataError
from lfpv_fast.data.smid import load_frame, resize_linear
from lfpv_fast.data.source import SplitData
from lfpv_fast.io.imageio import ImageReadError, read_pixels
from lfpv_fast.pipelines.loader import Batch, BatchPlan, PairLoader


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


# A sample key: (index, x, y, hflip, vflip); x is -1 for "no crop" (test).
Key = tuple[int, int, int, bool, bool]


class PairDataset(Dataset):
    """Map-style dataset over `SplitData.pairs`, indexed by sample keys from the plan."""

    def __init__(self, data: SplitData, crop: int) -> None:
        self.data, self.crop = data, crop
        self._stored_shape = None
        if data.resize is None and data.size is not None:
            self._stored_shape = (data.size[1], data.size[0], 3)

    def __len__(self) -> int:
        return len(self.data.pairs)

    def _read(self, index: int, side: int, x: int, y: int, hflip: bool, vflip: bool) -> torch.Tensor:
        pair, data = self.data.pairs[index], self.data
        path = (pair.lq, pair.gt)[side]
        if data.format == "image":
            img = read_image_frame(path, data.bits[side], data.sizes[index])
        else:
            img = load_frame(path, self._stored_shape)
        if self.data.resize is not None:
            img = resize_linear(img, *self.data.resize)
        if x >= 0:
            img = img[y : y + self.crop, x : x + self.crop]
        if hflip:
            img = img[:, ::-1]
        if vflip:
            img = img[::-1]
        if self.data.bgr:
            img = img[:, :, ::-1]
        # x * float32(1/255) (or 1/65535), as DALI's crop_mirror_normalize computes it: both loaders agree bit
        # for bit. In numpy, which is single-threaded: torch's intra-op threads only add overhead here.
        chw = np.ascontiguousarray(img.transpose(2, 0, 1))
        scale = np.float32(1.0 / (65535.0 if img.dtype == np.uint16 else 255.0))
        return torch.from_numpy(np.multiply(chw, scale, dtype=np.float32))

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, str, str]:
        index, x, y, hflip, vflip = key
        pair = self.data.pairs[index]
        return (
            self._read(index, 0, x, y, hflip, vflip),
            self._read(index, 1, x, y, hflip, vflip),
            pair.scene,
            pair.frame,
        )


def _collate(samples: list[tuple[torch.Tensor, torch.Tensor, str, str]]) -> Batch:
    lq, gt, scene, frame = zip(*samples, strict=True)
    return {"lq": torch.stack(lq), "gt": torch.stack(gt), "scene": list(scene), "frame": list(frame)}


def plan_keys(plan: BatchPlan) -> list[Key]:
    if plan.x is None:
        return [(int(i), -1, -1, False, False) for i in plan.indices]
    return [
        (int(i), int(x), int(y), bool(h), bool(v))
        for i, x, y, h, v in zip(plan.indices, plan.x, plan.y, plan.hflip, plan.vflip, strict=True)
    ]


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C at a terminal signals the whole process group. The main process decides how to stop (the
    # trainer finishes the step and writes a checkpoint) and shuts its workers down itself; a worker
    # dying of the SIGINT would instead surface as "DataLoader worker exited unexpectedly".
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_reported_worker_caps: set[tuple[int, int]] = set()  # (asked, cores) already reported by this process


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cap_workers(asked: int) -> int:
    """data.num_workers, at most one worker per available core (more only contend, and torch warns each epoch).

    Says so once per process, on stderr."""
    cores = available_cores()
    if asked <= cores:
        return asked
    if (asked, cores) not in _reported_worker_caps:
        _reported_worker_caps.add((asked, cores))
        print(f"note: data.num_workers={asked} but this process may use {cores} CPU core(s): using {cores} "
              "loader worker(s)", file=sys.stderr)
    return cores


class TorchPairLoader(PairLoader):
    """`PairLoader` on a torch DataLoader with `num_workers` processes (capped at the available cores; pinned
    memory on "gpu")."""

    def __init__(self, data: SplitData, *args, num_workers: int = 0, pin_memory: bool = False, **kwargs) -> None:
        super().__init__(data, *args, **kwargs)
        self.dataset = PairDataset(data, self.crop)
        self.num_workers, self.pin_memory = cap_workers(num_workers), pin_memory

    def _produce(self, plans: list[BatchPlan]) -> Iterator[Batch]:
        if not plans:
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[plan_keys(p) for p in plans],
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            worker_init_fn=_ignore_sigint,
        )
        try:
            yield from loader
        except DataError as exc:  # from a worker, torch adds the worker's traceback: keep the one-line message
            lines = [line for line in str(exc).splitlines() if line.strip()]
            if len(lines) > 1:
                raise DataError(lines[-1].split("DataError: ", 1)[-1]) from exc
            raise
