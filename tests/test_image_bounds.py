"""Decompression bombs: a small file that declares a huge image is refused from its header, before decoding.

The bound is on the decoded bytes (height x width x samples per pixel x bytes per sample x planes), in one
place (`lfpv_fast.io.imageio.read_image_info`) that the readers, enhance, the data scan and the app all use.
Each test makes the decoders fail loudly if they are called, and watches the memory allocated.
"""

from __future__ import annotations

import tracemalloc
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageFile

from helpers import write_png_bomb
from lfpv_fast.io.imageio import (
    DEFAULT_MAX_DECODED_BYTES,
    ImageReadError,
    ImageTooLargeError,
    read_image,
    read_image_info,
    read_pixels,
)

SMALL_PEAK = 32 * 2**20  # what reading a refused file may allocate at most (its header and a few buffers)


class Decoded(BaseException):
    """Raised by a decoder that must not run (a BaseException, so that no reader's `except Exception` hides it)."""


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pixel decoder the readers use fails loudly if it is called."""

    def refuse(*args, **kwargs):
        raise Decoded("a decoder ran on a file that should have been refused from its header")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    monkeypatch.setattr(imagecodecs, "png_decode", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def traced(call) -> tuple[int, Exception | None]:
    """Peak bytes traced (numpy arrays included) while `call()` runs, and the exception it raised (or None)."""
    tracemalloc.start()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (the caller checks which)
        return tracemalloc.get_traced_memory()[1], exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, None


def write_tiff_bomb(path: Path, kind: str) -> Path:
    """A ~1 MB zlib TIFF whose first page decodes to 1000 x 1000 x 1000 bytes (1 GB): the same pre-compressed
    tile of zeros, referenced by every tile (written without ever holding the 1 GB)."""
    if kind == "volumetric":
        tile, options = (16, 128, 128), dict(volumetric=True, photometric="minisblack")
        count, tile_bytes = 63 * 8 * 8, 16 * 128 * 128
    elif kind == "contig":
        tile, options = (128, 128), dict(photometric="minisblack", planarconfig=kind)
        count, tile_bytes = 8 * 8, 128 * 128 * 1000
    else:  # separate planes: a tile per plane
        tile, options = (512, 512), dict(photometric="minisblack", planarconfig=kind)
        count, tile_bytes = 2 * 2 * 1000, 512 * 512
    encoded = zlib.compress(bytes(tile_bytes), 9)
    tifffile.imwrite(path, (encoded for _ in range(count)), shape=(1000, 1000, 1000), dtype="uint8", tile=tile,
                     compression="zlib", **options)
    assert path.stat().st_size < 2 * 2**20
    return path


@pytest.mark.parametrize("kind, named", [("contig", "1000 samples per pixel"), ("separate", "1000 samples per pixel"),
                                         ("volumetric", "volumetric TIFF (1000 planes)")])
def test_a_1mb_tiff_of_1000x1000x1000_is_refused_before_decoding(tmp_path, no_decoding, kind, named):
    bomb = write_tiff_bomb(tmp_path / f"{kind}.tif", kind)
    peak, error = traced(lambda: read_pixels(bomb))
    assert isinstance(error, ImageReadError) and peak < SMALL_PEAK
    assert str(error).startswith(f"{bomb}: ") and named in str(error)
    # With a bound below its decoded size, the bound itself refuses it, saying how large it would be.
    with pytest.raises(ImageTooLargeError, match=r"would decode to 953\.7 MiB, more than the 256\.0 MiB allowed"):
        read_image(bomb, max_decoded_bytes=256 * 2**20)


def test_a_large_tiff_is_refused_by_its_decoded_size(tmp_path, no_decoding):
    """6000 x 6000 x 1000 declared in a few MB: 33.5 GiB decoded, over the default bound."""
    encoded = zlib.compress(bytes(512 * 512 * 1000), 9)
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, (encoded for _ in range(12 * 12)), shape=(6000, 6000, 1000), dtype="uint8",
                     tile=(512, 512), compression="zlib", photometric="minisblack", planarconfig="contig")
    peak, error = traced(lambda: read_image(path))
    assert isinstance(error, ImageTooLargeError) and peak < SMALL_PEAK
    assert str(error).startswith(f"{path}: 6000x6000 pixels x 1000 samples x 8 bit would decode to 33.53 GiB")


@pytest.mark.parametrize("bit_depth, color_type, samples", [(16, 6, 4), (16, 0, 1), (8, 2, 3), (8, 3, 4)])
def test_a_png_declaring_a_huge_image_is_refused_before_decoding(tmp_path, no_decoding, bit_depth, color_type,
                                                                 samples):
    """100000 x 100000 pixels (16-bit: decoded by imagecodecs, which has no limit of its own): 10 to 80 GB."""
    bomb = write_png_bomb(tmp_path / "bomb.png", 100_000, bit_depth, color_type)
    expected = 100_000**2 * samples * bit_depth // 8
    assert read_image_info(bomb, max_decoded_bytes=None).decoded_bytes == expected
    with pytest.raises(ImageTooLargeError, match=f"{bit_depth} bit would decode to"):
        read_pixels(bomb)


def test_a_16_bit_png_over_a_given_bound_is_not_decoded(tmp_path, no_decoding):
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png16)
    with pytest.raises(ImageTooLargeError, match=r"600x600 pixels x 4 samples x 16 bit would decode to 2\.7 MiB, "
                                                 r"more than the 1\.0 MiB allowed"):
        read_image(path, max_decoded_bytes=2**20)


_png16 = bytes(imagecodecs.png_encode(np.zeros((600, 600, 4), np.uint16)))  # encoded before any monkeypatching


def test_a_jpeg_over_a_given_bound_is_not_decoded(tmp_path, no_decoding):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg)
    with pytest.raises(ImageTooLargeError, match=r"photo\.jpg: 1200x800 pixels x 3 samples x 8 bit"):
        read_pixels(path, max_decoded_bytes=2**20)


def _encode_jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((800, 1200, 3), np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


_jpeg = _encode_jpeg()


def test_a_multipage_tiff_decodes_its_first_page_only(tmp_path):
    """300 pages of 1000 x 1000: the reader decodes the first (1 MB), never the 300 MB of the series."""
    path = tmp_path / "pages.tif"
    first = np.full((1000, 1000), 7, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(first, compression="zlib", photometric="minisblack")
        for _ in range(299):
            tif.write(np.zeros((1000, 1000), np.uint8), compression="zlib", photometric="minisblack")
    result = {}
    peak, error = traced(lambda: result.update(pixels=read_pixels(path)))
    assert error is None
    color, alpha, bit_depth, mode = result["pixels"]
    assert color.shape == (1000, 1000, 3) and (color == 7).all() and mode == "gray" and bit_depth == 8
    assert peak < SMALL_PEAK


def test_the_data_scan_refuses_a_bomb(tmp_path, no_decoding):
    """The training/evaluation data readers' header scan applies the same bound (lfpv_fast.data.images)."""
    from lfpv_fast.data.errors import DataError
    from lfpv_fast.data.images import read_header

    bomb = write_tiff_bomb(tmp_path / "frame.tif", "contig")
    with pytest.raises(DataError, match="frame.tif: 1000 samples per pixel"):
        read_header(bomb)
    huge = write_png_bomb(tmp_path / "frame.png", 100_000, 16, 6)
    with pytest.raises(DataError, match="would decode to"):
        read_header(huge)


