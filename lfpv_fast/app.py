"""A local web page for enhancing photos with an LFPV model.

    python -m lfpv_fast.app --checkpoint runs/<run>/final_weights.pth      (console script: lfpv-app)

Upload one or several images (PNG, JPEG, TIFF; 8 and 16 bit; grayscale and RGBA), compare before and
after with a slider, and download each result at full resolution in the input's format and bit depth.
The work is `lfpv_fast.enhance`'s: the same pipeline (`lfpv_fast.inference.enhancement.ImageEnhancer`: header
check, reader, plan, `enhance_image`, writer; whole image when it fits, tiles otherwise; the page says which).

- Offline: no analytics, no share link, no monitoring or MCP endpoints, no run history; the page's
  front end, fonts included, is served by this process (Gradio's bundled assets).
- Binds to 127.0.0.1 unless --host says otherwise (then a warning: the page has no login).
- One enhancement at a time per process (a queue of --max-queue waiting requests; the page shows the
  position), so that two users do not run the device out of memory.
- Bad input (not an image, truncated, over --max-image-size, too many files at once) gets a message on
  the page and a one-line note in the log; the server goes on serving.
- The model flags (--checkpoint, --device, --backend, --precision, --compile, --tile, --tile-overlap,
  --max-pixels, --max-memory, --max-image-size) are `enhance`'s, with its meanings
  (lfpv_fast.cli.add_inference_args); only the default of --max-image-size differs.
- Results live in a work folder inside Gradio's upload folder (so Gradio serves them from there rather than
  copying them into its cache): a session's results are deleted when its next request succeeds and when
  its page is closed, and the folder is kept within --max-work-mb and --max-work-files (oldest first).
- The address is resolved and bound before "serving ..." is printed: a port in use, a host that does not
  resolve and one that is not an address of this machine are each one `error:` line, exit status 2.

Gradio is an optional extra: pip install 'lfpv_fast[app]'.
"""

from __future__ import annotations

import argparse
import errno
import html
import io
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfpv_fast.cli import (
    ArgumentParser,
    add_inference_args,
    check_inference_flags,
    cut_path,
    image_settings,
    inference_device,
    load_inference_model,
    one_line,
    os_error_line,
)
from lfpv_fast.inference.enhancement import ImageEnhancer
from lfpv_fast.io.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ImageTooLargeError,
    to_integer,
    write_bytes_atomic,
)
from lfpv_fast.models import LFPVNet
from lfpv_fast.ops.backends import resolve_backend
from lfpv_fast.training.run_folder import FINAL_WEIGHTS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_RUNS = "runs"
WEIGHTS_NAME = FINAL_WEIGHTS  # what a training run exports
# Largest image accepted by default (--max-image-size: the memory reading it takes, ImageInfo.read_peak_bytes): 840 MiB
# takes every 8- or 16-bit image of 40 MP (an 8000x5000 photo; at most 22 bytes a pixel, 16-bit gray with alpha), as
# the app's old refusal above 40 MP did, and 8-bit RGB up to 58 MP; far below Pillow's decompression-bomb limit.
DEFAULT_MAX_IMAGE_SIZE = 840 * 2**20
DEFAULT_MAX_FILES = 16
DEFAULT_MAX_QUEUE = 8
DEFAULT_MAX_UPLOAD_MB = 200
# The previews shown in the browser are scaled down to this longest side; downloads are always full size.
PREVIEW_MAX_SIDE = 2048
# Characters of an upload's name kept in the names of its outputs (photo_enhanced.png, photo_before.png, ...).
MAX_STEM_CHARS = 100
# The work folder's bounds: results of older requests are deleted beyond them (oldest first).
DEFAULT_MAX_WORK_MB = 1024
DEFAULT_MAX_WORK_FILES = 500

log = logging.getLogger("lfpv_fast.app")


class InputError(ValueError):
    """An upload that cannot be enhanced; the message names the file and says what was expected."""


@dataclass
class EnhancedFile:
    """One enhanced upload: where its files are and what the page says about it."""

    name: str
    height: int
    width: int
    bit_depth: int
    source_mode: str
    tile: int | None  # tile side used, None for the whole image at once
    seconds: float
    output: Path  # full resolution, the input's format and bit depth
    before_preview: Path  # 8-bit PNGs for the comparison slider
    after_preview: Path
    preview_scaled: bool


