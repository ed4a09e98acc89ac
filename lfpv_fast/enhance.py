"""Enhance low-light images with a trained LFPV model.

    python -m lfpv_fast.enhance INPUT... --checkpoint PATH -o OUTDIR [options]

INPUT: image files (PNG, JPEG, TIFF) or folders of them (--recursive for subfolders). Each result
is written to OUTDIR under the input's file name (inside a folder input: its path relative to that
folder), in the input's format and bit depth: 16-bit PNG/TIFF stay 16-bit.

- Grayscale images are enhanced as RGB (the gray channel replicated) and written as RGB.
- An alpha channel is set aside, the colour is enhanced, and the alpha is written back unchanged.
- The SNR map is computed from each input image, as the published test does.
- Sizes down to the model's alignment (16x16 for the published model); the model aligns sizes
  internally; the output has the input's size.
- Never overwrites an input: an output path that is an input file is an error (nothing is written).
- An output folder inside an input folder is refused unless --allow-output-inside-input (files under
  it are then never taken as inputs). Existing outputs are skipped unless --overwrite.
- A side-by-side file records which output it belongs to: one left by an earlier call for another input
  (`a.png`, then `a.jpg`, share `a_side_by_side.png`) is an error, as two such inputs in one call are.
- Whole images, exactly: the whole image goes through the model at once (the transformer attends
  over all of it, as the published model does), with the full-resolution stages run in strips so
  that peak memory stays about 350 bytes per pixel with a memory-linear attention (backend "auto";
  see lfpv_fast/inference/whole_image.py). This is chosen whenever the estimated peak fits the device's free
  memory (or --max-memory); otherwise, or with --tile or above --max-pixels, the image is enhanced in
  overlapping tiles (see `enhance_image`), which changes the result slightly. Each image's choice is
  printed.
- --precision bf16/fp16 (autocast; on the CPU only where it is faster than fp32) and --compile.
- Checked before anything is written: the flags, the checkpoint (even when every output exists already)
  and the header of every image to enhance (supported, within --max-image-size once decoded, at least
  the model's alignment on each side). Exit status (the tools' convention, lfpv_fast.cli): 2 for an input
  error (a bad flag, checkpoint or image, also an image found damaged only while decoding: the others are
  still enhanced), 1 when enhancing or writing failed (out of memory; a full disk stops the run with one
  error line, the outputs written before it kept), 0 otherwise.
- The model flags (--checkpoint, --device, --backend, --precision, --compile, the tile and size flags) are
  the app's and, for the first five, evaluate's: one definition, lfpv_fast.cli.add_inference_args.

The Python API (`enhance_image`, `plan_enhancement`, `ImageEnhancer`) is in lfpv_fast.inference.enhancement.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lfpv_fast.cli import (  # noqa: F401  (parse_size: its old home)
    ArgumentParser,
    add_inference_args,
    check_inference_flags,
    fail,
    image_settings,
    inference_device,
    load_inference_model,
    one_line,
    os_error_line,
    parse_size,
)
from lfpv_fast.inference.enhancement import (  # noqa: F401  (enhance_image, plan_enhancement, EnhancePlan: the API's old home)
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    MEMORY_HEADROOM,
    EnhancePlan,
    ImageEnhancer,
    enhance_image,
    plan_enhancement,
)
from lfpv_fast.io.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    LoadedImage,
    list_images,
    to_integer,
    write_bytes_atomic,
)

SIDE_BY_SIDE_SUFFIX = "_side_by_side.png"
# PNG text key of a side-by-side file: the output (relative to the output folder) it shows.
SIDE_BY_SIDE_KEY = "lfpv_fast.side_by_side_of"
# Errors of a write that no later write in the same folder can avoid: the run stops there.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lfpv_fast.enhance",
        description="Enhance low-light images with an LFPV model (our checkpoints or the published SMID.pth).",
        epilog="Grayscale inputs are enhanced as RGB (channel replicated) and written as RGB; an alpha channel "
               "is kept unchanged; 16-bit PNG/TIFF stay 16-bit. Inputs are never overwritten. Supported: "
               + ", ".join(IMAGE_EXTENSIONS),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--recursive", action="store_true", help="also enhance images in subfolders of folder inputs")
    parser.add_argument("--batch-size", type=int, default=1, help="images of the same size run together (and tiles)")
    add_inference_args(parser, images=True)  # the flags shared with evaluate and the app (lfpv_fast.cli)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--side-by-side", action="store_true",
                        help=f"also write an 8-bit PNG 'input | output' as NAME{SIDE_BY_SIDE_SUFFIX}")
    parser.add_argument("--allow-output-inside-input", action="store_true",
                        help="allow an output folder inside an input folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")
    return parser


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    check_inference_flags(parser, args)
    return parser, args


@dataclass
class Job:
    """One input image and the files it is enhanced into (None: not to be written)."""

    input: Path
    output: Path | None
    side: Path | None  # the side-by-side file
    side_owner: str  # what the side-by-side file records: the output's path relative to the output folder


def plan_outputs(args: argparse.Namespace) -> list[Job]:
    """A Job per input image, after every safety check (ValueError or FileNotFoundError saying what is wrong)."""
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder")
    out_resolved = out_dir.resolve()
    input_dirs = [Path(p) for p in args.inputs if Path(p).is_dir()]
    for folder in input_dirs:
        if out_resolved.is_relative_to(folder.resolve()) and not args.allow_output_inside_input:
            raise ValueError(f"output folder {out_dir} is inside input folder {folder}; choose another output "
                             "folder or pass --allow-output-inside-input")
    # An output folder strictly inside an input folder (allowed above) is not searched for inputs.
    inside = any(out_resolved != f.resolve() and out_resolved.is_relative_to(f.resolve()) for f in input_dirs)
    images = list_images(args.inputs, recursive=args.recursive, exclude=[out_dir] if inside else None)
    if not images:
        raise ValueError(f"no images found in {', '.join(args.inputs)} (supported: {', '.join(IMAGE_EXTENSIONS)})")

    # The same file named twice (or a file and its folder) is enhanced once.
    unique: dict[Path, tuple[Path, Path]] = {}
    for path, relative in images:
        unique.setdefault(path.resolve(), (path, relative))
    images = list(unique.values())
    inputs = {resolved: path for resolved, (path, _) in unique.items()}
    # Also compare file identities: a hard link or a differently spelled path to an input is the input.
    identities = {(st.st_dev, st.st_ino): path for path in inputs.values() for st in [os.stat(path)]}
    jobs: list[Job] = []
    claimed: dict[Path, Path] = {}
    for path, relative in images:
        output = out_dir / relative
        side = output.with_name(output.stem + SIDE_BY_SIDE_SUFFIX) if args.side_by_side else None
        for target in (output, side):
            if target is None:
                continue
            resolved = target.resolve()
            same = inputs.get(resolved)
            if same is None and target.exists():
                st = os.stat(target)
                same = identities.get((st.st_dev, st.st_ino))
            if same is not None:
                raise ValueError(f"refusing to overwrite input {same}: it is also the output for {path}; "
                                 "choose another output folder")
            if resolved in claimed:
                raise ValueError(f"{path} and {claimed[resolved]} would both be written to {target}; "
                                 "enhance them into different output folders")
            claimed[resolved] = path
        owner = side_by_side_owner(side) if side is not None and not args.overwrite else None
        if owner is not None and owner != owner_text(relative.as_posix()):
            raise ValueError(f"{path} would write its side-by-side to {side}, which holds the side-by-side of "
                             f"{owner} from an earlier call; enhance them into different output folders (or pass "
                             "--overwrite to replace it)")
        jobs.append(Job(path, output, side, relative.as_posix()))
    return jobs


def _side_by_side(image: LoadedImage, enhanced: torch.Tensor) -> np.ndarray:
    """(H, 2W, 3) float: the input (as RGB, alpha ignored) left of the output."""
    return np.concatenate([image.rgb, enhanced.permute(1, 2, 0).float().numpy()], axis=1)


def write_side_by_side(path: Path, pixels: np.ndarray, output: str) -> None:
    """An 8-bit PNG that records (SIDE_BY_SIDE_KEY) the output it belongs to, relative to the output folder."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(SIDE_BY_SIDE_KEY, owner_text(output))
    buffer = io.BytesIO()
    Image.fromarray(to_integer(pixels, 8)).save(buffer, format="PNG", pnginfo=info)
    write_bytes_atomic(path, buffer.getvalue())


