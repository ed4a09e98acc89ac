"""Data loaders for training and evaluation: `build_loader(cfg, split, rank, world_size, seed)`.

Batches are dicts: "lq" and "gt" float32 tensors B x 3 x h x w in [0, 1] (RGB; h x w is the crop
for "train", data.resize for "test", or the image's own size where data.resize is null), "scene" and
"frame" (lists of str; SMID: the scene and the LQ file name without .npy; image pairs: the LQ file's
folder relative to its root, "" at the top, and its name without extension). Tensors are on the
GPU for loader "dali" with device "gpu", otherwise on the CPU (pinned for the torch loader wherever
CUDA is available, so host-to-device copies overlap compute).

Semantics (the same for both loaders; see `pipelines.sampling` for the exact draws):
- train: each epoch a fresh permutation of the training pairs, a random crop and random
  horizontal/vertical flips (p = 0.5 each) per sample, identical for LQ and GT; data.batch_size is
  the global batch, each rank gets batch_size / world_size; the last partial global batch of an
  epoch is dropped; across ranks every other pair is seen exactly once per epoch.
- test: every test frame in order, batch size 1, frames r, r + W, ... on rank r; no augmentation.
- everything random is a pure function of (seed, epoch, sample index): `set_epoch`, `state_dict`
  and `load_state_dict` reproduce any batch exactly, and DALI (on the CPU) and torch give the same
  batches up to rounding ties of the resize (identical where nothing is resized).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lfpv_fast.config import ConfigError, RunConfig
from lfpv_fast.data.source import resolve_split
from lfpv_fast.pipelines.loader import Batch, BatchPlan, PairLoader
from lfpv_fast.pipelines.sampling import per_rank_batch

__all__ = ["Batch", "BatchPlan", "PairLoader", "build_loader"]


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
    )
    if d.loader == "dali":
        from lfpv_fast.pipelines import dali

        return dali.DaliPairLoader(data, device=d.device, num_threads=d.num_threads, **common)
    from lfpv_fast.pipelines.torch_loader import TorchPairLoader

    return TorchPairLoader(data, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(), **common)