def find_newest_weights(runs: str | Path) -> Path | None:
    """The most recently written final_weights.pth under `runs` (any depth), or None."""
    runs = Path(runs)
    if not runs.is_dir():
        return None
    found = [p for p in runs.rglob(WEIGHTS_NAME) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _describe_network(cfg) -> str:
    """The backbone in a few words, and whether it carries LFPVs."""
    if cfg.backbone == "snr_aware":
        network = f"nf {cfg.nf}, {cfg.layers} transformer layers"
    else:
        network = f"backbone {cfg.backbone}"
    return network + ("" if cfg.lfpv.enabled else ", no LFPVs")


class Enhancer:
    """A loaded model and the rules of this server; `enhance_file` turns one upload into an EnhancedFile."""

    def __init__(self, net: LFPVNet, checkpoint: Path, device: torch.device, *, tile: int | None = None,
                 overlap: int | None = None, precision: str = "fp32", max_pixels: int | None = None,
                 max_memory: int | None = None, compile: bool = False,
                 max_decoded_bytes: int | None = DEFAULT_MAX_IMAGE_SIZE) -> None:
        """The settings are `ImageEnhancer`'s (lfpv_fast.cli.image_settings maps the flags to them): max_pixels
        tiles larger images, max_decoded_bytes (--max-image-size) refuses them."""
        # batch_size=1 as the enhance CLI's default: one tile at a time keeps the peak memory lowest.
        self.pipeline = ImageEnhancer(net, device, tile=tile, overlap=overlap, batch_size=1, precision=precision,
                                      max_pixels=max_pixels, max_memory=max_memory, compile=compile,
                                      max_decoded_bytes=max_decoded_bytes)
        self.checkpoint = checkpoint
        self.device = device
        self.max_decoded_bytes = max_decoded_bytes
        self.tile = tile
        self.overlap = overlap
        self.autocast = precision  # "fp32", or "bf16"/"fp16" autocast as enhance --precision

    @property
    def net(self) -> LFPVNet:
        return self.pipeline.net

    @property
    def model_name(self) -> str:
        """The checkpoint's run folder and file name: what a user recognises."""
        return f"{self.checkpoint.parent.name}/{self.checkpoint.name}" if self.checkpoint.parent.name else \
            self.checkpoint.name

    @property
    def precision(self) -> str:
        weights = str(next(self.net.parameters()).dtype).removeprefix("torch.")
        return weights if self.autocast == "fp32" else f"{self.autocast} autocast ({weights} weights)"

    @property
    def backend_description(self) -> str:
        """The requested backend and the ops it resolves to on this device."""
        resolved = resolve_backend(self.net.backend, self.device)
        if resolved.name is None:  # e.g. triton asked for on a CPU
            return f"{self.net.backend} (unavailable: {resolved.reason})"
        return f"{self.net.backend} ({resolved.ops.__name__})"

    def summary_markdown(self) -> str:
        cfg = self.net.config
        params = sum(p.numel() for p in self.net.parameters())
        tiling = (_processed_as(self.tile) if self.tile is not None else
                  "whole image when its estimated peak memory fits the device's free memory, tiles otherwise"
                  if self.pipeline.note is None else "whole image, untiled (refused when it would not fit memory)")
        limit = ("no size limit" if self.max_decoded_bytes is None else
                 f"images taking up to {self.max_decoded_bytes / 2**20:.0f} MiB to read, --max-image-size "
                 f"(about {self.max_decoded_bytes / 22e6:.0f} MP of any 8- or 16-bit image)")
        return (f"**Model** `{_escape(self.model_name)}` ({params / 1e6:.2f} M parameters, {_describe_network(cfg)})"
                f" · **Device** {_escape(describe_device(self.device))} · "
                f"**Precision** {self.precision} · **Backend** {self.backend_description} · **Inference** {tiling} · "
                f"**Limits** {limit}")

    def enhance_file(self, path: Path, name: str, out_dir: Path,
                     on_start: Callable[[str], None] | None = None) -> EnhancedFile:
        """Read, check, enhance and write one upload. Bad input raises InputError naming `name`.

        on_start: called with a line such as "photo.png: 4000x3000, tiles of 1024x1024 px" once the
        image is read and its plan known (for a progress display).
        """
        suffix = path.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            raise InputError(f"{name}: not a supported image type {suffix or '(no extension)'!r} "
                             f"(expected PNG, JPEG or TIFF: {', '.join(IMAGE_EXTENSIONS)})")
        try:
            # The header first (nothing decoded): this server's --max-image-size and the model's minimum size.
            self.pipeline.check(path)
            image = self.pipeline.read(path)
        except ImageTooLargeError as exc:
            message = str(exc).replace(str(path), name)
            raise InputError(f"{message} (this server's --max-image-size)") from exc
        except (ImageReadError, FileNotFoundError) as exc:
            # The readers name the server's temporary path; the user knows the file by its own name.
            raise InputError(str(exc).replace(str(path), name)) from exc
        height, width = image.size

        # The enhance CLI's decision: the whole image when its estimated peak fits free memory, else tiles.
        plan = self.pipeline.plan(1, height, width)
        tile = plan.tile if plan.tiled else None
        if on_start is not None:
            on_start(f"{name}: {width}x{height}, {_processed_as(tile)}")
        start = time.perf_counter()
        result = self.pipeline.enhance([image], plan)[0]  # on the CPU: the device's work is finished
        seconds = time.perf_counter() - start

        stem = Path(name).stem[:MAX_STEM_CHARS]  # room for the suffixes below within the file system's 255 bytes
        output = out_dir / f"{stem}_enhanced{suffix}"
        self.pipeline.write(output, image, result)
        before, after = out_dir / f"{stem}_before.png", out_dir / f"{stem}_after.png"
        scaled = _write_preview(before, image.rgb)
        _write_preview(after, result.permute(1, 2, 0).numpy())
        return EnhancedFile(name=name, height=height, width=width, bit_depth=image.bit_depth,
                            source_mode=image.source_mode, tile=tile, seconds=seconds, output=output,
                            before_preview=before, after_preview=after, preview_scaled=scaled)


def _write_preview(path: Path, rgb: np.ndarray) -> bool:
    """An 8-bit PNG for the browser, scaled to PREVIEW_MAX_SIDE at most; True when it was scaled down."""
    from PIL import Image

    image = Image.fromarray(to_integer(rgb, 8))
    scale = PREVIEW_MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return scale < 1


def _escape(text: str) -> str:
    """User-given text (file names) for Markdown and Gradio's HTML messages: shown as typed, never as markup."""
    return html.escape(text, quote=False).replace("|", "\\|")


def _processed_as(tile: int | None) -> str:
    return "whole image" if tile is None else f"tiles of {tile}x{tile} px"


def _mode_note(mode: str) -> str:
    return {"rgb": "RGB", "rgba": "RGBA (alpha kept)", "gray": "grayscale (enhanced as RGB)",
            "gray+alpha": "grayscale + alpha (enhanced as RGB, alpha kept)"}.get(mode, mode)


def report_markdown(done: list[EnhancedFile], errors: list[str], enhancer: Enhancer) -> str:
    """The results table shown under the comparison."""
    lines = []
    if done:
        total = sum(item.seconds for item in done)
        lines += [f"Enhanced {len(done)} image(s) in {total:.2f} s on {_escape(describe_device(enhancer.device))}, "
                  f"{enhancer.precision}, model `{_escape(enhancer.model_name)}`.", "",
                  "| file | size | bit depth | colour | processed as | time |", "| --- | --- | --- | --- | --- | --- |"]
        for item in done:
            size = f"{item.width}x{item.height}" + (" (preview scaled down)" if item.preview_scaled else "")
            lines.append(f"| {_escape(item.name)} | {size} | {item.bit_depth} | {_mode_note(item.source_mode)} | "
                         f"{_processed_as(item.tile)} | {item.seconds:.2f} s |")
    if errors:
        lines += ["", f"**{len(errors)} file(s) not enhanced:**", ""]
        lines += [f"- {_escape(message)}" for message in errors]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The page.


def import_gradio() -> Any:
    """Gradio, with its telemetry switched off before it is imported (it reads the variable on import)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio

    return gradio


class WorkFolder:
    """Where the page's results wait to be downloaded: a folder per request, bounded in size and file count.

    A session's results are deleted once superseded (its next request succeeded: the page shows only the new
    ones) and when the session ends (its page was closed); whenever the request folders together hold more
    than `max_bytes` or `max_files`, the oldest are deleted first, except the newest request's own. Gradio
    serves the files from here when the folder is inside its upload folder (it copies files from anywhere
    else into its cache, where they would stay for a day).
    """

    def __init__(self, root: Path, max_bytes: int, max_files: int) -> None:
        self.root = root
        self.max_bytes, self.max_files = max_bytes, max_files
        self._by_session: dict[str, Path] = {}
        self._lock = threading.Lock()  # requests run one at a time, but sessions end concurrently

    def new_request(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.root))

    def finished(self, session: str | None, folder: Path) -> None:
        """`folder` holds the results now on the session's page: the session's previous ones go, then the bounds."""
        with self._lock:
            if session is not None:
                previous = self._by_session.get(session)
                self._by_session[session] = folder
                if previous is not None and previous != folder:
                    _remove(previous)
            self._enforce_bounds(keep=folder)

    def discard(self, folder: Path) -> None:
        """A request that produced nothing to show."""
        _remove(folder)

    def end_session(self, session: str | None) -> None:
        with self._lock:
            folder = self._by_session.pop(session, None) if session is not None else None
            if folder is not None:
                _remove(folder)

    def usage(self) -> tuple[int, int]:
        """(bytes, files) under the work folder now."""
        sizes = [size for _, folder_sizes in self._requests() for size in folder_sizes]
        return sum(sizes), len(sizes)

    def _requests(self) -> list[tuple[Path, list[int]]]:
        """Request folders, oldest first, with the sizes of their files."""
        found = []
        for folder in self.root.iterdir():
            try:
                sizes = [f.stat().st_size for f in folder.rglob("*") if f.is_file()]
                found.append((folder.stat().st_mtime, folder, sizes))
            except OSError:  # removed concurrently
                continue
        return [(folder, sizes) for _, folder, sizes in sorted(found, key=lambda item: (item[0], item[1].name))]

    def _enforce_bounds(self, keep: Path) -> None:
        requests = self._requests()
        total = sum(sum(sizes) for _, sizes in requests)
        files = sum(len(sizes) for _, sizes in requests)
        for folder, sizes in requests:
            if total <= self.max_bytes and files <= self.max_files:
                break
            if folder == keep:
                continue
            _remove(folder)
            total, files = total - sum(sizes), files - len(sizes)
            for session, held in list(self._by_session.items()):
                if held == folder:
                    del self._by_session[session]
            log.info("work folder over its bounds: deleted the results in %s", folder.name)


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _injects_request(fn: Callable[..., Any], gr: Any) -> Callable[..., Any]:
    """Gradio passes the request (its session) to a parameter annotated gr.Request; this module's postponed
    annotations are strings that it cannot resolve (gradio is imported late), so give it the class itself."""
    fn.__annotations__["request"] = gr.Request
    return fn


def build_demo(enhancer: Enhancer, work: WorkFolder, *, max_files: int = DEFAULT_MAX_FILES,
               max_queue: int = DEFAULT_MAX_QUEUE) -> Any:
    """The Gradio Blocks of the page, its queue set up (one enhancement at a time on this device)."""
    gr = import_gradio()

    def failed(message: str) -> Exception:
        return gr.Error(_escape(message), duration=None, print_exception=False)  # stays until closed

    def enhance(files: list[str] | None, request: gr.Request,
                progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
        if not files:
            raise failed("Upload one or more images first (PNG, JPEG or TIFF).")
        if len(files) > max_files:
            log.warning("refused a request with %d files (--max-files %d)", len(files), max_files)
            raise failed(f"{len(files)} files at once is more than this server takes ({max_files}, --max-files); "
                         "upload them in smaller groups.")
        out_dir = work.new_request()
        done: list[EnhancedFile] = []
        errors: list[str] = []
        seen: dict[str, int] = {}
        for index, file in enumerate(files):
            path = Path(file)
            # Two uploads of the same name (from different folders) get distinct results: photo.png, photo_2.png.
            seen[path.name] = count = seen.get(path.name, 0) + 1
            name = path.name if count == 1 else f"{path.stem}_{count}{path.suffix}"
            progress((index, len(files)), desc=f"reading {name}", unit="images")

            def started(plan: str, index: int = index) -> None:
                progress((index, len(files)), desc=f"enhancing {plan}", unit="images")

            try:
                file_dir = out_dir / str(index)  # photo.png and photo.jpg both have a photo_before.png
                file_dir.mkdir()
                done.append(enhancer.enhance_file(path, name, file_dir, on_start=started))
            except InputError as exc:
                errors.append(str(exc))
            except OSError as exc:  # a full disk, a name too long to write: say so (the path cut), keep serving
                errors.append(f"{cut_path(name)}: enhancement failed: {os_error_line(exc)}")
            except (RuntimeError, ValueError) as exc:  # out of memory: say so, keep serving
                errors.append(f"{cut_path(name)}: enhancement failed: {one_line(str(exc))}")
        for message in errors:
            log.warning("error: %s", message)
        if not done:
            work.discard(out_dir)  # the page keeps showing the session's previous results
            raise failed(" / ".join(errors))
        work.finished(getattr(request, "session_hash", None), out_dir)
        for message in errors:
            gr.Warning(_escape(message))
        for item in done:
            log.info("enhanced %s (%dx%d, %s) in %.2f s", item.name, item.width, item.height,
                     _processed_as(item.tile), item.seconds)
        pairs = {item.name: (str(item.before_preview), str(item.after_preview)) for item in done}
        first = done[0].name
        return (pairs[first], [str(item.output) for item in done], report_markdown(done, errors, enhancer),
                gr.Dropdown(choices=list(pairs), value=first, visible=len(pairs) > 1), pairs)

    def show(name: str | None, pairs: dict[str, tuple[str, str]] | None) -> Any:
        if not pairs or name not in pairs:
            return gr.skip()
        return pairs[name]

    with gr.Blocks(title="lfpv_fast: low-light enhancement", analytics_enabled=False,
                   delete_cache=(1800, 86400)) as demo:
        gr.Markdown("# Low-light enhancement (LFPV)\nUpload dark photos (PNG, JPEG or TIFF; 8 or 16 bit; "
                    f"up to {max_files} at once), press **Enhance**, compare before and after with the slider, "
                    "download the results at full resolution in their own format and bit depth.")
        gr.Markdown(enhancer.summary_markdown(), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1):
                uploads = gr.File(label="Images (PNG, JPEG, TIFF)", file_count="multiple", elem_id="uploads")
                button = gr.Button("Enhance", variant="primary", elem_id="enhance-button")
                downloads = gr.File(label="Download (full resolution, the input's format and bit depth)",
                                    file_count="multiple", interactive=False, elem_id="downloads")
            with gr.Column(scale=2):
                choice = gr.Dropdown(label="Compare", choices=[], visible=False, interactive=True,
                                     elem_id="compare-choice")
                slider = gr.ImageSlider(label="Before | after (drag the handle)", type="filepath", format="png",
                                        interactive=False, elem_id="comparison", max_height=720,
                                        buttons=["fullscreen"])  # no download here: it would be the 8-bit preview
                report = gr.Markdown(elem_id="report")
        pairs_state = gr.State({})
        button.click(_injects_request(enhance, gr), inputs=[uploads],
                     outputs=[slider, downloads, report, choice, pairs_state], api_name="enhance",
                     concurrency_limit=1, concurrency_id=f"enhance-{enhancer.device}",
                     show_progress="full")
        # Switching the comparison only reads finished files: it skips the enhancement queue.
        choice.change(show, inputs=[choice, pairs_state], outputs=[slider], queue=False, api_name=False)

        def session_ended(request: gr.Request) -> None:
            work.end_session(getattr(request, "session_hash", None))

        demo.unload(_injects_request(session_ended, gr))
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo


# ------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lfpv_fast.app",
        description="A local web page for enhancing low-light photos with an LFPV model (needs the [app] extra: "
                    "pip install 'lfpv_fast[app]').",
        epilog=f"Without --checkpoint the newest {WEIGHTS_NAME} under --runs is used; `python -m lfpv_fast.train` "
               "trains one (the built-in demo). The page works offline and has no login: keep the default host "
               "unless every machine that can reach the port may use it.",
    )
    # The flags shared with enhance and evaluate (lfpv_fast.cli), with enhance's meanings.
    add_inference_args(parser, images=True, checkpoint_required=False,
                       checkpoint_default_help=f" (default: the newest {WEIGHTS_NAME} under --runs)",
                       max_image_size=DEFAULT_MAX_IMAGE_SIZE,
                       max_image_size_help=": every 8- or 16-bit image up to 40 MP, as the app accepted before; "
                                           "enhance's default is 2G")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"where to look for {WEIGHTS_NAME} without "
                        f"--checkpoint (default: {DEFAULT_RUNS})")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this "
                        "machine only; 0.0.0.0 serves every network interface, with no login)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--max-files", type=int, default=DEFAULT_MAX_FILES,
                        help=f"most images in one request (default {DEFAULT_MAX_FILES})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="most requests waiting for the device; more are turned away "
                             f"(default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload per file in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    parser.add_argument("--max-work-mb", type=int, default=DEFAULT_MAX_WORK_MB,
                        help="most MB of results kept for download; beyond it the oldest requests' results are "
                             f"deleted (default {DEFAULT_MAX_WORK_MB})")
    parser.add_argument("--max-work-files", type=int, default=DEFAULT_MAX_WORK_FILES,
                        help="most result files kept for download (three per image: the result and its two "
                             f"previews); beyond it the oldest go (default {DEFAULT_MAX_WORK_FILES})")
    return parser


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    check_inference_flags(parser, args)
    for flag in ("max_files", "max_queue", "max_upload_mb", "max_work_mb", "max_work_files"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return parser, args


def exposure_warning(host: str, port: int) -> str | None:
    """The warning printed when the page is served beyond this machine (it has no login), else None."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to any interface
        pass
    return (f"warning: serving on {host}:{port}: anyone who can reach this address can use the page and this "
            "machine's device; the page has no login")