def owner_text(output: str) -> str:
    """What a side-by-side file records for `output`: the name as text that PNG can hold (a file name that is not
    UTF-8 reaches Python with surrogates, which no encoding takes; they are written as \\udcXX escapes)."""
    return output.encode("utf-8", "backslashreplace").decode("utf-8")


def side_by_side_owner(path: Path) -> str | None:
    """The output a side-by-side file belongs to; None if there is no such file or it does not say."""
    from PIL import Image

    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get(SIDE_BY_SIDE_KEY)
    except (OSError, ValueError):
        return None


def _still_to_write(jobs: list[Job], overwrite: bool, note: Callable[[str], None]) -> list[Job]:
    """The jobs with a file left to write: existing outputs are kept (and skipped) unless --overwrite."""
    todo = []
    for job in jobs:
        keep = [t for t in (job.output, job.side) if t is not None and t.exists() and not overwrite]
        if keep and len(keep) == (1 if job.side is None else 2):
            note(f"skip {job.input}: {job.output} exists (--overwrite replaces it)")
            continue
        todo.append(Job(job.input, None if job.output in keep else job.output,
                        None if job.side in keep else job.side, job.side_owner))
    return todo


class DiskFullError(OSError):
    """A write failed for want of space: later writes would fail too, so the run stops."""


@dataclass
class Tally:
    done: int = 0
    unreadable: int = 0  # input errors found while decoding
    failed: int = 0  # enhancement or writing failed

    def exit_status(self) -> int:
        """The tools' convention: 2 for an input error, 1 for a failure during the work, else 0."""
        return 2 if self.unreadable else 1 if self.failed else 0


