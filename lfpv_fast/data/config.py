"""The data section of a run config (`data.<key>`) and the table of dataset kinds a config can name.

Users write one flat section; which keys a kind of dataset reads, and the checks across them, belong to the kind.
A kind is one entry of `DATASETS` (name -> `DatasetKind`): its config check, for a preset the folder layouts it
recognises under data.root, and the function that resolves the pairs of a split. The config's names
(`data.dataset`), the checks (`check_data`), `DataConfig.is_images` and the loaders (`resolve_split` in
`lfpv_fast.data.source`) all read this table, so adding a dataset is adding one entry.

This module imports the data layer's readers (for the resolvers and the layouts), never the run config:
`lfpv_fast.config` imports `DataConfig` from here and wraps the ValueErrors below into its ConfigError.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lfpv_fast.data.images import LOL_V1_LAYOUTS, LOL_V2_REAL_LAYOUTS, LOL_V2_SYNTHETIC_LAYOUTS, Layout
from lfpv_fast.data.source import (
    SplitData,
    resolve_demo_png_split,
    resolve_demo_split,
    resolve_pairs_split,
    resolve_preset_split,
    resolve_smid_split,
)

# The largest frame that data.resize and `prepare --resize` accept (2**25 pixels, e.g. 8192 x 4096): a bound on
# what one decoded and resized frame may take in memory, far above the datasets' sizes.
MAX_RESIZE_PIXELS = 1 << 25


@dataclass
class DataConfig:
    dataset: str = "smid"  # a name in DATASETS (below)
    # --- smid (and pairs): the two folders. smid: <root>/<scene>/<frame>.npy (uint8 HWC, BGR); pairs: folders of
    # images paired by relative path and stem.
    lq_root: str | None = None
    gt_root: str | None = None
    # --- smid, demo: the output of `python -m lfpv_fast.prepare`; null reads (and resizes) the raw frames.
    prepared_root: str | None = None
    # --- demo, demo_png: where `lfpv_fast.data.demo` writes the demo dataset.
    demo_root: str = "~/.cache/lfpv_fast/demo"
    # --- smid, demo: scenes held out for testing; a bare file name is looked up in the packaged configs/.
    # null: the dataset's own list (smid_test_scenes.txt for smid, <demo_root>/test_scenes.txt for demo).
    test_scenes: str | None = None
    test_frames: int = 30
    # --- every dataset.
    # Every frame is resized to this [width, height]; null keeps each image's own size (image datasets only).
    resize: list[int] | None = field(default_factory=lambda: [960, 512])
    crop: int = 256
    batch_size: int = 12  # global: split evenly over the DDP ranks
    flips: bool = True
    loader: Literal["dali", "torch"] = "torch"
    device: Literal["cpu", "gpu"] = "cpu"
    num_workers: int = 3  # torch loader: DataLoader worker processes (0: load in the main process)
    num_threads: int = 2  # DALI loader: pipeline CPU threads
    # --- image datasets. A preset (lol_v1, lol_v2_real, lol_v2_synthetic) needs only `root` (the loader finds which
    # known layout is there); `pairs` reads lq_root/gt_root, with the test split in test_lq_root/test_gt_root or
    # listed in test_list (paths of LQ files relative to lq_root, held out of training). A file
    # <prefix><key><suffix>.<ext> pairs with the other side's file of the same relative folder and key.
    root: str | None = None
    test_lq_root: str | None = None
    test_gt_root: str | None = None
    test_list: str | None = None
    lq_prefix: str = ""
    lq_suffix: str = ""
    gt_prefix: str = ""
    gt_suffix: str = ""
    # Bad files (unreadable, truncated, unpaired, mismatched size or bit depth, not an image): an error naming
    # the file before training starts, or skipped with a warning when true.
    skip_bad: bool = False

    def __post_init__(self) -> None:
        # Checked here (not in check_data) so that a DataConfig built in code is checked too.
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.num_threads < 1:
            raise ValueError(f"data.num_threads must be >= 1, got {self.num_threads}")
        dataset_kind(self.dataset)

    @property
    def kind(self) -> DatasetKind:
        """This dataset's entry in DATASETS."""
        return dataset_kind(self.dataset)

    @property
    def is_images(self) -> bool:
        """Encoded image pairs (decoded by Pillow or DALI), not SMID-style .npy arrays."""
        return self.kind.images


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset a config can name (`data.dataset`): everything the package needs to know about it."""

    # The checks across the data keys this kind reads, made when the config loads: ValueError naming the key.
    check: Callable[[DataConfig], None]
    # The pairs of a split ("train" | "test"), every file header-checked: DataError naming a bad file, ConfigError
    # for a key that must be set to read it (e.g. a preset's data.root).
    resolve: Callable[[DataConfig, str], SplitData]
    # Encoded image pairs (PNG, JPEG, TIFF; data.resize may be null) rather than SMID-style .npy arrays.
    images: bool
    # A preset: the folder layouts it recognises under data.root (lfpv_fast.data.images.Layout), as distributed
    # first; empty for the other kinds.
    layouts: tuple[Layout, ...] = ()


def dataset_kind(name: str) -> DatasetKind:
    """The entry of a dataset name; ValueError listing the names (and the closest) for an unknown one."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = name if len(name) <= 80 else f"{name[:80]}..."
    raise ValueError(f"unknown data.dataset {shown!r}{hint} (the datasets: {', '.join(DATASETS)})")