def address_problem(host: str, port: int) -> str | None:
    """Why the page cannot be served on host:port, or None: the host is resolved and the port bound (and let go)
    here, so that each reason gets its own message before anything says "serving"."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return f"--host {host!r} does not resolve to an address ({reason}); choose another --host"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is in use (choose another --port)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine (choose another --host)"
            if exc.errno == errno.EACCES:
                return f"binding port {port} needs privileges here (choose a --port above 1023)"
            return f"{exc.strerror or exc} (choose another --port or --host)"
    return None


def resolve_checkpoint(checkpoint: str | None, runs: str) -> Path:
    """--checkpoint, or the newest final_weights.pth under `runs` (said on stderr); ValueError when there is none."""
    if checkpoint is not None:
        return Path(checkpoint)
    newest = find_newest_weights(runs)
    if newest is None:
        raise ValueError(f"no --checkpoint given and no {WEIGHTS_NAME} under {runs}/: train one with "
                         "`python -m lfpv_fast.train` (the built-in demo, a few minutes on a CPU) or pass "
                         "--checkpoint PATH (an lfpv_fast checkpoint or the published SMID.pth)")
    print(f"no --checkpoint given: using the newest {newest}", file=sys.stderr)
    return newest


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = _parse_args(argv)
    try:
        gr = import_gradio()
    except ImportError as exc:
        print(f"error: the web app needs Gradio ({exc}); install it with: pip install 'lfpv_fast[app]'",
              file=sys.stderr)
        return 2
    problem = address_problem(args.host, args.port)
    if problem is not None:
        print(f"error: cannot serve on {args.host}:{args.port}: {problem}", file=sys.stderr)
        return 2
    try:  # --device, --precision and --backend as enhance checks them, with its one-line error
        device = inference_device(args)
    except ValueError as exc:
        print(parser.usage_error_line(str(exc)), file=sys.stderr)
        return 2
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.runs)
        net = load_inference_model(parser, args, checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a name too long for the file system, a file that cannot be read
        print(f"error: {os_error_line(exc, 'checkpoint')}", file=sys.stderr)
        return 2
    # Our own lines only: the root logger would also print every HTTP request of Gradio's clients.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    enhancer = Enhancer(net, checkpoint, device, **image_settings(args))
    warning = exposure_warning(args.host, args.port)
    if warning is not None:
        print(warning, file=sys.stderr)

    # Inside Gradio's upload folder, so that Gradio serves the results from there instead of copying them.
    from gradio.utils import get_upload_folder

    upload_folder = Path(get_upload_folder())
    upload_folder.mkdir(parents=True, exist_ok=True)
    work = WorkFolder(Path(tempfile.mkdtemp(prefix="lfpv-app-", dir=upload_folder)), args.max_work_mb * 2**20,
                      args.max_work_files)
    # SIGTERM stops the server as Ctrl-C does, so the cleanup below runs.
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    demo = None
    try:
        demo = build_demo(enhancer, work, max_files=args.max_files, max_queue=args.max_queue)
        demo.launch(server_name=args.host, server_port=args.port, share=False, quiet=True, show_error=False,
                    max_file_size=f"{args.max_upload_mb}mb", ssr_mode=False, pwa=False, mcp_server=False,
                    enable_monitoring=False, run_history=False, footer_links=["api"], inbrowser=False,
                    theme=gr.themes.Default(), prevent_thread_lock=True)
        # Only now is the port ours: say so.
        print(f"model {enhancer.model_name} on {describe_device(device)} ({enhancer.precision}); serving "
              f"http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr, flush=True)
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # taken between the check above and the server's own bind
        reason = "the port is in use" if "empty port" in str(exc) else str(exc)
        print(f"error: cannot serve on {args.host}:{args.port}: {reason} (choose another --port or --host)",
              file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if demo is not None:
            demo.close()
        shutil.rmtree(work.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
