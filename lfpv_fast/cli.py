"""What the command-line tools (train, evaluate, enhance, prepare, app) share: one error convention, and the
start-up of the three inference tools.

A usage or input error prints one line, `error: <what is wrong, naming the flag, key, file or value>`, on
stderr and exits with status 2, before anything is written. Status 1 is left for failures during the work
(a non-finite loss, images that could not be enhanced).

The inference tools (enhance, evaluate, app) take their model flags from `add_inference_args` (--checkpoint,
--device, --backend, --precision, --compile; for the two that enhance image files also --tile, --tile-overlap,
--max-pixels, --max-memory, --max-image-size), so that a flag means the same in each, and start the same way:
`check_inference_flags` (the values alone), `inference_device` (device, precision and backend, before anything
is loaded), `load_inference_model` (the checkpoint, and the tile flags against the loaded model's alignment)
and `image_settings` (the flags as `ImageEnhancer` takes them).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from lfpv_fast.inference.enhancement import DEFAULT_OVERLAP, MEMORY_HEADROOM, alignment_rule, tile_problem
from lfpv_fast.inference.whole_image import PRECISIONS, check_precision
from lfpv_fast.io.imageio import DEFAULT_MAX_DECODED_BYTES
from lfpv_fast.models import LFPVNet, ModelConfig
from lfpv_fast.ops.backends import BACKENDS, require_backend
from lfpv_fast.training.checkpoint import load_model

# The longest error line printed: what a message quotes is cut where it is made (lfpv_fast.config.quote); this
# is the last guard, for a message that quotes something long that nobody cut (a path, a library's text).
MAX_ERROR_CHARS = 1000


def one_line(message: str) -> str:
    """The message on one line (line breaks become " | "), its middle cut when longer than MAX_ERROR_CHARS."""
    text = " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if len(text) <= MAX_ERROR_CHARS:
        return text
    head, tail = MAX_ERROR_CHARS * 3 // 4, MAX_ERROR_CHARS // 4
    return f"{text[:head]} [... {len(text) - head - tail} characters cut ...] {text[-tail:]}"


# Paths quoted in error messages are cut to this many characters (their start and their end are kept).
MAX_PATH_CHARS = 160


def cut_path(path: object) -> str:
    """A path for an error message: as given (undecodable bytes escaped), its middle cut when it is long."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # surrogates of a non-UTF-8 name
    if len(text) <= MAX_PATH_CHARS:
        return text
    return f"{text[:MAX_PATH_CHARS // 2]}...[{len(text)} characters]...{text[-MAX_PATH_CHARS // 3:]}"


def os_error_line(exc: OSError, what: str = "") -> str:
    """One line for an OSError about a file: `<what> <path>: <why>`, the path cut; a name too long for the file
    system says which limit it passed."""
    name = exc.filename if exc.filename is not None else ""
    shown = f"{what} {cut_path(name)}".strip()
    if exc.errno == errno.ENAMETOOLONG and name:
        text = os.fsdecode(name)
        longest = max((len(os.fsencode(part)) for part in text.split(os.sep)), default=0)
        return (f"{shown}: the name is too long for the file system ({len(os.fsencode(text))} bytes in all, "
                f"{longest} in its longest part; the usual limits are 4096 and 255)")
    return f"{shown}: {exc.strerror or exc}" if shown else one_line(str(exc))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's convention: a usage error is one `error:` line and status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, self.usage_error_line(message) + "\n")

    def usage_error_line(self, message: str) -> str:
        """The line `error` prints, for a tool that reports a usage error found later and returns its status."""
        return f"error: {one_line(message)} (see {self.prog} --help)"


