"""What both loaders share: the pairs they read (`PairList`), the epoch/batch position, the plan of each epoch,
resume."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lfpv_fast.pipelines.sampling import epoch_draws, per_rank_batch, test_indices, train_batches

Batch = dict[str, Any]


class LoaderError(ValueError):
    """A split or a frame the loaders cannot use (the default of the loaders' `error` argument)."""


@dataclass(frozen=True)
class PairList:
    """The (LQ, GT) pairs of one split in plain values: what a loader reads, in this order.

    lfpv_fast.data.loaders makes one from a config. The DALI loader reads the files itself; the torch loader
    asks its `read` callable for pair i and uses only the names and sizes here.
    """

    lq: list[str]  # each pair's LQ file
    gt: list[str]  # each pair's GT file (several pairs may share one)
    scene: list[str]  # each pair's "scene" and "frame" name in the batches
    frame: list[str]
    sizes: list[tuple[int, int]]  # each pair's (width, height) as read, after `resize`
    resize: tuple[int, int] | None = None  # (width, height) DALI resizes to when reading; None: the stored size
    bgr: bool = False  # frames stored BGR (raw SMID, demo): reversed to RGB
    encoded: bool = False  # image files (PNG, JPEG, TIFF) rather than .npy arrays
    bits: tuple[int, int] = (8, 8)  # sample depth of the LQ and of the GT files (8 or 16)

    def __post_init__(self) -> None:
        counts = {len(v) for v in (self.lq, self.gt, self.scene, self.frame, self.sizes)}
        if len(counts) != 1:
            raise ValueError(f"PairList: lq, gt, scene, frame and sizes must have one entry per pair, got lengths "
                             f"{[len(v) for v in (self.lq, self.gt, self.scene, self.frame, self.sizes)]}")

    def __len__(self) -> int:
        return len(self.lq)


@dataclass(frozen=True)
class BatchPlan:
    """One batch: sample indices and, for training, each sample's crop anchor and flips."""

    indices: np.ndarray  # int64 [B]
    x: np.ndarray | None = None  # int64 [B]; None: no crop (test)
    y: np.ndarray | None = None
    hflip: np.ndarray | None = None  # bool [B]
    vflip: np.ndarray | None = None


class PairLoader:
    """Iterates (LQ, GT) batches of one split for one rank; subclasses implement `_produce`.

    `iter(loader)` yields the batches left in the current epoch, then moves to the next epoch at
    batch 0. `state_dict()` is {"epoch", "batch"} with batch = batches already yielded in the epoch;
    `load_state_dict` restores it and the next iteration continues with the identical batches.

    `error` is the exception type the loader raises for a split or a frame it cannot use (fewer pairs than one
    global batch, a file DALI cannot decode); lfpv_fast.data.loaders passes the data layer's `DataError`.
    """

    def __init__(
        self,
        pairs: PairList,
        split: str,
        crop: int,
        global_batch: int,
        flips: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        error: type[Exception] = LoaderError,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.pairs, self.split, self.crop, self.flips = pairs, split, crop, flips
        self.rank, self.world_size, self.seed, self.error = rank, world_size, seed, error
        self.global_batch = global_batch
        n = len(pairs)
        # The draws take the sizes as two arrays (they collapse to one size where all are alike).
        self._widths = np.array([w for w, _ in pairs.sizes], dtype=np.int64)
        self._heights = np.array([h for _, h in pairs.sizes], dtype=np.int64)
        if split == "train":
            self.batch_size = per_rank_batch(global_batch, world_size)
            self._len = n // global_batch
            if self._len == 0:
                raise error(
                    f"the training split has {n} pairs, fewer than one global batch (data.batch_size={global_batch})"
                )
        else:
            self.batch_size = 1
            self._len = len(test_indices(n, world_size, rank))
        self._epoch = 0
        self._batch = 0

    # --- position --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch, self._batch = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "batch"}:
            raise ValueError(f"loader state must be {{'epoch': int, 'batch': int}}, got {state!r}")
        epoch, batch = state["epoch"], state["batch"]
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (epoch, batch)):
            raise ValueError(f"loader state values must be ints, got {state!r}")
        if epoch < 0 or not 0 <= batch <= self._len:
            raise ValueError(f"loader state {state!r} out of range: epoch >= 0, batch in [0, {self._len}]")
        self._epoch, self._batch = int(epoch), int(batch)

    # --- plan ------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[BatchPlan]:
        """This rank's batches of `epoch` (a pure function of seed, epoch, rank and world size)."""
        n = len(self.pairs)
        if self.split == "test":
            return [BatchPlan(np.array([i])) for i in test_indices(n, self.world_size, self.rank)]
        d = epoch_draws(n, self.seed, epoch, (self._widths, self._heights), self.crop, self.flips)
        return [
            BatchPlan(idx, d.x[idx], d.y[idx], d.hflip[idx], d.vflip[idx])
            for idx in train_batches(d.order, self.global_batch, self.world_size, self.rank)
        ]

    def names(self, plan: BatchPlan) -> tuple[list[str], list[str]]:
        return [self.pairs.scene[i] for i in plan.indices], [self.pairs.frame[i] for i in plan.indices]

    # --- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if self._batch >= self._len:  # stopped right after an epoch's last batch
            self._epoch, self._batch = self._epoch + 1, 0
        plans = self.plan(self._epoch)[self._batch :]
        for batch in self._produce(plans):
            self._batch += 1  # before yielding: state_dict() taken now counts this batch
            yield batch
        self._epoch, self._batch = self._epoch + 1, 0

    def _produce(self, plans: list[BatchPlan]) -> Iterator[Batch]:
        raise NotImplementedError
