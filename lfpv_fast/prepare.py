"""Write a resized RGB cache of SMID once, so that training reads small frames and never resizes.

    python -m lfpv_fast.prepare --lq SMID_LQ_np --gt SMID_Long_np --out DIR [--resize 960 512] [--overwrite]

Output: the cache format of lfpv_fast.data.cache (DIR/lq/<scene>/<frame>.npy, DIR/gt/<scene>/<gt>.npy,
DIR/manifest.json), the input layout mirrored.

A finished cache stays usable until a new complete manifest replaces it:
- every input is checked (its header and size) before anything is written, so a bad frame is reported while
  the cache is as it was;
- frames are written atomically, and the manifest is replaced (atomically) only once every frame it lists is
  there; a failure on the way (a full disk, a stop) leaves the old manifest and the frames it lists, the frames
  finished so far, and no temporary file;
- a cache of another size is refused (every frame would be rewritten); --overwrite rebuilds it beside the old
  one (DIR/.rebuild) and switches over at the end.
Resumable: a file already there with the expected header and size is skipped. (Only headers and file sizes are
checked on files already written: bytes corrupted inside the data are not detected.)

Arguments are checked before anything is written: --lq and --gt must be different folders, DIR must not
overlap them, and --resize is at most MAX_RESIZE_PIXELS pixels a frame.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lfpv_fast.cli import ArgumentParser, fail
from lfpv_fast.config import MAX_RESIZE_PIXELS
from lfpv_fast.data.cache import MANIFEST, TMP_SUFFIX, manifest_doc, manifest_size, write_frame, write_manifest
from lfpv_fast.data.errors import DataError
from lfpv_fast.data.smid import Tree, check_npy_header, load_frame, resize_linear, scan_tree
from lfpv_fast.io.files import OutputWriteError

REBUILD = ".rebuild"  # a rebuild at another size is written here, beside the cache it replaces
REPLACED = ".replaced"  # the replaced frames, for the moment of the switch


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


def _convert(src: Path, dst: Path, size: tuple[int, int]) -> None:
    img = load_frame(src)[:, :, ::-1]  # SMID stores BGR; the published loader reverses to RGB
    frame = np.ascontiguousarray(resize_linear(img, *size))
    try:
        write_frame(dst, frame)
    except OSError as exc:  # np.save's errors name no file; a short write ("N requested and M written") no errno
        code, why = exc.errno, exc.strerror or str(exc)
        if code is None and shutil.disk_usage(dst.parent).free < frame.nbytes:
            code, why = errno.ENOSPC, os.strerror(errno.ENOSPC)
        raise OutputWriteError(code, why, str(dst)) from exc


def _check_folders(lq: Path, gt: Path, out: Path) -> None:
    """--lq, --gt and --out must not overlap: the cache is never written into (or over) its inputs."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    lq_r, gt_r, out_r = lq.resolve(), gt.resolve(), out.resolve()
    if lq_r == gt_r:
        raise ValueError(f"--gt {gt} is the same folder as --lq {lq}: the ground truths live in their own tree "
                         "(SMID: SMID_Long_np next to SMID_LQ_np)")
    for flag, src in (("--lq", lq_r), ("--gt", gt_r)):
        # The cache writes out/lq, out/gt, out/.rebuild and out/manifest.json: none of them may lie in an input.
        if out_r.is_relative_to(src) or any(src.is_relative_to(out_r / sub) for sub in ("lq", "gt", REBUILD)):
            raise ValueError(f"--out {out} overlaps the input folder {flag} {src}: choose an output folder outside "
                             "the dataset")


def _check_size(w: int, h: int) -> None:
    if w < 1 or h < 1:
        raise ValueError(f"--resize W H must be two numbers >= 1, got {w} {h}")
    if w * h > MAX_RESIZE_PIXELS:
        raise ValueError(f"--resize {w} {h} is {w * h} pixels a frame; at most {MAX_RESIZE_PIXELS} (e.g. 8192 4096) "
                         "are supported (SMID is trained at 960 512)")


def _tasks(tree: Tree, root: Path) -> list[tuple[Path, Path]]:
    """(source, destination under `root`) of every file of the cache: each scene's GT, then its frames."""
    tasks: list[tuple[Path, Path]] = []
    for scene in tree.scenes:
        tasks.append((tree.gt_path(scene), root / "gt" / scene.name / scene.gt))
        tasks += [(tree.lq_path(scene, f), root / "lq" / scene.name / f) for f in scene.frames]
    return tasks


