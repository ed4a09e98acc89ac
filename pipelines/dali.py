"""DALI pipelines: the same pairs, crops and flips as the torch loader, with the image ops in DALI.

Files are read in the planned order (one reader for LQ, one for GT, over lists of equal length, so
they stay in step): `.npy` frames by `fn.readers.numpy`; image files (PNG, JPEG, TIFF) by
`fn.readers.file` and decoded by `fn.decoders.image` to RGB at the split's bit depth (uint8 or uint16;
EXIF orientation applied, gray replicated, alpha dropped). The crop anchors and flips of each batch
come from `pipelines.sampling` through `fn.external_source`. Then, per frame: resize to data.resize
(INTER_LINEAR, antialias=False: OpenCV's formula; skipped where frames are stored at that size),
BGR -> RGB (SMID), slice at the anchor, flip, and `crop_mirror_normalize` to float32 CHW in [0, 1]
(x / 255, or x / 65535 for 16-bit files).

device="gpu": image files are decoded by the "mixed" decoder (nvJPEG, on the GPU or its hardware
JPEG decoder, for JPEG; the CPU for PNG and TIFF, then copied), `.npy` frames are read on the CPU and
copied, and every image op runs on the GPU of `torch.cuda.current_device()`; batches are CUDA
tensors. device="cpu": the same graph with `device_id=None` and the CPU decoder (libjpeg-turbo,
libpng, libtiff inside nvImageCodec); batches are CPU tensors. A pipeline covers what is left of one
epoch; a new one is built for each epoch (a few ms) because the file order changes.

Pixel equality with the torch loader: on the CPU, decoded samples are identical for PNG (all colour
types and depths), TIFF and JPEG, because both sides run the same decoders with the same settings
(JPEG: libjpeg-turbo, ISLOW integer IDCT, fancy chroma upsampling; tests/test_data_images.py checks
each). The GPU's JPEG decoders use their own IDCT and chroma upsampling, so GPU-decoded JPEG is close to
Pillow's pixels but not bit-equal (not measured yet: no GPU was at hand); PNG and TIFF are decoded
on the CPU in the "mixed" decoder too and stay identical.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch

from lfpv_fast.pipelines.loader import Batch, BatchPlan, PairList, PairLoader

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray

    HAVE_DALI = True
    DALI_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - not installed, or installed but broken (a missing library, ...)
    HAVE_DALI = False
    DALI_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _frames(files: list[str], name: str, device: str, bgr: bool, resize: tuple[int, int] | None,
            encoded: bool = False, bits: int = 8):
    if encoded:
        data, _label = fn.readers.file(files=files, random_shuffle=False, name=name)
        x = fn.decoders.image(data, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                              dtype=types.UINT16 if bits == 16 else types.UINT8)
    else:
        x = fn.readers.numpy(files=files, random_shuffle=False, name=name)
        if device == "gpu":
            x = x.gpu()
    if resize is not None:
        x = fn.resize(x, resize_x=resize[0], resize_y=resize[1], interp_type=types.INTERP_LINEAR, antialias=False)
    if bgr:
        x = fn.color_space_conversion(x, image_type=types.BGR, output_type=types.RGB)
    return x


def _to_chw_float(x, bits: int = 8):
    top = 65535.0 if bits == 16 else 255.0
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[top])


if HAVE_DALI:

    @pipeline_def
    def train_pipeline(
        lq_files: list[str],
        gt_files: list[str],
        draws,
        crop: int,
        device: str = "cpu",
        bgr: bool = True,
        resize: tuple[int, int] | None = None,
        encoded: bool = False,
        bits: tuple[int, int] = (8, 8),
    ):
        """Training pairs: `draws(info)` returns the batch's ([y, x] anchors, hflips, vflips)."""
        anchor, hflip, vflip = fn.external_source(source=draws, num_outputs=3, batch=True, batch_info=True)
        shape = np.array([crop, crop], dtype=np.int32)
        out = []
        for files, name, b in ((lq_files, "lq", bits[0]), (gt_files, "gt", bits[1])):
            x = _frames(files, name, device, bgr, resize, encoded, b)
            x = fn.slice(x, anchor, shape, axes=[0, 1], normalized_anchor=False, normalized_shape=False)
            x = fn.flip(x, horizontal=hflip, vertical=vflip)
            out.append(_to_chw_float(x, b))
        return tuple(out)

    @pipeline_def
    def eval_pipeline(
        lq_files: list[str],
        gt_files: list[str],
        device: str = "cpu",
        bgr: bool = True,
        resize: tuple[int, int] | None = None,
        encoded: bool = False,
        bits: tuple[int, int] = (8, 8),
    ):
        """Evaluation pairs: whole (resized) frames in the given order, no augmentation."""
        return tuple(
            _to_chw_float(_frames(files, name, device, bgr, resize, encoded, b), b)
            for files, name, b in ((lq_files, "lq", bits[0]), (gt_files, "gt", bits[1]))
        )


