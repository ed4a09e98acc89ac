"""From `cfg.data` to the list of (LQ, GT) pairs of a split and how their frames are to be read.

`resolve_split` asks the dataset's entry in the table of dataset kinds (`lfpv_fast.data.config.DATASETS`, reached
as `DataConfig.kind`) for its resolver; the resolvers of the built-in kinds are below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lfpv_fast.data.cache import read_manifest
from lfpv_fast.data.errors import ConfigError, DataError
from lfpv_fast.data.images import LOL_V1_LAYOUTS, Layout, Naming, find_layout, scan_pairs, split_by_list
from lfpv_fast.data.lists import resolve_data_file
from lfpv_fast.data.smid import Pair, check_pairs, read_scene_list, scan_tree, split_pairs

if TYPE_CHECKING:  # (annotations only: lfpv_fast.data.config imports this module for its table's resolvers)
    from lfpv_fast.data.config import DataConfig


@dataclass(frozen=True)
class SplitData:
    pairs: list[Pair]
    bgr: bool  # frames stored BGR (raw SMID, demo): reversed to RGB when read
    resize: tuple[int, int] | None  # (w, h) to resize to when read; None: read at the stored size
    size: tuple[int, int] | None  # (w, h) of every frame after reading; None: sizes differ (see `sizes`)
    test_list: Path | None
    format: Literal["npy", "image"] = "npy"  # .npy arrays or encoded image files (PNG, JPEG, TIFF)
    bits: tuple[int, int] = (8, 8)  # sample depth of the LQ and of the GT files (image files: 8 or 16)
    sizes: tuple[tuple[int, int], ...] | None = None  # image files: each pair's stored (w, h)
    found: str = ""  # what was found where (the layout, the folders, the naming): one line for the log


def resolve_split(d: DataConfig, split: str) -> SplitData:
    """The pairs of `split` ("train" | "test") with every file header-checked, by the dataset's entry in the table
    of dataset kinds (`d.kind.resolve`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return d.kind.resolve(d, split)


def resolve_smid_split(d: DataConfig, split: str) -> SplitData:
    """smid: SMID as published, data.lq_root/gt_root (resized when read) or the prepared cache."""
    lq = Path(d.lq_root).expanduser() if d.lq_root else None
    gt = Path(d.gt_root).expanduser() if d.gt_root else None
    return _npy_split(d, split, lq, gt, d.test_scenes or "smid_test_scenes.txt")


def resolve_demo_split(d: DataConfig, split: str) -> SplitData:
    """demo: the built-in demo dataset, SMID-style, written to data.demo_root on first use."""
    from lfpv_fast.data.demo import make_demo_dataset

    demo = make_demo_dataset(d.demo_root)  # creates it on first use
    return _npy_split(d, split, demo.lq_root, demo.gt_root, d.test_scenes or demo.test_scenes)


def _npy_split(d: DataConfig, split: str, lq: Path | None, gt: Path | None, test_scenes: str | Path) -> SplitData:
    """A SMID-style .npy tree: the raw frames in lq/gt, resized when read, or the prepared cache of data.prepared_root;
    `test_scenes`: the list of held-out scenes (a path, or a file shipped in configs/)."""
    assert d.resize is not None  # config.validate: only image datasets may keep their own sizes
    test_list = resolve_data_file(str(test_scenes))
    prepared = read_manifest(d.prepared_root) if d.prepared_root else None
    size = (int(d.resize[0]), int(d.resize[1]))
    if prepared is not None:
        if prepared.stored_size != size:
            raise DataError(
                f"prepared cache {d.prepared_root} holds {prepared.stored_size[0]}x{prepared.stored_size[1]} "
                f"frames but data.resize is {list(size)}; prepare it again with --resize {size[0]} {size[1]}"
            )
        tree, resize = prepared, None
    else:
        if lq is None or gt is None:
            raise ConfigError(
                "data.lq_root and data.gt_root must be set for dataset 'smid' (or set data.prepared_root, "
                "or use dataset 'demo')"
            )
        tree, resize = scan_tree(lq, gt), size
    pairs = split_pairs(tree, read_scene_list(test_list), d.test_frames, split, str(test_list))
    check_pairs(pairs, (size[1], size[0], 3) if resize is None else None)
    source = f"the prepared cache {d.prepared_root}" if prepared is not None else \
        f"{tree.lq_root} with {tree.gt_root}, resized to {size[0]}x{size[1]}"
    found = (f"{split} split: {d.dataset}, {source}; {len(pairs)} frames of "
             f"{len({p.scene for p in pairs})} scenes")
    return SplitData(pairs, tree.bgr, resize, size, test_list, found=found)


# ---------------------------------------------------------------------------------------------
# Image datasets: pairs, the presets, demo_png


@dataclass(frozen=True)
class ImageFolders:
    """Where the pairs of a split are, before any file is read."""

    lq: Path
    gt: Path
    naming: Naming
    test_list: Path | None  # pairs listed here are the test split (held out of training)
    rule: str | None = None  # where the naming comes from, for messages (None: the data.*_prefix/suffix keys)
    found: str = ""  # the layout found (presets)


def resolve_preset_split(d: DataConfig, split: str) -> SplitData:
    """A preset (lol_v1, ...): the layout of its entry's `layouts` found under data.root."""
    if not d.root:
        raise ConfigError(f"dataset {d.dataset!r} needs data.root, the folder of the dataset in one of the layouts it "
                          "accepts (set it with --set data.root=/path/to/it)")
    return _image_split(d, split, _found_layout(d.dataset, d.kind.layouts, Path(d.root), split))


def resolve_demo_png_split(d: DataConfig, split: str) -> SplitData:
    """demo_png: the demo dataset written as PNG pairs in the LOL-v1 layout under data.demo_root."""
    from lfpv_fast.data.demo import make_demo_png

    root = make_demo_png(d.demo_root)  # written on first use
    return _image_split(d, split, _found_layout("lol_v1", LOL_V1_LAYOUTS, root, split))


def _found_layout(name: str, layouts: tuple[Layout, ...], root: Path, split: str) -> ImageFolders:
    layout = find_layout(name, layouts, root, split)
    return ImageFolders(layout.lq, layout.gt, layout.naming, None, layout.rule, layout.describe())


def resolve_pairs_split(d: DataConfig, split: str) -> SplitData:
    """pairs: lq_root/gt_root, the test split in test_lq_root/test_gt_root or listed in test_list."""
    if not d.lq_root or not d.gt_root:
        raise ConfigError("dataset 'pairs' needs data.lq_root and data.gt_root (the folders of low-light and of "
                          "ground-truth images)")
    naming = Naming(d.lq_prefix, d.lq_suffix, d.gt_prefix, d.gt_suffix)
    if split == "test" and d.test_lq_root:
        lq, gt, test_list = Path(d.test_lq_root).expanduser(), Path(d.test_gt_root or "").expanduser(), None
    elif d.test_list:
        lq, gt, test_list = Path(d.lq_root).expanduser(), Path(d.gt_root).expanduser(), resolve_data_file(d.test_list)
    elif split == "test":
        raise ConfigError("dataset 'pairs' has no test split: set data.test_lq_root and data.test_gt_root, or list "
                          "held-out images of data.lq_root in data.test_list")
    else:
        lq, gt, test_list = Path(d.lq_root).expanduser(), Path(d.gt_root).expanduser(), None
    held = f", held out by {test_list}" if test_list is not None else ""
    found = f"pairs: {lq} with {gt}, {naming.describe()}{held}"
    return _image_split(d, split, ImageFolders(lq, gt, naming, test_list, found=found))


def _image_split(d: DataConfig, split: str, folders: ImageFolders) -> SplitData:
    """The image pairs of `split` in `folders`, header-scanned (see lfpv_fast.data.images)."""
    lq_root, test_list = folders.lq, folders.test_list
    what = f"{split}ing split" if split == "train" else "test split"
    found = scan_pairs(lq_root, folders.gt, folders.naming, d.skip_bad, what, folders.rule)
    if test_list is not None:
        train, test = split_by_list(found, lq_root.expanduser(), test_list)
        found = train if split == "train" else test
        if not found:
            raise DataError(f"the {what} is empty: test list {test_list} names every pair of {lq_root}")
    stored = tuple((p.lq_header.width, p.lq_header.height) for p in found)
    resize = None if d.resize is None else (int(d.resize[0]), int(d.resize[1]))
    if resize is not None and all(s == resize for s in stored):
        resize = None  # already that size: reading is enough
        size: tuple[int, int] | None = stored[0]
    else:
        size = resize if resize is not None else (stored[0] if len(set(stored)) == 1 else None)
    if split == "train":
        read = [size or s for s in stored]
        small = min(range(len(found)), key=lambda i: min(read[i]))
        if min(read[small]) < d.crop:
            w, h = read[small]
            as_read = "" if size is None or resize is None else " after data.resize"
            raise DataError(f"{found[small].lq}: {w}x{h}{as_read} is smaller than the training crop "
                            f"data.crop={d.crop} (lower data.crop, or set data.resize)")
    pairs = [Pair(p.rel_dir, p.stem, p.lq, p.gt) for p in found]
    bits = (found[0].lq_header.bits, found[0].gt_header.bits)
    return SplitData(pairs, bgr=False, resize=resize, size=size, test_list=test_list, format="image", bits=bits,
                     sizes=stored, found=f"{split} split: {folders.found}; {len(pairs)} pairs")