def _cached_size(out: Path, tasks: list[tuple[Path, Path]]) -> tuple[int, int] | None:
    """(w, h) of the frames of a cache already in `out`: from its manifest, else from a frame already written."""
    size = manifest_size(out)
    if size is not None:
        return size
    for _, dst in tasks:
        if dst.is_file():
            try:
                h, w, _ = check_npy_header(dst)
                return w, h
            except DataError:
                continue
    return None


def _switch(out: Path, staged: Path, doc: dict) -> Path:
    """Make the complete cache in `staged` the cache in `out`.

    The old manifest goes first: for the few renames that follow, `out` is an unfinished cache (refused by the
    loaders, finished by running prepare again), never a manifest of one size over frames of another."""
    (out / MANIFEST).unlink(missing_ok=True)
    replaced = out / REPLACED
    shutil.rmtree(replaced, ignore_errors=True)
    replaced.mkdir()
    for sub in ("lq", "gt"):
        if (out / sub).exists():
            os.rename(out / sub, replaced / sub)
        os.rename(staged / sub, out / sub)
    manifest = write_manifest(out, doc)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    return manifest


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
    another size in `out` is an error unless `overwrite`. An OSError while writing (a full disk) names the file
    and leaves the cache in `out` as usable as it was.
    """
    w, h = int(resize[0]), int(resize[1])
    _check_size(w, h)
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    lq, gt, out = Path(lq).expanduser(), Path(gt).expanduser(), Path(out).expanduser()
    _check_folders(lq, gt, out)
    tree = scan_tree(lq, gt)

    previous = _cached_size(out, _tasks(tree, out))
    rebuild = previous is not None and previous != (w, h)
    if rebuild and not overwrite:
        raise ValueError(f"--out {out} holds a cache of {previous[0]}x{previous[1]} frames; --resize {w} {h} "
                         f"would rewrite every frame: choose another --out, or pass --overwrite to rebuild it "
                         f"at {w}x{h}")
    target = out / REBUILD if rebuild else out
    tasks = _tasks(tree, target)
    shape = (h, w, 3)
    todo = [(s, d) for s, d in tasks if not _is_done(d, shape)]
    for src, _ in todo:  # every input before any output: a bad frame is reported with the cache untouched
        check_npy_header(src)

    # Left by interrupted runs: temporary files, a rebuild that is no longer wanted, a switch cut short.
    if not rebuild:
        shutil.rmtree(out / REBUILD, ignore_errors=True)
    shutil.rmtree(out / REPLACED, ignore_errors=True)
    for scene in tree.scenes:
        for sub in ("lq", "gt"):
            folder = target / sub / scene.name
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(f".*{TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)

    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="frame", desc="prepare",
               disable=not progress)
    workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(_convert, s, d, (w, h)) for s, d in todo}
        while futures:
            done, futures = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
                bar.update(1)
    except BaseException:
        # A failed frame or Ctrl-C (KeyboardInterrupt): no queued frame starts; the frames being written finish
        # (each is written atomically), so the cache holds whole frames and no temporary file.
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    pool.shutdown(wait=True)
    bar.close()

    doc = manifest_doc(tree, (w, h))
    manifest = _switch(out, target, doc) if rebuild else write_manifest(out, doc)
    return PrepareReport(written=len(todo), skipped=len(tasks) - len(todo), manifest=manifest,
                         replaced_size=previous if rebuild else None)


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
    except (DataError, ValueError) as exc:
        return fail(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        status = fail(f"{where}; the cache in {args.out} is as usable as before (frames finished so far are kept: "
                      "run prepare again to continue)")
        # The tools' rule (lfpv_fast.io.files): a write that fails during the work (a full disk) is status 1.
        return 1 if isinstance(exc, OutputWriteError) or exc.errno in (errno.ENOSPC, errno.EDQUOT) else status
    except KeyboardInterrupt:
        print(f"error: interrupted; the cache in {args.out} is as usable as before (frames finished so far are "
              "kept: run prepare again to continue)", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
    if report.replaced_size is not None:
        old_w, old_h = report.replaced_size
        print(f"rebuilt {args.out} at {args.resize[0]}x{args.resize[1]} (it held {old_w}x{old_h} frames)")
    print(f"{report.written} frames written, {report.skipped} already done; manifest: {report.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