PREFETCH = 2  # batches a pipeline prepares ahead of the one being read


class _Draws:
    """external_source callback: the planned choices of batch `info.iteration`. DALI may ask past the
    end of the plan (its readers wrap around); such batches are never read, so they repeat the last one."""

    def __init__(self, plans: list[BatchPlan]) -> None:
        self.plans = plans

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        p = self.plans[min(info.iteration, len(self.plans) - 1)]
        anchors = [np.array([y, x], dtype=np.int32) for x, y in zip(p.x, p.y, strict=True)]
        return anchors, [np.array(h, dtype=np.int32) for h in p.hflip], [np.array(v, dtype=np.int32) for v in p.vflip]


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    t = tl.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out


class DaliPairLoader(PairLoader):
    """`PairLoader` running the DALI pipelines with `num_threads` CPU threads on `device`: they read the pair list's
    files. A file DALI cannot decode raises the loader's `error` with one line naming it."""

    def __init__(self, pairs: PairList, *args, device: str = "cpu", num_threads: int = 2, **kwargs) -> None:
        if not HAVE_DALI:
            raise ImportError(f"nvidia.dali cannot be imported ({DALI_IMPORT_ERROR}); install it with "
                              "pip install nvidia-dali-cuda120 (Linux only)")
        super().__init__(pairs, *args, **kwargs)
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        self.device, self.num_threads = device, num_threads

    def _build(self, plans: list[BatchPlan]):
        pairs = self.pairs
        order = [i for p in plans for i in p.indices]
        lq_files = [pairs.lq[i] for i in order]
        gt_files = [pairs.gt[i] for i in order]
        if self.device == "gpu":
            device_id = torch.cuda.current_device()
        else:
            device_id = None
        common = dict(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=self.seed,  # unused: the graph has no random op; all choices come from the plan
            prefetch_queue_depth=min(PREFETCH, len(plans)),
            lq_files=lq_files,
            gt_files=gt_files,
            device=self.device,
            bgr=pairs.bgr,
            resize=pairs.resize,
            encoded=pairs.encoded,
            bits=pairs.bits,
        )
        if plans[0].x is None:
            pipe = eval_pipeline(**common)
        else:
            pipe = train_pipeline(draws=_Draws(plans), crop=self.crop, **common)
        pipe.build()
        return pipe

    def _produce(self, plans: list[BatchPlan]) -> Iterator[Batch]:
        if not plans:
            return
        pipe = self._build(plans)
        device = torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else torch.device("cpu")
        # Scheduled by hand rather than with pipe.run(), which keeps `prefetch_queue_depth` batches in flight
        # to the end and so decodes batches past the epoch that nobody reads. The first schedule_run() starts
        # that many; then one more per batch read, until every planned batch is scheduled.
        scheduled = 0
        try:
            for plan in plans:
                try:
                    if scheduled < len(plans):
                        pipe.schedule_run()
                        scheduled += pipe.prefetch_queue_depth if scheduled == 0 else 1
                    lq, gt = pipe.outputs()
                except RuntimeError as exc:  # a file that passed the header scan but does not decode
                    raise self.error(_dali_error(exc)) from exc
                scene, frame = self.names(plan)
                yield {"lq": _to_torch(lq, device), "gt": _to_torch(gt, device), "scene": scene, "frame": frame}
        finally:
            del pipe


def _dali_error(exc: RuntimeError) -> str:
    """DALI's multi-line pipeline error as one line, naming the file where DALI does."""
    text = str(exc)
    found = re.search(r"Failed to decode sample #\d+ : (.+)", text)
    if found:
        return f"{found.group(1).strip()}: DALI cannot decode it (damaged image data after a valid header?)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "the DALI pipeline failed: " + (lines[-1] if lines else type(exc).__name__)
