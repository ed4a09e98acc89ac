"""Data loaders for training and evaluation: `build_loader(cfg, split, rank, world_size, seed)`.

Batches are dicts: "lq" and "gt" float32 tensors B x 3 x h x w in [0, 1] (RGB; h x w is the crop
for "train", data.resize for "test"), "scene" and "frame" (lists of str; frame is the LQ file name
without .npy). Tensors are on the GPU for loader "dali" with device "gpu", otherwise on the CPU
(pinned for the torch loader wherever CUDA is available, so host-to-device copies overlap compute).

Semantics (the same for both loaders; see `pipelines.sampling` for the exact draws):
- train: each epoch a fresh permutation of the training pairs, a random crop and random
  horizontal/vertical flips (p = 0.5 each) per sample, identical for LQ and GT; data.batch_size is
  the global batch, each rank gets batch_size / world_size; the last partial global batch of an
  epoch is dropped; across ranks every other pair is seen exactly once per epoch.
- test: every test frame in order, batch size 1, frames r, r + W, ... on rank r; no augmentation.
- everything random is a pure function of (seed, epoch, sample index): `set_epoch`, `state_dict`
  and `load_state_dict` reproduce any batch exactly, and DALI and torch give the same batches up
  to uint8 rounding of the resize.
"""

from __future__ import annotations

import warnings

import torch

from lfpv_fast.config import ConfigError, RunConfig
from lfpv_fast.data.source import resolve_split
from lfpv_fast.pipelines.loader import Batch, BatchPlan, PairLoader
from lfpv_fast.pipelines.sampling import per_rank_batch

__all__ = ["Batch", "BatchPlan", "PairLoader", "build_loader"]


def build_loader(cfg: RunConfig, split: str, rank: int = 0, world_size: int = 1, seed: int = 0) -> PairLoader:
    """The loader of `split` ("train" | "test") for `rank` of `world_size`, as cfg.data says.

    cfg.data.loader "dali" falls back to the torch loader (with a warning) where DALI is not
    installed. cfg.data.device "gpu" needs a visible CUDA device.
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
    data = resolve_split(d, split)
    common = dict(
        split=split,
        crop=d.crop,
        global_batch=d.batch_size,
        flips=d.flips,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    if d.loader == "dali":
        from lfpv_fast.pipelines import dali

        if dali.HAVE_DALI:
            return dali.DaliPairLoader(data, device=d.device, num_threads=d.num_threads, **common)
        warnings.warn("data.loader is 'dali' but nvidia-dali is not installed: using the torch loader", stacklevel=2)
    from lfpv_fast.pipelines.torch_loader import TorchPairLoader

    return TorchPairLoader(data, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(), **common)
