"""The web app: the enhancement path and its checks in-process, then the served app through gradio_client."""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import replace as dataclass_replace
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from app_server import AppServer, app_server, free_port
from helpers import TINY, assert_one_line_error, run, write_png_bomb, write_tiny_checkpoint
from lfpv_fast import LFPVNet
from lfpv_fast import app as app_mod
from lfpv_fast.cli import image_settings
from lfpv_fast.enhance import main as enhance_main
from lfpv_fast.enhance import plan_enhancement
from lfpv_fast.inference.enhancement import DEFAULT_TILE
from lfpv_fast.io.imageio import read_image, read_image_size
from lfpv_fast.training.checkpoint import atomic_save, load_model, weights_only_checkpoint

pytest.importorskip("gradio", reason="the app needs the [app] extra (pip install -e '.[dev]' includes it)")

# The served app's --max-image-size (the memory reading an image takes): a 500x500 8-bit RGB image (3.6 MiB) is over
# it, the 384x448 ones of the queue test (2.5 MiB) are within.
MAX_IMAGE_SIZE = 3 * 2**20


def dark_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.12 + 0.08 * np.sin(4 * xx + c) * np.cos(3 * yy - c) for c in range(3)], axis=2)
    return np.clip(base + 0.02 * g.random((h, w, 3)), 0, 1)


def write_png8(path: Path, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    Image.fromarray(np.round(dark_rgb(h, w, seed) * 255).astype(np.uint8)).save(path)
    return path


def write_png16_rgba(path: Path, h: int = 40, w: int = 56) -> Path:
    rgb = np.round(dark_rgb(h, w, 1) * 65535).astype(np.uint16)
    alpha = np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)
    path.write_bytes(imagecodecs.png_encode(np.dstack([rgb, alpha])))
    return path


