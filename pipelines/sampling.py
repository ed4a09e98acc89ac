"""All randomness of the data pipelines, computed on the host as a pure function of (seed, epoch).

Both loaders (DALI and torch) take their sample order, crop positions and flips from here, so that
they produce the same batches, and so that a resumed run (epoch, batch) reproduces them exactly.

Per epoch, one numpy Generator (PCG64 seeded with SeedSequence([seed, epoch, SALT])) draws, in
this order: the permutation of the N training samples, then arrays indexed by sample index:
x anchors, y anchors (pixels, top-left of the crop in the resized frame, uniform over every valid
position of that frame, whose size may differ from sample to sample), horizontal flips, vertical
flips (each p = 0.5; all False when flips are off). The choices for a sample therefore depend only
on (seed, epoch, sample index) and the frame sizes, not on the rank, the world size or the batch it
lands in. Changing this order changes every run: it is part of the
reproducibility contract.

Sharding (training): the permutation is cut into global batches of `global_batch` samples; rank r
takes slots [r * b, (r + 1) * b) of each, b = global_batch / world_size. The last partial global
batch (N mod global_batch samples) is dropped for the epoch, as DistributedSampler with drop_last
would: every rank sees the same number of equal-sized batches, and no sample is seen twice in an
epoch. Since the permutation changes each epoch, different samples are dropped each epoch.

Sharding (test): no shuffling and no augmentation; rank r takes samples r, r + W, r + 2W, ... (W
the world size), one per batch; no sample is padded or repeated, so per-rank counts differ by at
most one and metrics gathered over ranks are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SALT = 0x4C465056  # "LFPV": keeps these streams apart from other users of (seed, epoch)


@dataclass(frozen=True)
class EpochDraws:
    """One epoch's choices. `order` is the permutation; the rest are indexed by sample index."""

    order: np.ndarray  # int64 [N]
    x: np.ndarray  # int64 [N]
    y: np.ndarray  # int64 [N]
    hflip: np.ndarray  # bool [N]
    vflip: np.ndarray  # bool [N]


def epoch_draws(n: int, seed: int, epoch: int, size: tuple[int, int] | tuple[np.ndarray, np.ndarray], crop: int,
                flips: bool) -> EpochDraws:
    """The training choices of one epoch; `size` is the (width, height) of the frames as read (resized), or
    two arrays of N widths and heights where frames differ (images kept at their own size)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    w, h = (np.asarray(v, dtype=np.int64) for v in size)
    if w.ndim and w.size and (w == w.flat[0]).all() and (h == h.flat[0]).all():
        w, h = w.flat[0], h.flat[0]  # all alike: exactly the draws of one common size
    if crop > min(w.min(initial=crop), h.min(initial=crop)):
        raise ValueError(f"crop {crop} is larger than a frame ({w.min()}x{h.min()} at the smallest)")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, SALT])))
    order = rng.permutation(n)
    x = rng.integers(0, w - crop + 1, size=n)
    y = rng.integers(0, h - crop + 1, size=n)
    hflip = rng.random(n) < 0.5
    vflip = rng.random(n) < 0.5
    if not flips:
        hflip = np.zeros(n, dtype=bool)
        vflip = np.zeros(n, dtype=bool)
    return EpochDraws(order, x, y, hflip, vflip)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch % world_size:
        raise ValueError(
            f"data.batch_size={global_batch} is the global batch and must be divisible by the world size "
            f"{world_size} (each rank takes batch_size / world_size)"
        )
    return global_batch // world_size


def train_batches(order: np.ndarray, global_batch: int, world_size: int, rank: int) -> np.ndarray:
    """This rank's batches of one epoch: sample indices, shape [batches, global_batch / world_size]."""
    b = per_rank_batch(global_batch, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n_batches = len(order) // global_batch
    full = order[: n_batches * global_batch].reshape(n_batches, world_size, b)
    return full[:, rank, :]


def test_indices(n: int, world_size: int, rank: int) -> np.ndarray:
    """This rank's test samples, in order (one per batch)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return np.arange(rank, n, world_size)
