"""Write a resized RGB cache of SMID once, so that training reads small frames and never resizes.

    python -m lfpv_fast.prepare --lq SMID_LQ_np --gt SMID_Long_np --out DIR [--resize 960 512] [--overwrite]

Output (the input layout mirrored)::

    DIR/lq/<scene>/<frame>.npy   uint8 H x W x 3, RGB, resized (INTER_LINEAR, no antialias)
    DIR/gt/<scene>/<gt>.npy      the scene's ground truth only (the file the published rule picks)
    DIR/manifest.json            size, colour order, scenes with their GT and frames

Resumable: a file already there with the expected header and size is skipped; each file is
written to a hidden temp file and renamed into place, so an interrupted run never leaves a
half-written frame under a final name. The manifest is removed at the start and written last, so
a cache without it is unfinished and the loaders refuse it. Every input read is validated and a
bad one stops the run with an error naming it. (Only headers and file sizes are checked on files
already written: bytes corrupted inside the data are not detected.)

A cache of another size in DIR is refused (every frame would be rewritten): --overwrite rebuilds it.
Arguments are checked before anything is written: --lq and --gt must be different folders, and DIR must
not overlap them.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lfpv_fast.cli import ArgumentParser, fail
from lfpv_fast.data.smid import DataError, Scene, Tree, check_npy_header, load_frame, resize_linear, scan_tree

MANIFEST = "manifest.json"
FORMAT = "lfpv_fast.prepared"
VERSION = 1
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class PrepareReport:
    written: int
    skipped: int
    manifest: Path
    replaced_size: tuple[int, int] | None = None  # (w, h) of the frames a rebuild (--overwrite) replaced

    @property
    def total(self) -> int:
        return self.written + self.skipped


def _is_done(dst: Path, shape: tuple[int, int, int]) -> bool:
    if not dst.is_file():
        return False
    try:
        return check_npy_header(dst) == shape
    except DataError:
        return False


def _write_atomic(dst: Path, arr: np.ndarray) -> None:
    # Hidden name without .npy: never listed as a frame, and np.save writes to the file object as is.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def _convert(src: Path, dst: Path, size: tuple[int, int]) -> None:
    img = load_frame(src)[:, :, ::-1]  # SMID stores BGR; the published loader reverses to RGB
    _write_atomic(dst, np.ascontiguousarray(resize_linear(img, *size)))


def _check_folders(lq: Path, gt: Path, out: Path) -> None:
    """--lq, --gt and --out must not overlap: the cache is never written into (or over) its inputs."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    lq_r, gt_r, out_r = lq.resolve(), gt.resolve(), out.resolve()
    if lq_r == gt_r:
        raise ValueError(f"--gt {gt} is the same folder as --lq {lq}: the ground truths live in their own tree "
                         "(SMID: SMID_Long_np next to SMID_LQ_np)")
    for flag, src in (("--lq", lq_r), ("--gt", gt_r)):
        # The cache writes out/lq, out/gt and out/manifest.json: none of them may lie in an input tree.
        if out_r.is_relative_to(src) or src.is_relative_to(out_r / "lq") or src.is_relative_to(out_r / "gt"):
            raise ValueError(f"--out {out} overlaps the input folder {flag} {src}: choose an output folder outside "
                             "the dataset")


def _cached_size(out: Path, tasks: list[tuple[Path, Path]]) -> tuple[int, int] | None:
    """(w, h) of the frames of a cache already in `out`: from its manifest, else from a frame already written."""
    try:
        size = json.loads((out / MANIFEST).read_text()).get("resize")
        if isinstance(size, list) and len(size) == 2:
            return int(size[0]), int(size[1])
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no manifest (an interrupted run) or an unreadable one: look at the frames
    for _, dst in tasks:
        if dst.is_file():
            try:
                h, w, _ = check_npy_header(dst)
                return w, h
            except DataError:
                continue
    return None


def prepare(
    lq: str | Path,
    gt: str | Path,
    out: str | Path,
    resize: tuple[int, int] = (960, 512),
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PrepareReport:
    """Build (or finish) the cache in `out`; `resize` is (width, height). Returns what was done.

    Bad arguments raise ValueError, bad inputs DataError, both before anything is written. A cache of
    another size in `out` is an error unless `overwrite`.
    """
    w, h = int(resize[0]), int(resize[1])
    if w < 1 or h < 1:
        raise ValueError(f"--resize W H must be two numbers >= 1, got {w} {h}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    lq, gt, out = Path(lq).expanduser(), Path(gt).expanduser(), Path(out).expanduser()
    _check_folders(lq, gt, out)
    tree = scan_tree(lq, gt)

    tasks: list[tuple[Path, Path]] = []
    for scene in tree.scenes:
        tasks.append((tree.gt_path(scene), out / "gt" / scene.name / scene.gt))
        tasks += [(tree.lq_path(scene, f), out / "lq" / scene.name / f) for f in scene.frames]
    previous = _cached_size(out, tasks)
    if previous is not None and previous != (w, h):
        if not overwrite:
            raise ValueError(f"--out {out} holds a cache of {previous[0]}x{previous[1]} frames; --resize {w} {h} "
                             f"would rewrite every frame: choose another --out, or pass --overwrite to rebuild it "
                             f"at {w}x{h}")
    else:
        previous = None

    manifest = out / MANIFEST
    manifest.unlink(missing_ok=True)  # unfinished from here until the last line
    for scene in tree.scenes:
        for sub in ("lq", "gt"):
            folder = out / sub / scene.name
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(f".*{TMP_SUFFIX}"):  # left by an interrupted run
                stale.unlink(missing_ok=True)

    shape = (h, w, 3)
    todo = [(s, d) for s, d in tasks if not _is_done(d, shape)]
    skipped = len(tasks) - len(todo)
    bar = tqdm(total=len(tasks), initial=skipped, unit="frame", desc="prepare", disable=not progress)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_convert, s, d, (w, h)) for s, d in todo}
        while futures:
            done, futures = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    for other in futures:
                        other.cancel()
                    bar.close()
                    raise fut.exception()  # type: ignore[misc]
                bar.update(1)
    bar.close()

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "resize": [w, h],
        "color": "RGB",
        "dtype": "uint8",
        "source": {"lq": str(tree.lq_root), "gt": str(tree.gt_root)},
        "scenes": {s.name: {"gt": s.gt, "frames": list(s.frames)} for s in tree.scenes},
    }
    tmp = manifest.with_name(f".{MANIFEST}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, manifest)
    return PrepareReport(written=len(todo), skipped=skipped, manifest=manifest, replaced_size=previous)


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


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m lfpv_fast.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lq", required=True, help="raw LQ root: <lq>/<scene>/<frame>.npy (uint8 BGR)")
    ap.add_argument("--gt", required=True, help="raw GT root: <gt>/<scene>/*.npy")
    ap.add_argument("--out", required=True, help="cache folder to create or finish")
    ap.add_argument("--resize", nargs=2, type=int, default=[960, 512], metavar=("W", "H"))
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default: min(8, CPUs))")
    ap.add_argument("--overwrite", action="store_true", help="rebuild a cache that holds frames of another size")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = prepare(args.lq, args.gt, args.out, tuple(args.resize), args.workers, not args.no_progress,
                         overwrite=args.overwrite)
    except (DataError, ValueError, OSError) as exc:
        return fail(str(exc))
    if report.replaced_size is not None:
        old_w, old_h = report.replaced_size
        print(f"rebuilt {args.out} at {args.resize[0]}x{args.resize[1]} (it held {old_w}x{old_h} frames)")
    print(f"{report.written} frames written, {report.skipped} already done; manifest: {report.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
