"""SMID as published: the folder layout, ground-truth pairing, test split, frame checks and the resize.

Layout (as distributed, e.g. SMID_LQ_np / SMID_Long_np)::

    <lq_root>/<scene>/<frame>.npy     uint8 HWC, BGR: the short-exposure (low-light) frames
    <gt_root>/<scene>/<name>.npy      the scene's long exposure(s)

Only `.npy` files are considered. In a GT scene folder, names containing ``.ARW`` or ``half`` are
skipped and the first remaining file in sorted order is the scene's ground truth; every LQ frame of
the scene pairs with it. Frames are reversed to RGB and resized to `resize` (width, height) with
bilinear interpolation without antialiasing, exactly OpenCV's INTER_LINEAR formula (half-pixel
centres, clamped at the borders), then rounded to uint8 as `cv2.resize` does on uint8 input.

Every check raises `DataError` (lfpv_fast.data.errors) naming the file or folder and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lfpv_fast.data.errors import DataError, few
from lfpv_fast.data.lists import read_name_list

NPY = ".npy"
GT_SKIP = (".ARW", "half")


# ---------------------------------------------------------------------------------------------
# Frame files


def check_npy_header(path: str | Path) -> tuple[int, int, int]:
    """Validate a frame file from its header alone and return its shape (H, W, 3).

    Cheap enough to run on every file of a split before training starts (it reads ~128 bytes):
    catches files that are not .npy, truncated files, a wrong dtype and a wrong rank.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (ValueError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
    _check_array_meta(path, tuple(shape), np.dtype(dtype))
    if fortran:
        raise DataError(f"{path}: expected a C-ordered array, got Fortran order")
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < expected:
        raise DataError(f"{path}: truncated .npy file ({size} bytes, the header promises {expected})")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _check_array_meta(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8:
        raise DataError(f"{path}: expected a uint8 frame, got dtype {dtype}")
    if len(shape) != 3 or shape[2] != 3:
        raise DataError(f"{path}: expected an H x W x 3 frame, got shape {shape}")
    if min(shape[:2]) < 1:
        raise DataError(f"{path}: empty frame, shape {shape}")


def load_frame(path: str | Path, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Read one frame (uint8 HWC) and check it; `shape` (if given) is the expected (H, W, 3)."""
    path = Path(path)
    # Header first: np.load reports a non-.npy file as "pickled data", which misleads.
    header_shape = check_npy_header(path)
    if shape is not None and header_shape != tuple(shape):
        raise DataError(f"{path}: expected shape {tuple(shape)}, got {header_shape}")
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (ValueError, OSError, EOFError) as exc:
        # numpy raises ValueError for bad headers and for truncated data ("cannot reshape ...").
        raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected one array, got {type(arr).__name__}")
    _check_array_meta(path, arr.shape, arr.dtype)
    if shape is not None and arr.shape != tuple(shape):
        raise DataError(f"{path}: expected shape {tuple(shape)}, got {arr.shape}")
    return arr


def resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV INTER_LINEAR on a uint8 (or uint16) HWC image: half-pixel centres, borders clamped, no antialias.

    Computed in float32 (torch's bilinear with align_corners=False is this formula) and rounded
    to the input's type, as `cv2.resize` returns uint8 for uint8 input. Same size is the identity.
    """
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    top = float(np.iinfo(img.dtype).max)
    return y[0].permute(1, 2, 0).round_().clamp_(0, top).numpy().astype(img.dtype)


# ---------------------------------------------------------------------------------------------
# Folder layout


def frame_names(folder: Path) -> list[str]:
    """The .npy file names of a scene folder, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.suffix == NPY and p.is_file())


def pick_gt(names: list[str]) -> str | None:
    """The published GT rule: skip names containing .ARW or half, take the first remaining (sorted)."""
    keep = sorted(n for n in names if not any(s in n for s in GT_SKIP))
    return keep[0] if keep else None


def _scene_dirs(root: Path, what: str) -> list[str]:
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder")
    scenes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not scenes:
        raise DataError(f"{what} {root} is empty: expected one sub-folder per scene holding .npy frames")
    return scenes


@dataclass(frozen=True)
class Scene:
    name: str
    gt: str  # GT file name inside <gt_root>/<scene>
    frames: tuple[str, ...]  # LQ frame file names inside <lq_root>/<scene>, sorted


@dataclass(frozen=True)
class Tree:
    """A scanned (or manifest-described) dataset: where the files are and how to read them."""

    lq_root: Path
    gt_root: Path
    scenes: tuple[Scene, ...]
    bgr: bool  # stored BGR (raw SMID, demo) or RGB (prepared cache)
    stored_size: tuple[int, int] | None = None  # (w, h) when every frame is known to have it

    def lq_path(self, scene: Scene, frame: str) -> Path:
        return self.lq_root / scene.name / frame

    def gt_path(self, scene: Scene) -> Path:
        return self.gt_root / scene.name / scene.gt


def scan_tree(lq_root: str | Path, gt_root: str | Path) -> Tree:
    """List an SMID-layout dataset and check its structure (not the frames: see `check_npy_header`)."""
    lq_root, gt_root = Path(lq_root).expanduser(), Path(gt_root).expanduser()
    lq_scenes = _scene_dirs(lq_root, "LQ root")
    gt_scenes = _scene_dirs(gt_root, "GT root")
    only_lq = sorted(set(lq_scenes) - set(gt_scenes))
    only_gt = sorted(set(gt_scenes) - set(lq_scenes))
    if only_lq or only_gt:
        raise DataError(
            f"LQ root {lq_root} and GT root {gt_root} do not hold the same scenes: "
            f"only in LQ: {few(only_lq)}; only in GT: {few(only_gt)}"
        )
    scenes = []
    for name in lq_scenes:
        frames = frame_names(lq_root / name)
        if not frames:
            raise DataError(f"LQ scene folder {lq_root / name} has no .npy frames")
        gt_names = frame_names(gt_root / name)
        gt = pick_gt(gt_names)
        if gt is None:
            raise DataError(
                f"GT scene folder {gt_root / name} has no ground truth: expected a .npy file whose name "
                f"contains neither '.ARW' nor 'half' (found {few(gt_names)})"
            )
        scenes.append(Scene(name, gt, tuple(frames)))
    return Tree(lq_root, gt_root, tuple(scenes), bgr=True)


def read_scene_list(path: str | Path) -> list[str]:
    """A test-scene list: one scene name a line."""
    return read_name_list(path)


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Pair:
    scene: str
    frame: str  # LQ file name without .npy
    lq: Path
    gt: Path


def split_pairs(tree: Tree, test_scenes: list[str], test_frames: int, split: str, list_file: str = "") -> list[Pair]:
    """The pairs of a split, in order: training = every frame of every non-test scene; test = the
    first `test_frames` frames (sorted) of each test scene. Scenes in sorted order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    known = {s.name for s in tree.scenes}
    missing = sorted(set(test_scenes) - known)
    if missing:
        raise DataError(
            f"test-scene list {list_file or '<given>'} names scenes that are not in {tree.lq_root}: {few(missing)}"
        )
    held_out = set(test_scenes)
    pairs = []
    for scene in tree.scenes:
        if (scene.name in held_out) != (split == "test"):
            continue
        frames = scene.frames[:test_frames] if split == "test" else scene.frames
        gt = tree.gt_path(scene)
        pairs += [Pair(scene.name, f[: -len(NPY)], tree.lq_path(scene, f), gt) for f in frames]
    if not pairs:
        raise DataError(f"the {split} split of {tree.lq_root} is empty (test-scene list {list_file or '<given>'})")
    return pairs


def check_pairs(pairs: list[Pair], shape: tuple[int, int, int] | None = None) -> None:
    """Header-check every file of a split once (each GT once), so that the DALI path, which reads
    files in C++, never meets a bad file with an unclear message."""
    seen: set[Path] = set()
    for p in pairs:
        for path in (p.lq, p.gt):
            if path in seen:
                continue
            seen.add(path)
            got = check_npy_header(path)
            if shape is not None and got != shape:
                raise DataError(f"{path}: expected shape {shape}, got {got}")