def write_truncated_png(path: Path) -> Path:
    full = path.with_name("full_" + path.name)
    g = np.random.default_rng(3)
    Image.fromarray(g.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ------------------------------------------------------------------------------------------------
# In-process: the Enhancer and the checkpoint choice, no server.


@pytest.fixture(scope="module")
def enhancer(tmp_path_factory: pytest.TempPathFactory) -> app_mod.Enhancer:
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final_weights.pth")
    net = load_model(checkpoint, backend="reference")
    return app_mod.Enhancer(net, checkpoint, torch.device("cpu"), max_decoded_bytes=MAX_IMAGE_SIZE)


def test_enhance_file_matches_the_enhance_cli(enhancer: app_mod.Enhancer, tmp_path: Path) -> None:
    """Same reader, model call and writer as `python -m lfpv_fast.enhance`: identical files, 16-bit RGBA kept."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    png8, png16 = write_png8(inputs / "dark.png"), write_png16_rgba(inputs / "rgba16.png")
    assert enhance_main([str(inputs), "--checkpoint", str(enhancer.checkpoint), "-o", str(tmp_path / "cli"),
                         "--backend", "reference", "--device", "cpu", "-q"]) == 0
    for source in (png8, png16):
        out_dir = tmp_path / f"app_{source.stem}"
        out_dir.mkdir()
        result = enhancer.enhance_file(source, source.name, out_dir)
        assert result.output.name == f"{source.stem}_enhanced.png"
        ours, cli = read_image(result.output), read_image(tmp_path / "cli" / source.name)
        assert ours.bit_depth == cli.bit_depth == read_image(source).bit_depth
        assert np.array_equal(ours.rgb, cli.rgb)
        assert (ours.alpha is None) == (cli.alpha is None)
        if cli.alpha is not None:
            assert ours.alpha.dtype == np.uint16 and np.array_equal(ours.alpha, cli.alpha)
        assert result.tile is None and (result.height, result.width) == ours.size
        with Image.open(result.before_preview) as before, Image.open(result.after_preview) as after:
            assert before.size == after.size == (result.width, result.height) and after.mode == "RGB"


@pytest.mark.parametrize("height, width, tile, max_memory, expected", [
    (1000, 1000, None, None, None),         # fits the free memory: whole image
    (2000, 1500, None, 1 << 20, "tiles"),   # does not fit 1 MiB: tiles (of the largest side that fits)
    (40, 72, 32, None, 32),                 # --tile, image larger than a tile
    (32, 32, 32, None, None),               # --tile, image within one tile: whole image
])
def test_the_page_plans_as_enhance_does(enhancer: app_mod.Enhancer, height: int, width: int, tile: int | None,
                                        max_memory: int | None, expected: int | str | None) -> None:
    plan = plan_enhancement(enhancer.net, 1, height, width, tile=tile, max_memory=max_memory,
                            device=enhancer.device)
    assert (plan.tile if plan.tiled else None) == expected if expected != "tiles" else plan.tiled


def test_enhance_file_reports_tiles(enhancer: app_mod.Enhancer, tmp_path: Path) -> None:
    tiled = app_mod.Enhancer(enhancer.net, enhancer.checkpoint, enhancer.device, max_decoded_bytes=MAX_IMAGE_SIZE,
                             tile=32, overlap=8)
    result = tiled.enhance_file(write_png8(tmp_path / "wide.png", 40, 72), "wide.png", tmp_path)
    assert result.tile == 32 and "tiles of 32x32" in app_mod.report_markdown([result], [], tiled)
    assert read_image(result.output).size == (40, 72)


@pytest.mark.parametrize("kind, expected", [
    ("not_image", "could not read image"),
    ("truncated", "could not read image"),
    ("text", "not a supported image type '.txt'"),
    ("too_large", "more than the 3.0 MiB allowed; refused before decoding (this server's --max-image-size)"),
    ("bomb", "more than the 3.0 MiB allowed; refused before decoding (this server's --max-image-size)"),
    ("tiny", "smaller than the model's minimum 16x16"),
])
def test_enhance_file_bad_inputs(enhancer: app_mod.Enhancer, tmp_path: Path, kind: str, expected: str) -> None:
    path = tmp_path / "upload" / {"text": "notes.txt"}.get(kind, f"{kind}.png")
    path.parent.mkdir()
    if kind in ("not_image", "text"):
        path.write_bytes(b"this is not an image\n")
    elif kind == "truncated":
        write_truncated_png(path)
    elif kind == "too_large":
        write_png8(path, 500, 500)
    elif kind == "bomb":
        write_png_bomb(path, 30_000)
    else:
        write_png8(path, 8, 64)
    with pytest.raises(app_mod.InputError) as info:
        enhancer.enhance_file(path, path.name, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path.name}: ") and expected in message
    assert str(path.parent) not in message  # the user's file name, not the server's temporary path


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.tif", "gray16.tiff", "rgba16.png"])
def test_read_image_size_reads_the_header(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "gray16.tiff":
        tifffile.imwrite(path, np.zeros((33, 47), dtype=np.uint16))
    elif name == "rgba16.png":
        write_png16_rgba(path, 33, 47)
    else:
        Image.fromarray(np.zeros((33, 47, 3), dtype=np.uint8)).save(path)
    assert read_image_size(path) == (33, 47) == read_image(path).size


def test_pillow_bomb_limit_still_applies(enhancer: app_mod.Enhancer, tmp_path: Path) -> None:
    """Without a --max-image-size bound, Pillow's decompression-bomb check is the next guard."""
    lenient = app_mod.Enhancer(enhancer.net, enhancer.checkpoint, enhancer.device, max_decoded_bytes=None)
    bomb = write_png_bomb(tmp_path / "bomb.png", 20_000)  # 400 MP, over twice Pillow's MAX_IMAGE_PIXELS
    with pytest.raises(app_mod.InputError, match="bomb.png: could not read image: .*decompression bomb"):
        lenient.enhance_file(bomb, "bomb.png", tmp_path)


def test_max_pixels_tiles_as_in_enhance(enhancer: app_mod.Enhancer, tmp_path: Path) -> None:
    """--max-pixels means what it means for enhance: images with more pixels are tiled, not refused; the result is
    enhance's own file. --max-image-size is the refusal, with the app's default."""
    args = app_mod.build_parser().parse_args(["--max-pixels", "1000", "--tile-overlap", "8"])
    settings = image_settings(args)
    assert settings["max_pixels"] == 1000 and settings["max_decoded_bytes"] == app_mod.DEFAULT_MAX_IMAGE_SIZE
    source = write_png8(tmp_path / "wide.png", 40, 72)  # 2880 pixels > 1000
    app = app_mod.Enhancer(enhancer.net, enhancer.checkpoint, enhancer.device, **settings)
    (tmp_path / "app").mkdir()
    result = app.enhance_file(source, source.name, tmp_path / "app")
    assert result.tile == DEFAULT_TILE  # tiled, as enhance plans it (plan_enhancement: "pixels > --max-pixels")
    assert enhance_main([str(source), "--checkpoint", str(enhancer.checkpoint), "-o", str(tmp_path / "cli"), "-q",
                         "--device", "cpu", "--backend", enhancer.net.backend, "--max-pixels", "1000",
                         "--tile-overlap", "8"]) == 0
    assert np.array_equal(read_image(result.output).rgb, read_image(tmp_path / "cli" / source.name).rgb)


def test_default_max_image_size_takes_every_image_the_old_limit_took(enhancer: app_mod.Enhancer,
                                                                     tmp_path: Path) -> None:
    """The app's old refusal was 40 MP of any kind; --max-image-size's default takes every 8- or 16-bit image of
    40 MP (checked from the header: the files below declare their size and hold almost nothing)."""
    from lfpv_fast.io.imageio import ImageInfo

    for samples in (1, 2, 3, 4):
        for bytes_per_sample in (1, 2):
            assert ImageInfo(5000, 8000, samples, bytes_per_sample).read_peak_bytes <= app_mod.DEFAULT_MAX_IMAGE_SIZE
    default = app_mod.Enhancer(enhancer.net, enhancer.checkpoint, enhancer.device)
    assert default.pipeline.max_decoded_bytes == app_mod.DEFAULT_MAX_IMAGE_SIZE
    assert default.pipeline.check(write_png_bomb(tmp_path / "40mp.png", 6324, 16, 4)).size == (6324, 6324)
    with pytest.raises(app_mod.InputError, match=r"^50mp\.png: 7072x7072 pixels .*--max-image-size"):
        default.enhance_file(write_png_bomb(tmp_path / "50mp.png", 7072, 16, 4), "50mp.png", tmp_path)
    assert "about 40 MP of any 8- or 16-bit image" in default.summary_markdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_the_app_refuses_an_unusable_backend_as_enhance_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    checkpoint = write_tiny_checkpoint(tmp_path / "final_weights.pth")
    write_png8(tmp_path / "a.png")
    code, enhance_err = run(enhance_main, [tmp_path / "a.png", "--checkpoint", checkpoint, "-o", tmp_path / "out",
                                           "--device", "cpu", "--backend", "triton"], capsys)
    enhance_line = assert_one_line_error(code, enhance_err, "--backend triton cannot run on cpu")
    code, err = run(app_mod.main, ["--checkpoint", checkpoint, "--device", "cpu", "--backend", "triton",
                                   "--port", free_port()], capsys)
    line = assert_one_line_error(code, err, "--backend triton cannot run on cpu", "TRITON_INTERPRET=1")
    assert line == enhance_line.replace("lfpv_fast.enhance", "lfpv_fast.app")


def test_the_app_checks_tile_against_the_loaded_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SNR-Aware with token_size 8 aligns to 32: --tile 16 is refused once the model is loaded, naming the rule."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "token8.pth"
    atomic_save(weights_only_checkpoint(LFPVNet(dataclass_replace(TINY, token_size=8), backend="reference")),
                checkpoint)
    code, err = run(app_mod.main, ["--checkpoint", checkpoint, "--device", "cpu", "--port", free_port(),
                                   "--tile", "16"], capsys)
    assert_one_line_error(code, err, "--tile must be a positive multiple of 32", "snr_aware backbone aligns to 32",
                          "got 16", "python -m lfpv_fast.app --help")


def test_newest_weights_and_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    older = write_tiny_checkpoint(runs / "demo-1" / "final_weights.pth")
    newer = write_tiny_checkpoint(runs / "demo-2" / "final_weights.pth")
    now = time.time()
    os.utime(older, (now, now))
    os.utime(newer, (now - 100, now - 100))
    assert app_mod.resolve_checkpoint(None, str(runs)) == older
    assert str(older) in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"python -m lfpv_fast.train"):
        app_mod.resolve_checkpoint(None, str(tmp_path / "nothing"))
    assert app_mod.main(["--runs", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: no --checkpoint given and no final_weights.pth")


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("127.0.0.2", False), ("::1", False),
                                         ("localhost", False), ("0.0.0.0", True), ("192.168.1.20", True),
                                         ("myhost.example", True)])
