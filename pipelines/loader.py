"""What both loaders share: the epoch/batch position, the plan of each epoch, resume."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lfpv_fast.data.errors import DataError
from lfpv_fast.data.source import SplitData
from lfpv_fast.pipelines.sampling import epoch_draws, per_rank_batch, test_indices, train_batches

Batch = dict[str, Any]


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
    """

    def __init__(
        self,
        data: SplitData,
        split: str,
        crop: int,
        global_batch: int,
        flips: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.data, self.split, self.crop, self.flips = data, split, crop, flips
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = global_batch
        n = len(data.pairs)
        if split == "train":
            self.batch_size = per_rank_batch(global_batch, world_size)
            self._len = n // global_batch
            if self._len == 0:
                raise DataError(
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
        n = len(self.data.pairs)
        if self.split == "test":
            return [BatchPlan(np.array([i])) for i in test_indices(n, self.world_size, self.rank)]
        size = self.data.size
        if size is None:  # images kept at their own, differing sizes: one (w, h) per pair
            size = tuple(np.array(v) for v in zip(*self.data.sizes, strict=True))
        d = epoch_draws(n, self.seed, epoch, size, self.crop, self.flips)
        return [
            BatchPlan(idx, d.x[idx], d.y[idx], d.hflip[idx], d.vflip[idx])
            for idx in train_batches(d.order, self.global_batch, self.world_size, self.rank)
        ]

    def names(self, plan: BatchPlan) -> tuple[list[str], list[str]]:
        pairs = [self.data.pairs[i] for i in plan.indices]
        return [p.scene for p in pairs], [p.frame for p in pairs]

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
