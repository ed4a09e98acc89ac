"""Data loaders for training and evaluation, on plain inputs: a `PairList` (the files, names and sizes of a split's
pairs), the crop, flips, global batch, rank, world size and seed; the torch loader also takes a reader of pair i.
They import nothing from lfpv_fast above them: `lfpv_fast.data.loaders.build_loader` makes one from a RunConfig
(the names data.* below are its config keys).

Loaders: `torch_loader.TorchPairLoader` (the reference, a torch DataLoader) and `dali.DaliPairLoader` (NVIDIA DALI,
on the GPU or on the CPU); both are `loader.PairLoader`s.

Batches are dicts: "lq" and "gt" float32 tensors B x 3 x h x w in [0, 1] (RGB; h x w is the crop
for "train", data.resize for "test", or the image's own size where data.resize is null), "scene" and
"frame" (lists of str; SMID: the scene and the LQ file name without .npy; image pairs: the LQ file's
folder relative to its root, "" at the top, and its name without extension). Tensors are on the
GPU for the DALI loader with device "gpu", otherwise on the CPU (pinned for the torch loader wherever
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

from lfpv_fast.pipelines.loader import Batch, BatchPlan, LoaderError, PairList, PairLoader

__all__ = ["Batch", "BatchPlan", "LoaderError", "PairList", "PairLoader"]
