"""The reference loader: a torch DataLoader doing the published per-sample steps.

Per sample: `read(i)` (given by the caller; lfpv_fast.data.loaders reads `.npy` frames with np.load and image
files with Pillow, imagecodecs or tifffile, and resizes to data.resize with OpenCV's INTER_LINEAR formula) returns
pair i's LQ and GT frames, H x W x 3 uint8 or uint16 in their stored channel order, at the size the pair list
says. Then both are cropped at the planned anchor, flipped as planned, reversed BGR to RGB (SMID), and scaled to
float32 CHW in [0, 1] (x / 255, or x / 65535 for 16-bit frames). The choices come from `pipelines.sampling`
through a batch sampler, so worker processes hold no random state and the batches do not depend on num_workers.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lfpv_fast.pipelines.loader import Batch, BatchPlan, PairList, PairLoader

# pair index -> (LQ, GT) frames; called in the loader's worker processes, so it must pickle where they spawn
Reader = Callable[[int], tuple[np.ndarray, np.ndarray]]

# A sample key: (index, x, y, hflip, vflip); x is -1 for "no crop" (test).
Key = tuple[int, int, int, bool, bool]


class PairDataset(Dataset):
    """Map-style dataset over the pairs of a `PairList`, indexed by sample keys from the plan."""

    def __init__(self, pairs: PairList, read: Reader, crop: int) -> None:
        self.pairs, self.read, self.crop = pairs, read, crop

    def __len__(self) -> int:
        return len(self.pairs)

    def _augment(self, img: np.ndarray, x: int, y: int, hflip: bool, vflip: bool) -> torch.Tensor:
        if x >= 0:
            img = img[y : y + self.crop, x : x + self.crop]
        if hflip:
            img = img[:, ::-1]
        if vflip:
            img = img[::-1]
        if self.pairs.bgr:
            img = img[:, :, ::-1]
        # x * float32(1/255) (or 1/65535), as DALI's crop_mirror_normalize computes it: both loaders agree bit
        # for bit. In numpy, which is single-threaded: torch's intra-op threads only add overhead here.
        chw = np.ascontiguousarray(img.transpose(2, 0, 1))
        scale = np.float32(1.0 / (65535.0 if img.dtype == np.uint16 else 255.0))
        return torch.from_numpy(np.multiply(chw, scale, dtype=np.float32))

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, str, str]:
        index, x, y, hflip, vflip = key
        lq, gt = self.read(index)
        return (
            self._augment(lq, x, y, hflip, vflip),
            self._augment(gt, x, y, hflip, vflip),
            self.pairs.scene[index],
            self.pairs.frame[index],
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
    memory on "gpu"), reading pair i with `read(i)`.

    An exception of type `error` raised by `read` reaches the caller as it was raised: in a worker process torch
    re-raises it with the worker's traceback in its message, which is cut back to the reader's one line.
    """

    def __init__(self, pairs: PairList, read: Reader, *args, num_workers: int = 0, pin_memory: bool = False,
                 **kwargs) -> None:
        super().__init__(pairs, *args, **kwargs)
        self.dataset = PairDataset(pairs, read, self.crop)
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
        except self.error as exc:  # from a worker, torch adds the worker's traceback: keep the one-line message
            lines = [line for line in str(exc).splitlines() if line.strip()]
            if len(lines) > 1:
                raise type(exc)(lines[-1].split(f"{type(exc).__name__}: ", 1)[-1]) from exc
            raise