def preset_names() -> list[str]:
    """The kinds that find their folders under data.root in a known layout."""
    return [name for name, kind in DATASETS.items() if kind.layouts]


# ---------------------------------------------------------------------------------------------
# The checks of each kind. The keys that name a dataset's files or how they pair: each kind reads some of them; one
# that the kind would not read, set away from its default, is an error rather than a silent surprise. (test_frames,
# demo_root and skip_bad name no data and are left alone where they are not read.)

IMAGE_KEYS = ("root", "test_lq_root", "test_gt_root", "test_list", "lq_prefix", "lq_suffix", "gt_prefix", "gt_suffix")


def _set_keys(d: DataConfig, keys: tuple[str, ...]) -> list[str]:
    """The keys among `keys` whose values differ from their defaults."""
    defaults = DataConfig()
    return [k for k in keys if getattr(d, k) != getattr(defaults, k)]


def check_npy_dataset(d: DataConfig) -> None:
    """smid: SMID-style .npy trees (lq_root/gt_root or the prepared cache), resized to one size."""
    if d.resize is None:
        raise ValueError(f"data.resize=null (each image at its own size) is for image datasets; dataset "
                         f"{d.dataset!r} needs data.resize: [width, height]")
    if keys := _set_keys(d, IMAGE_KEYS):
        images = ", ".join(name for name, kind in DATASETS.items() if kind.images)
        raise ValueError(f"data.{keys[0]} is read by image datasets ({images}), not by dataset {d.dataset!r}")


def check_demo(d: DataConfig) -> None:
    """demo: an SMID-style tree that the package writes to data.demo_root (and reads from there)."""
    check_npy_dataset(d)
    if keys := _set_keys(d, ("lq_root", "gt_root")):
        raise ValueError(f"data.{keys[0]} is not read by dataset 'demo', which is written to and read from "
                         "data.demo_root")


def _refuse_smid_keys(d: DataConfig) -> None:
    if keys := _set_keys(d, ("prepared_root", "test_scenes")):
        hint = "; list held-out images in data.test_list" if keys[0] == "test_scenes" else ""
        raise ValueError(f"data.{keys[0]} is for SMID-style datasets, not for dataset {d.dataset!r}{hint}")


def check_pairs(d: DataConfig) -> None:
    """pairs: lq_root/gt_root, a test split in test_lq_root/test_gt_root or test_list, the naming keys."""
    _refuse_smid_keys(d)
    if d.root is not None:
        raise ValueError(f"data.root is read by the presets ({', '.join(preset_names())}); dataset 'pairs' reads "
                         "data.lq_root and data.gt_root")
    if (d.test_lq_root is None) != (d.test_gt_root is None):
        raise ValueError("set both data.test_lq_root and data.test_gt_root, or neither")
    if d.test_lq_root is not None and d.test_list is not None:
        raise ValueError("the test split comes from data.test_lq_root/test_gt_root or from data.test_list, not both")


def check_preset(d: DataConfig) -> None:
    """A preset: data.root only; the folders and file names come from the layout found there."""
    _refuse_smid_keys(d)
    if keys := _set_keys(d, ("lq_root", "gt_root", *IMAGE_KEYS[1:])):
        raise ValueError(f"dataset {d.dataset!r} takes its folders and file names from its layout; data.{keys[0]} "
                         "cannot be set (use dataset 'pairs' for another layout)")


def check_demo_png(d: DataConfig) -> None:
    """demo_png: the demo as PNG pairs in data.demo_root; no folder or naming key."""
    if d.root is not None:
        raise ValueError("dataset 'demo_png' is written to data.demo_root; data.root cannot be set")
    check_preset(d)


# The dataset kinds a config can name, in the order the messages list them.
DATASETS: dict[str, DatasetKind] = {
    "smid": DatasetKind(check_npy_dataset, resolve_smid_split, images=False),
    "demo": DatasetKind(check_demo, resolve_demo_split, images=False),
    "pairs": DatasetKind(check_pairs, resolve_pairs_split, images=True),
    "lol_v1": DatasetKind(check_preset, resolve_preset_split, images=True, layouts=LOL_V1_LAYOUTS),
    "lol_v2_real": DatasetKind(check_preset, resolve_preset_split, images=True, layouts=LOL_V2_REAL_LAYOUTS),
    "lol_v2_synthetic": DatasetKind(check_preset, resolve_preset_split, images=True,
                                    layouts=LOL_V2_SYNTHETIC_LAYOUTS),
    # The demo written as PNG pairs in the lol_v1 layout (under data.demo_root, not data.root).
    "demo_png": DatasetKind(check_demo_png, resolve_demo_png_split, images=True),
}


def check_data(d: DataConfig) -> None:
    """The data section's checks across keys, ValueError naming the key and the value: the common ones, then the
    kind's own. (The sizes that the model sets, data.resize and data.crop against model.align, are checked with
    the model: lfpv_fast.config.validate.)"""
    if d.resize is not None and len(d.resize) == 2 and d.resize[0] * d.resize[1] > MAX_RESIZE_PIXELS:
        raise ValueError(f"data.resize {d.resize} is {d.resize[0] * d.resize[1]} pixels a frame; at most "
                         f"{MAX_RESIZE_PIXELS} are supported")
    if d.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {d.batch_size}")
    if d.test_frames < 1:
        raise ValueError(f"data.test_frames must be >= 1, got {d.test_frames}")
    d.kind.check(d)