def _error(message: str) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)


def _enhance_batch(enhancer: ImageEnhancer, batch: list[tuple[LoadedImage, Job]], plan: EnhancePlan,
                   tally: Tally, note: Callable[[str], None]) -> None:
    """Enhance images of one size as planned and write their files; failures are reported and counted."""
    if not batch:
        return
    height, width = batch[0][0].size
    note(f"{', '.join(str(image.path) for image, _ in batch)} ({height}x{width}): {plan.describe()}")
    try:
        results = enhancer.enhance([image for image, _ in batch], plan)
    except (RuntimeError, ValueError) as exc:  # e.g. out of memory: report, go on with the next images
        for image, _ in batch:
            _error(f"{image.path}: enhancement failed ({height}x{width}): {exc}")
        tally.failed += len(batch)
        return
    for (image, job), result in zip(batch, results, strict=True):
        target = job.output
        try:
            if job.output is not None:
                enhancer.write(job.output, image, result)
            if job.side is not None:
                target = job.side
                write_side_by_side(job.side, _side_by_side(image, result), job.side_owner)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise DiskFullError(exc.errno, f"{target}: could not write the result: {exc.strerror} (the run "
                                    f"stopped; {tally.done} image(s) written before are complete; free some space "
                                    "and run again: existing outputs are skipped)") from exc
            _error(f"{image.path}: could not write the result: {exc}")
            tally.failed += 1
            continue
        except ValueError as exc:
            _error(f"{image.path}: could not write the result: {exc}")
            tally.failed += 1
            continue
        tally.done += 1


def _enhance_all(enhancer: ImageEnhancer, todo: list[Job], quiet: bool, note: Callable[[str], None]) -> Tally:
    """Read each image, gather images of one size into batches of --batch-size, enhance and write them.

    Each image is planned once, with the batch it joins: a tiled image runs alone (its tiles fill the batch).
    """
    from tqdm import tqdm

    tally = Tally()
    batch: list[tuple[LoadedImage, Job]] = []
    plan: EnhancePlan | None = None
    for job in tqdm(todo, desc="enhance", unit="img", disable=quiet or None):
        try:
            image = enhancer.read(job.input)
        except (ImageReadError, FileNotFoundError) as exc:  # damaged past its header, or gone since the check
            _error(str(exc))
            tally.unreadable += 1
            continue
        if image.source_mode.startswith("gray"):
            note(f"note: {job.input} is grayscale: enhanced as RGB (channel replicated), written as RGB")
        if image.alpha is not None:
            note(f"note: {job.input} has an alpha channel: kept unchanged in the output")
        if batch and (batch[0][0].size != image.size or len(batch) >= enhancer.batch_size):
            _enhance_batch(enhancer, batch, plan, tally, note)
            batch = []
        batch.append((image, job))
        plan = enhancer.plan(len(batch), *image.size)
        if plan.tiled:
            _enhance_batch(enhancer, batch, plan, tally, note)
            batch = []
    if batch:
        _enhance_batch(enhancer, batch, plan, tally, note)
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C: every output is written atomically, so what is there is whole; say so in one line.
        print("error: interrupted; the outputs written so far are complete, no partial file is left",
              file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _main(argv: Sequence[str] | None) -> int:
    from tqdm import tqdm

    parser, args = _parse_args(argv)
    try:
        device = inference_device(args)
        jobs = plan_outputs(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))  # exits with status 2
    except OSError as exc:  # a name too long for the file system, a folder that cannot be read
        parser.error(os_error_line(exc))

    def note(message: str) -> None:
        if not args.quiet:
            tqdm.write(message, file=sys.stderr)

    # The checkpoint before anything else: a bad one is an error even when every output exists already.
    try:
        net = load_inference_model(parser, args)
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(os_error_line(exc, "checkpoint"))
    enhancer = ImageEnhancer(net, device, batch_size=args.batch_size, **image_settings(args))
    if enhancer.note is not None:
        note(enhancer.note)

    todo = _still_to_write(jobs, args.overwrite, note)
    if not todo:
        note(f"nothing to do: {len(jobs)} outputs already exist in {args.output}")
        return 0
    # Every image's header before anything is written: a file that is not a supported image, too large to
    # decode or too small is an input error (one line each), and nothing is enhanced.
    problems = []
    for job in todo:
        try:
            enhancer.check(job.input)
        except (ImageReadError, FileNotFoundError) as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(os_error_line(exc, "image"))
    if problems:
        for message in problems:
            _error(message)
        return 2

    try:
        tally = _enhance_all(enhancer, todo, args.quiet, note)
    except DiskFullError as exc:
        _error(exc.strerror)
        return 1
    note(f"enhanced {tally.done}, skipped {len(jobs) - len(todo)}, failed {tally.failed + tally.unreadable}; "
         f"outputs in {args.output}")
    return tally.exit_status()


if __name__ == "__main__":
    sys.exit(main())