def test_enhance_refuses_a_bomb_before_writing_anything(tmp_path, tiny_checkpoint, no_decoding, capsys):
    from lfpv_fast.enhance import main

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(_small_png)
    bomb = write_tiff_bomb(folder / "bomb.tif", "contig")
    code = main([str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "out"), "-q"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {bomb}: 1000 samples per pixel")
    assert not (tmp_path / "out").exists()
    # --max-image-size is the bound: a 16-bit RGBA PNG of 600x600 (2.7 MiB decoded) over 1M is refused.
    (folder / "bomb.tif").unlink()
    (folder / "rgba16.png").write_bytes(_png16)
    code = main([str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "out"), "-q",
                 "--max-image-size", "1M"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and "rgba16.png: 600x600 pixels" in errors[0], errors


def _encode_small_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 24, 3), 20, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


_small_png = _encode_small_png()


def test_the_app_refuses_a_bomb_before_decoding(tmp_path, tiny_checkpoint, no_decoding):
    from lfpv_fast import app as app_mod
    from lfpv_fast.training.checkpoint import load_model

    # enhance's --max-image-size (2G): the volumetric TIFF (954 MiB decoded) passes the size bound and is refused
    # for its layout, as enhance refuses it; the app's own default (840M) refuses it for its size already.
    enhancer = app_mod.Enhancer(load_model(tiny_checkpoint, backend="reference"), tiny_checkpoint,
                                torch.device("cpu"), max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES)
    bomb = write_tiff_bomb(tmp_path / "upload.tif", "volumetric")
    peak, error = traced(lambda: enhancer.enhance_file(bomb, "photo.tif", tmp_path))
    assert isinstance(error, app_mod.InputError) and peak < SMALL_PEAK
    assert str(error).startswith("photo.tif: a volumetric TIFF (1000 planes)")
    huge = write_png_bomb(tmp_path / "upload.png", 100_000, 16, 6)
    with pytest.raises(app_mod.InputError, match=r"^photo\.png: 100000x100000 pixels"):
        enhancer.enhance_file(huge, "photo.png", tmp_path)