def fail(message: str) -> int:
    """Print `error: message` on stderr, as one line of bounded length; returns the exit status of an input
    error, 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA if there is one), cpu, cuda, cuda:N. ValueError for a name that cannot be used here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name (expected auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible to torch {torch.__version__} here "
                             "(use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device


# ------------------------------------------------------------------------------------------------
# The inference tools' start-up (enhance, evaluate, app): one set of flags, one meaning, one load path.


def parse_size(text: str) -> int:
    """'6G', '512M', '1.5GiB', '2000000' -> bytes (binary units); the type of the memory-size flags."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size (e.g. 6G, 512M or a number of bytes)")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def _size_text(n: int) -> str:
    """A byte count as parse_size reads it back: 2G, 768M, or the number."""
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def add_inference_args(parser: argparse.ArgumentParser, *, images: bool, checkpoint_required: bool = True,
                       checkpoint_default_help: str = "",
                       max_image_size: int = DEFAULT_MAX_DECODED_BYTES, max_image_size_help: str = "") -> None:
    """The flags of the inference tools, spelled, typed and explained once.

    images: also the flags of the tools that enhance image files (enhance, app): --tile, --tile-overlap,
    --max-pixels, --max-memory, --max-image-size. checkpoint_required: False where the tool finds one itself
    (the app), saying how in checkpoint_default_help. max_image_size: the tool's default for --max-image-size,
    with why in max_image_size_help.
    """
    parser.add_argument("--checkpoint", required=checkpoint_required, default=None,
                        help="an lfpv_fast checkpoint (training or weights-only) or a published state dict (e.g. "
                             f"SMID.pth){checkpoint_default_help}")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="the ops the model runs: auto (the Triton kernels on CUDA, the CPU op set on a CPU; "
                             "lfpv_fast/ops/backends.py), reference (plain eager PyTorch), triton (the kernels; "
                             "refused, before anything is loaded, where they cannot run)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="bf16/fp16 autocast: on CUDA; on a CPU only where faster than fp32 (else refused)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the first images are slow)")
    if not images:
        return
    parser.add_argument("--tile", type=int, default=None,
                        help="always enhance in tiles of this side in pixels: a positive multiple of the model's "
                             "alignment (checked once the model is loaded: 16 for the published model, 32 for "
                             "SNR-Aware with token_size 8); default: the whole image when its estimated peak memory "
                             "fits, tiles otherwise")
    parser.add_argument("--tile-overlap", type=int, default=None,
                        help=f"minimum tile overlap in pixels (default: {DEFAULT_OVERLAP}, at most half a tile)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="tile images with more pixels than this (default: none; an image is tiled only when "
                             "it does not fit memory)")
    parser.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                        help="memory the whole-image path may use, e.g. 6G or 512M (default: "
                             f"{MEMORY_HEADROOM:.0%}% of the device's free memory); larger images are tiled")
    parser.add_argument("--max-image-size", type=parse_size, default=max_image_size, metavar="SIZE",
                        help="largest image accepted, as the memory reading it takes (its decoded samples, width x "
                             "height x samples x bytes per sample, plus its float32 RGB copy, 12 bytes a pixel, and "
                             "the RGB copy of a gray image), checked from the file's header before decoding "
                             f"(default: {_size_text(max_image_size)}{max_image_size_help})")


def check_inference_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The inference flags' values alone (a usage error, status 2); --tile against the model comes once it is
    loaded (load_inference_model)."""
    if getattr(args, "tile", None) is not None and args.tile < 1:
        parser.error(f"--tile must be a positive multiple of the model's alignment, got {args.tile}")
    if getattr(args, "tile_overlap", None) is not None and args.tile_overlap < 0:
        parser.error(f"--tile-overlap must be >= 0, got {args.tile_overlap}")
    if getattr(args, "max_pixels", None) is not None and args.max_pixels < 1:
        parser.error(f"--max-pixels must be >= 1, got {args.max_pixels}")


def inference_device(args: argparse.Namespace) -> torch.device:
    """--device, --precision and --backend, checked together before anything is loaded: the device, or a
    ValueError naming the flag that cannot be used here (e.g. --backend triton on a CPU without the interpreter)."""
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    require_backend(args.backend, device)
    return device


def load_inference_model(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         checkpoint: str | Path | None = None, config: ModelConfig | None = None,
                         loaded: dict | None = None) -> LFPVNet:
    """The model of `checkpoint` (default --checkpoint) for --backend; `config` describes a published checkpoint
    (it carries none; default: the SMID model); `loaded`: the file's contents where the caller has read it
    already (read once). With the image flags, --tile and --tile-overlap are checked against the loaded model's
    alignment (`enhancement.tile_problem`, the one tile rule).

    ValueError or FileNotFoundError (OSError for a file that cannot be read) saying what is wrong."""
    net = load_model(args.checkpoint if checkpoint is None else checkpoint, backend=args.backend, config=config,
                     loaded=loaded)
    if hasattr(args, "tile"):
        problem = tile_problem(args.tile, args.tile_overlap, net.align, alignment_rule(net))
        if problem is not None:
            raise ValueError(f"{problem} (see {parser.prog} --help)")
    return net


def image_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The image flags as `ImageEnhancer` (lfpv_fast.inference.enhancement) takes them, the same in each tool."""
    return {"tile": args.tile, "overlap": args.tile_overlap, "max_pixels": args.max_pixels,
            "max_memory": args.max_memory, "precision": args.precision, "compile": args.compile,
            "max_decoded_bytes": args.max_image_size}
