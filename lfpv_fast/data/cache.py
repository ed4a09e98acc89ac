"""The prepared cache's format: what `python -m lfpv_fast.prepare` writes and `data.prepared_root` reads.

    <root>/lq/<scene>/<frame>.npy   uint8 H x W x 3, RGB, resized (INTER_LINEAR, no antialias)
    <root>/gt/<scene>/<gt>.npy      the scene's ground truth only (the file the published rule picks)
    <root>/manifest.json            size, colour order, scenes with their GT and frames

The manifest is what makes a cache: it is written last, atomically, and lists exactly the frames it vouches
for; a folder without it is unfinished and the loaders refuse it. Every file is written to a hidden temporary
file beside its final name and renamed into place (lfpv_fast.io.files), so no reader ever sees a torn file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lfpv_fast.data.errors import DataError
from lfpv_fast.data.smid import Scene, Tree
from lfpv_fast.io.files import atomic_write, atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "lfpv_fast.prepared"
VERSION = 1
TMP_SUFFIX = ".tmp"  # lfpv_fast.io.files' temporary files: .<name>.<random>.tmp


def write_frame(path: Path, frame: np.ndarray) -> None:
    """One frame file, atomically (a failed write, even for a full disk, leaves no temporary file)."""
    atomic_write(path, lambda f: np.save(f, frame, allow_pickle=False))


def manifest_doc(tree: Tree, size: tuple[int, int]) -> dict[str, Any]:
    """The manifest of a cache of `tree`'s scenes at `size` (w, h)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "resize": [int(size[0]), int(size[1])],
        "color": "RGB",
        "dtype": "uint8",
        "source": {"lq": str(tree.lq_root), "gt": str(tree.gt_root)},
        "scenes": {s.name: {"gt": s.gt, "frames": list(s.frames)} for s in tree.scenes},
    }


def write_manifest(root: Path, doc: dict[str, Any]) -> Path:
    """Write (or replace) root/manifest.json atomically; returns its path."""
    path = root / MANIFEST
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path


def manifest_size(root: Path) -> tuple[int, int] | None:
    """(w, h) of the frames a manifest in `root` describes, or None where there is no readable manifest."""
    try:
        size = json.loads((root / MANIFEST).read_text()).get("resize")
        if isinstance(size, list) and len(size) == 2:
            return int(size[0]), int(size[1])
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # none (an interrupted first run) or unreadable
    return None


def read_manifest(root: str | Path) -> Tree:
    """The cache in `root` as a Tree (RGB, every frame of size `resize`), checked."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{root}: no {MANIFEST}, so it is not a finished cache of `python -m lfpv_fast.prepare` "
            "(run it, or run it again to finish an interrupted run)"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc

    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}; rerun `python -m lfpv_fast.prepare` to rebuild it")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"expected 'format': {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise bad(f"expected version {VERSION}, got {doc.get('version')!r}")
    size = doc.get("resize")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise bad(f"'resize' must be [width, height], got {size!r}")
    scenes_doc = doc.get("scenes")
    if not isinstance(scenes_doc, dict) or not scenes_doc:
        raise bad("'scenes' must map scene names to {gt, frames}")
    scenes = []
    for name in sorted(scenes_doc):
        entry = scenes_doc[name]
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("gt"), str)
            and isinstance(entry.get("frames"), list)
            and entry["frames"]
            and all(isinstance(f, str) for f in entry["frames"])
        )
        if not ok:
            raise bad(f"scene {name!r} must have 'gt' (a file name) and 'frames' (a non-empty list)")
        scenes.append(Scene(name, entry["gt"], tuple(sorted(entry["frames"]))))
    return Tree(root / "lq", root / "gt", tuple(scenes), bgr=False, stored_size=(size[0], size[1]))
