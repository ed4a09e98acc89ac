"""From `cfg.data` to the list of (LQ, GT) pairs of a split and how their frames are to be read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lfpv_fast.config import ConfigError, DataConfig, resolve_data_file
from lfpv_fast.data.smid import DataError, Pair, Tree, check_pairs, read_scene_list, scan_tree, split_pairs


@dataclass(frozen=True)
class SplitData:
    pairs: list[Pair]
    bgr: bool  # frames stored BGR (raw SMID, demo): reversed to RGB when read
    resize: tuple[int, int] | None  # (w, h) to resize to when read; None: stored at `size` (prepared cache)
    size: tuple[int, int]  # (w, h) of every frame after reading
    test_list: Path


def _tree_and_list(d: DataConfig) -> tuple[Tree | None, Path, Path | None, Path | None]:
    """(prepared tree or None, test list, raw lq_root, raw gt_root)."""
    if d.dataset == "demo":
        from lfpv_fast.data.demo import make_demo_dataset

        demo = make_demo_dataset(d.demo_root)  # creates it on first use
        default_list: Path | str = demo.test_scenes
        lq, gt = demo.lq_root, demo.gt_root
    else:
        default_list = "smid_test_scenes.txt"
        lq = Path(d.lq_root).expanduser() if d.lq_root else None
        gt = Path(d.gt_root).expanduser() if d.gt_root else None
    test_list = resolve_data_file(str(d.test_scenes or default_list))
    prepared = None
    if d.prepared_root:
        from lfpv_fast.prepare import read_manifest

        prepared = read_manifest(d.prepared_root)
    return prepared, test_list, lq, gt


def resolve_split(d: DataConfig, split: str) -> SplitData:
    """The pairs of `split` ("train" | "test") with every file header-checked."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prepared, test_list, lq, gt = _tree_and_list(d)
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
    return SplitData(pairs, tree.bgr, resize, size, test_list)