def test_warning_when_served_beyond_this_machine(host: str, warns: bool) -> None:
    warning = app_mod.exposure_warning(host, 7860)
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith(f"warning: serving on {host}:7860") and "no login" in warning


def test_port_in_use_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "final_weights.pth")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app_mod.main(["--checkpoint", str(checkpoint), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot serve on 127.0.0.1:{port}: the port is in use" in err
    assert "serving" not in err  # said only once the port is ours
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("host, reason", [("no-such-host.invalid", "does not resolve to an address"),
                                          ("192.0.2.1", "192.0.2.1 is not an address of this machine")])
def test_a_bad_host_is_not_called_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str,
                                                reason: str) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "final_weights.pth")
    assert app_mod.main(["--checkpoint", str(checkpoint), "--host", host, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve on {host}:7860: ") and reason in err, err
    assert "port is in use" not in err and "serving" not in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_as_checkpoint_is_named_as_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a free port, so that the address check passes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert app_mod.main(["--checkpoint", str(tmp_path), "--device", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {tmp_path} is a folder, expected a checkpoint file (.pth)"), err


def test_work_folder_keeps_a_sessions_latest_results_within_bounds(tmp_path: Path) -> None:
    work = app_mod.WorkFolder(tmp_path, max_bytes=10_000, max_files=6)

    def request(session: str, files: int, size: int = 100) -> Path:
        folder = work.new_request()
        for k in range(files):
            (folder / f"{k}.png").write_bytes(b"x" * size)
        work.finished(session, folder)
        return folder

    a1 = request("a", 2)
    b1 = request("b", 2)
    a2 = request("a", 2)  # supersedes a1
    assert not a1.exists() and b1.exists() and a2.exists()
    assert work.usage() == (400, 4)
    work.end_session("b")  # the page was closed
    assert not b1.exists() and a2.exists()
    c1 = request("c", 3)
    d1 = request("d", 3)  # 8 files > 6: the oldest (a2) goes, which is enough
    assert not a2.exists() and c1.exists() and d1.exists() and work.usage() == (600, 6)
    e1 = request("e", 1, size=20_000)  # over the byte bound alone: kept (it is what the page shows), d1 goes
    assert e1.exists() and not d1.exists() and work.usage() == (20_000, 1)
    failed = work.new_request()
    work.discard(failed)
    assert not failed.exists() and sorted(p.name for p in tmp_path.iterdir()) == [e1.name]


def test_one_enhancement_at_a_time(enhancer: app_mod.Enhancer, tmp_path: Path) -> None:
    demo = app_mod.build_demo(enhancer, app_mod.WorkFolder(tmp_path, 2**20, 10), max_queue=5)
    (enhance_fn,) = [fn for fn in demo.fns.values() if fn.api_name == "enhance"]
    assert enhance_fn.concurrency_limit == 1 and enhance_fn.queue
    assert demo._queue.max_size == 5 and not demo.analytics_enabled


# ------------------------------------------------------------------------------------------------
# The served app, through gradio_client.


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> AppServer:
    with app_server(tmp_path_factory.mktemp("app"), "--max-image-size", str(MAX_IMAGE_SIZE), "--max-files", "3",
                    "--max-queue", "1", "--max-upload-mb", "1") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: AppServer):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def test_served_app_enhances_at_full_size_and_depth(client, server: AppServer, tmp_path: Path) -> None:
    from gradio_client import handle_file

    png8, png16 = write_png8(tmp_path / "dark.png", 48, 80), write_png16_rgba(tmp_path / "rgba16.png")
    jpeg = tmp_path / "dark.jpg"  # same stem as dark.png: their previews must not overwrite each other
    Image.fromarray(np.round(dark_rgb(40, 32) * 255).astype(np.uint8)).save(jpeg, quality=95)
    comparison, downloads, report, _choice = client.predict([handle_file(png8), handle_file(png16),
                                                            handle_file(jpeg)], api_name="/enhance")
    assert [Path(p).name for p in downloads] == ["dark_enhanced.png", "rgba16_enhanced.png", "dark_enhanced.jpg"]
    for source, download in zip((png8, png16, jpeg), downloads, strict=True):
        given, got = read_image(source), read_image(download)
        assert got.size == given.size and got.bit_depth == given.bit_depth
        assert (got.alpha is None) == (given.alpha is None)
    before, after = (Image.open(p) for p in comparison)
    assert before.size == after.size == (80, 48)
    assert "whole image" in report and "dark.png" in report and "float32" in report and "cpu" in report


def test_served_app_bad_inputs_get_messages_and_it_keeps_serving(client, server: AppServer, tmp_path: Path) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    over = re.escape("allowed; refused before decoding (this server's --max-image-size)")
    bad = {
        "notes.txt": re.escape("notes.txt: not a supported image type '.txt'"),
        "garbage.png": "garbage.png: could not read image",
        "cut.png": "cut.png: could not read image",
        "big.png": "big.png: 500x500 pixels .*" + over,
        "bomb.png": "bomb.png: 30000x30000 pixels .*" + over,
    }
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really")
    write_truncated_png(tmp_path / "cut.png")
    write_png8(tmp_path / "big.png", 500, 500)
    write_png_bomb(tmp_path / "bomb.png", 30_000)
    for name, expected in bad.items():
        with pytest.raises(AppError, match="^" + expected):
            client.predict([handle_file(tmp_path / name)], api_name="/enhance")
    good = write_png8(tmp_path / "good.png")
    with pytest.raises(AppError, match=r"4 files at once is more than this server takes \(3, --max-files\)"):
        client.predict([handle_file(good)] * 4, api_name="/enhance")
    with pytest.raises(AppError, match="Upload one or more images first"):
        client.predict([], api_name="/enhance")
    # A mix: the good file is enhanced, the bad one is listed with its reason.
    _, downloads, report, _ = client.predict([handle_file(tmp_path / "garbage.png"), handle_file(good),
                                              handle_file(good)], api_name="/enhance")
    assert [Path(p).name for p in downloads] == ["good_enhanced.png", "good_2_enhanced.png"]
    assert "1 file(s) not enhanced" in report and "garbage.png: could not read image" in report
    # Over --max-upload-mb: refused by the server before anything is read.
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "huge_file.png")  # ~1.9 MB of incompressible noise
    with pytest.raises(Exception, match="(?i)file size|too large|exceeds"):
        client.predict([handle_file(tmp_path / "huge_file.png")], api_name="/enhance")

    _, downloads, _, _ = client.predict([handle_file(good)], api_name="/enhance")
    assert read_image(downloads[0]).size == (48, 64)
    log = server.log_text()
    assert "Traceback" not in log, log
    assert "error: bomb.png: 30000x30000 pixels" in log


def test_served_app_deletes_a_sessions_superseded_results(server: AppServer, tmp_path: Path) -> None:
    """The results live once on disk (not copied into Gradio's cache) and only the session's latest are kept."""
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    for k in range(3):
        client.predict([handle_file(write_png8(tmp_path / f"request{k}.png", seed=10 + k))], api_name="/enhance")
    app_files = server.log.parent / "gradio"  # the server's GRADIO_TEMP_DIR: Gradio's cache and the work folder
    held = sorted(p.name for p in app_files.rglob("request*_*.png"))
    assert held == ["request2_after.png", "request2_before.png", "request2_enhanced.png"], held


def test_served_app_queues_one_at_a_time_and_turns_away_the_rest(server: AppServer, tmp_path: Path) -> None:
    """--max-queue 1: while one request runs, one waits (its position is reported) and a third is turned away."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    # The running request must outlast two submissions: three 0.17 MP images, >= 1.5 s with the tiny model on a CPU.
    slow = [handle_file(write_png8(tmp_path / f"slow{i}.png", 384, 448, seed=i)) for i in range(3)]
    quick = handle_file(write_png8(tmp_path / "quick.png"))
    clients = [Client(server.url, verbose=False) for _ in range(3)]
    running = clients[0].submit(slow, api_name="/enhance")
    deadline = time.monotonic() + 60
    while running.status().code not in (Status.PROCESSING, Status.PROGRESS):
        assert time.monotonic() < deadline and not running.done(), running.status()
        time.sleep(0.05)
    waiting = clients[1].submit([quick], api_name="/enhance")
    while waiting.status().code in (Status.STARTING, Status.JOINING_QUEUE):
        time.sleep(0.02)
    status = waiting.status()
    assert status.code == Status.IN_QUEUE and status.rank == 0 and not running.done(), status
    turned_away = clients[2].submit([quick], api_name="/enhance")
    with pytest.raises(Exception, match="(?i)queue is full"):
        turned_away.result(timeout=60)
    assert [read_image(path).size for path in running.result(timeout=120)[1]] == [(384, 448)] * 3
    assert read_image(waiting.result(timeout=120)[1][0]).size == (48, 64)
    assert "Traceback" not in server.log_text()


def test_precision_is_checked_like_enhance(capsys) -> None:
    """--precision goes through enhance's check: fp16 on a CPU without native fp16 is refused, exit 2."""
    from lfpv_fast.inference.whole_image import check_precision

    try:
        check_precision("fp16", torch.device("cpu"))
    except ValueError as exc:
        assert app_mod.main(["--precision", "fp16", "--device", "cpu", "--checkpoint", "none.pth"]) == 2
        assert capsys.readouterr().err.startswith("error: --precision fp16")
        assert "fp16" in str(exc)
    else:
        pytest.skip("this CPU runs fp16 natively")
