"""Reading and writing the images the CLIs enhance and evaluate: PNG, JPEG and TIFF, 8 and 16 bit.

Choices (documented for users in `python -m lfpv_fast.enhance --help`):
- Grayscale is accepted and replicated to RGB (the model is an RGB model); the enhanced output is
  written as RGB. `LoadedImage.source_mode` says what the file held so that callers can say so.
- An alpha channel is taken off before enhancement and kept as is: `write_image` re-attaches it.
- 16-bit files stay 16-bit: values are read as v / 65535 and written back as round(x * 65535), so
  no precision is lost to an 8-bit round trip. JPEG is 8-bit only.
- JPEG EXIF orientation is applied on reading (the image is processed as viewers show it), since the
  written output carries no EXIF tag that would rotate it back.

Decoded size. Every read first parses the file's header and bounds the bytes that decoding would allocate
(height x width x samples per pixel x bytes per sample x depth of a volumetric TIFF), so that a small file
declaring a huge image (a decompression bomb: a 1 MB zlib TIFF can declare 1000x1000 pixels of 1000
samples) is refused before any pixel is decoded: `read_image_info` is that one check and the one header reader,
and `read_pixels`, `read_image`, the data readers' header scan (which also asks it whether each file is whole,
`complete=True`) and the app all go through it. Only the first page of a
multi-page TIFF (and the first frame of an APNG or MPO) is decoded, so later pages cost nothing.

Backends: Pillow for 8-bit PNG and JPEG; tifffile for TIFF; imagecodecs for 16-bit PNG, which
Pillow reads only as 8-bit RGB (it truncates "RGB;16" to 8 bits) and cannot write at all.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lfpv_fast.io.files import atomic_write_bytes

PNG_EXTENSIONS = (".png",)
JPEG_EXTENSIONS = (".jpg", ".jpeg")
TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = PNG_EXTENSIONS + JPEG_EXTENSIONS + TIFF_EXTENSIONS
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of a whole PNG file
_JPEG_TAIL = 4096  # bytes searched for a JPEG's end-of-image marker (some writers pad after it)
_ORIENTATION = 0x0112  # the EXIF/TIFF orientation tag; 5-8 swap width and height
# The memory that reading one image may take by default (`ImageInfo.read_peak_bytes`: the decoded samples, a gray
# image's RGB copy and the float32 RGB image that enhancement works on): 2 GiB reads an 8-bit RGB image of 143 MP
# or a 16-bit gray one of 89 MP.
DEFAULT_MAX_DECODED_BYTES = 2 * 2**30
# PNG colour type -> samples per pixel as decoded (a palette is expanded to RGB or RGBA: counted as 4).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}


class ImageReadError(ValueError):
    """A file that could not be read as a supported image (the message names the file)."""


class ImageTooLargeError(ImageReadError):
    """An image whose decoded pixels would exceed the allowed size (found from its header, before decoding)."""


@dataclass(frozen=True)
class ImageInfo:
    """What decoding a file would produce, read from its header: the size as stored, the samples per pixel and
    bytes per sample that the decoder allocates (depth: planes of a volumetric TIFF) and the EXIF orientation
    (PNG eXIf chunk, JPEG; 1 for TIFF, whose orientation tag the readers do not apply)."""

    height: int
    width: int
    samples: int
    bytes_per_sample: int
    depth: int = 1
    orientation: int = 1

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) as stored."""
        return self.height, self.width

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(height, width) once the EXIF orientation is applied: orientations 5-8 transpose the image."""
        return (self.width, self.height) if self.orientation in (5, 6, 7, 8) else (self.height, self.width)

    @property
    def bits(self) -> int:
        """The sample depth the readers give: 8 or 16 (a palette or 1/2/4-bit gray PNG decodes to 8 bit)."""
        return 8 * self.bytes_per_sample

    @property
    def decoded_bytes(self) -> int:
        return self.depth * self.height * self.width * self.samples * self.bytes_per_sample

    @property
    def read_peak_bytes(self) -> int:
        """What `read_image` holds at its peak: the decoded samples, the RGB copy of a gray image (its channel
        replicated, at the file's sample size) and the float32 RGB image (12 bytes a pixel)."""
        pixels = self.height * self.width
        replicated = 3 * self.bytes_per_sample * pixels if self.samples in (1, 2) else 0
        return self.decoded_bytes + replicated + 12 * pixels

    def describe(self) -> str:
        planes = f" x {self.depth} planes" if self.depth != 1 else ""
        return (f"{self.width}x{self.height} pixels{planes} x {self.samples} samples x "
                f"{8 * self.bytes_per_sample} bit")


@dataclass
class LoadedImage:
    """An image as the model sees it plus what is needed to write the result back in kind.

    rgb: (H, W, 3) float32 in [0, 1]. alpha: (H, W) in the file's integer dtype, or None.
    bit_depth: 8 or 16. source_mode: "rgb", "rgba", "gray" or "gray+alpha".
    """

    path: Path
    rgb: np.ndarray
    bit_depth: int
    alpha: np.ndarray | None
    source_mode: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.rgb.shape[0], self.rgb.shape[1]

    def to_tensor(self) -> torch.Tensor:
        """(3, H, W) float32 tensor."""
        return torch.from_numpy(np.ascontiguousarray(self.rgb.transpose(2, 0, 1)))


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(inputs: list[str | Path], recursive: bool = False, exclude: list[Path] | None = None
                ) -> list[tuple[Path, Path]]:
    """Expand files and folders into (image path, path relative to its input) pairs, in a stable order.

    A folder contributes its image files (sorted; subfolders too with `recursive`); a file must have a
    supported extension. Anything under a folder of `exclude` is left out (an output folder that lives
    inside an input folder, so that earlier results are not enhanced again).
    """
    excluded = [p.resolve() for p in (exclude or [])]
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            for file in sorted(pattern):
                if not file.is_file() or not is_image_file(file):
                    continue
                resolved = file.resolve()
                if any(resolved.is_relative_to(ex) for ex in excluded):
                    continue
                found.append((file, file.relative_to(path)))
        elif path.is_file():
            if not is_image_file(path):
                raise ValueError(f"input {path} is not a supported image (expected one of "
                                 f"{', '.join(IMAGE_EXTENSIONS)})")
            found.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return found


def _split_channels(array: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """An HxW / HxWxC integer array -> (HxWx3 colour, alpha or None, source mode)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ImageReadError(f"{path}: unsupported image layout {array.shape} (expected gray, gray+alpha, "
                             "RGB or RGBA)")
    channels = array.shape[2]
    if channels in (1, 2):
        color = np.repeat(array[:, :, :1], 3, axis=2)
        return color, (array[:, :, 1] if channels == 2 else None), ("gray+alpha" if channels == 2 else "gray")
    return array[:, :, :3], (array[:, :, 3] if channels == 4 else None), ("rgba" if channels == 4 else "rgb")


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode == "1":
            im = im.convert("L")
        elif mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode == "PA":
            im = im.convert("RGBA")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode not in ("L", "LA", "RGB", "RGBA"):
            raise ImageReadError(f"{path}: unsupported Pillow image mode {mode!r} "
                                 "(expected grayscale, RGB or RGBA, 8 or 16 bit)")
        return np.asarray(im)


def _read_png16(path: Path, data: bytes) -> np.ndarray:
    try:
        import imagecodecs
    except ImportError as exc:
        raise ImageReadError(f"{path}: reading 16-bit PNG needs the 'imagecodecs' package "
                             "(pip install imagecodecs)") from exc
    return imagecodecs.png_decode(data)


def _read_tiff(path: Path) -> np.ndarray:
    """The first page's samples; its layout was checked from the header by `_tiff_info`."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]  # multi-page TIFFs: the first page is the image (later ones are often thumbnails)
        array = page.asarray()
        axes = page.axes
    if axes.startswith("S") and array.ndim == 3:  # planar configuration: samples first
        array = np.moveaxis(array, 0, -1)
    return array


def read_image(path: str | Path, max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES) -> LoadedImage:
    """Read a PNG, JPEG or TIFF file (8 or 16 bit, gray/RGB, optional alpha) for enhancement.

    max_decoded_bytes: the bound checked from the header before decoding (see `read_image_info`)."""
    path = Path(path)
    color, alpha, bit_depth, mode = read_pixels(path, max_decoded_bytes)
    rgb = color.astype(np.float32)
    del color  # (a gray image's replicated copy) before the float image is scaled
    rgb /= np.float32(255.0 if bit_depth == 8 else 65535.0)  # in place: no second float copy at the peak
    return LoadedImage(path=path, rgb=rgb, bit_depth=bit_depth, alpha=None if alpha is None else alpha.copy(),
                       source_mode=mode)


def _checked_image_path(path: str | Path) -> tuple[Path, str]:
    """(path, lower-case suffix) of an existing file of a supported type, else a clear error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r} "
                             f"(expected one of {', '.join(IMAGE_EXTENSIONS)})")
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    return path, suffix


def read_pixels(path: str | Path, max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES
                ) -> tuple[np.ndarray, np.ndarray | None, int, str]:
    """A PNG, JPEG or TIFF file's samples as stored: (H x W x 3 colour, H x W alpha or None, bit depth 8 or 16,
    source mode), uint8 or uint16, gray replicated to RGB, EXIF orientation applied (see the module docstring).

    The header is checked first (`read_image_info`): an image over `max_decoded_bytes` is refused undecoded."""
    info = read_image_info(path, max_decoded_bytes)
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_EXTENSIONS:
            array = _read_tiff(path)
        elif suffix in PNG_EXTENSIONS:
            array = _read_png16(path, path.read_bytes()) if info.bits == 16 else _read_pillow(path)
        else:
            array = _read_pillow(path)
    except (ImageReadError, FileNotFoundError):
        raise
    except Exception as exc:  # corrupt or truncated file, or a format variant the decoders refuse
        raise ImageReadError(f"{path}: could not read image: {exc}") from exc

    if array.dtype == np.uint8:
        bit_depth = 8
    elif array.dtype == np.uint16:
        bit_depth = 16
    else:
        raise ImageReadError(f"{path}: unsupported sample type {array.dtype} (expected 8- or 16-bit unsigned integers)")
    color, alpha, mode = _split_channels(array, path)
    if min(color.shape[:2]) < 1:
        raise ImageReadError(f"{path}: empty image {color.shape[:2]}")
    return color, alpha, bit_depth, mode


def to_integer(rgb: np.ndarray | torch.Tensor, bit_depth: int) -> np.ndarray:
    """Float HxWx3 (numpy) or 3xHxW (torch) in [0, 1] -> uint8 / uint16 HxWx3: round(clamp(x) * max)."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if torch.is_tensor(rgb):
        if rgb.dim() != 3 or rgb.shape[0] != 3:
            raise ValueError(f"expected a (3,H,W) tensor, got {tuple(rgb.shape)}")
        rgb = rgb.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy()
    if bit_depth == 8:
        # Same rounding as lfpv_fast.training.metrics.quantize (the published tensor2img).
        return np.round(np.clip(rgb.astype(np.float32), 0, 1) * np.float32(255.0)).astype(np.uint8)
    return np.round(np.clip(rgb.astype(np.float64), 0, 1) * 65535.0).astype(np.uint16)


def encode_image(suffix: str, pixels: np.ndarray) -> bytes:
    """Encode uint8/uint16 HxWx3 or HxWx4 pixels for a file with this extension."""
    suffix = suffix.lower()
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected uint8/uint16 HxWx3 or HxWx4 pixels, got {pixels.dtype} {pixels.shape}")
    if suffix in TIFF_EXTENSIONS:
        import tifffile

        buffer = io.BytesIO()
        extrasamples = ("unassalpha",) if pixels.shape[2] == 4 else None
        tifffile.imwrite(buffer, pixels, photometric="rgb", compression="zlib", extrasamples=extrasamples)
        return buffer.getvalue()
    if suffix in PNG_EXTENSIONS and pixels.dtype == np.uint16:
        try:
            import imagecodecs
        except ImportError as exc:
            raise RuntimeError("writing 16-bit PNG needs the 'imagecodecs' package (pip install imagecodecs)") from exc
        return bytes(imagecodecs.png_encode(np.ascontiguousarray(pixels)))
    if pixels.dtype != np.uint8:
        raise ValueError(f"{suffix} output is 8-bit only, got {pixels.dtype} pixels")
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGBA" if pixels.shape[2] == 4 else "RGB")
    if suffix in PNG_EXTENSIONS:
        image.save(buffer, format="PNG")
    elif suffix in JPEG_EXTENSIONS:
        if pixels.shape[2] == 4:
            raise ValueError("JPEG cannot hold an alpha channel")
        image.save(buffer, format="JPEG", quality=95, subsampling=0)  # near-lossless: the model's detail matters
    else:
        raise ValueError(f"unsupported output file type {suffix!r} (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    return buffer.getvalue()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Readers never see a half-written image; the file gets the usual mode (umask), see lfpv_fast.io.files."""
    atomic_write_bytes(path, data)


def write_image(path: str | Path, rgb: np.ndarray | torch.Tensor, bit_depth: int = 8,
                alpha: np.ndarray | None = None) -> None:
    """Write a float RGB image in [0, 1] (HxWx3 numpy or 3xHxW torch) with optional alpha.

    16-bit is kept for PNG and TIFF; a 16-bit image written as JPEG is reduced to 8 bits (as is its alpha
    for an 8-bit file). An alpha channel cannot go into a JPEG (error).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JPEG_EXTENSIONS:
        bit_depth = 8
    pixels = to_integer(rgb, bit_depth)
    if alpha is not None:
        if alpha.shape != pixels.shape[:2]:
            raise ValueError(f"{path}: alpha of shape {alpha.shape} does not match the image {pixels.shape[:2]}")
        alpha = _convert_depth(alpha, pixels.dtype)
        pixels = np.concatenate([pixels, alpha[:, :, None]], axis=2)
    write_bytes_atomic(path, encode_image(suffix, pixels))


def _convert_depth(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if values.dtype == dtype:
        return values
    if values.dtype == np.uint16 and dtype == np.uint8:
        return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    if values.dtype == np.uint8 and dtype == np.uint16:
        return values.astype(np.uint16) * 257
    raise ValueError(f"cannot convert {values.dtype} samples to {dtype}")


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) as stored in the file's header, without decoding the pixels (no size bound)."""
    return read_image_info(path, max_decoded_bytes=None).size


def read_image_info(path: str | Path, max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES, *,
                    complete: bool = False) -> ImageInfo:
    """What decoding the file would allocate, from its header alone: the one header reader (the readers here,
    enhance, the app and the data scan all call it) and the one check before any decoding.

    ImageTooLargeError when `ImageInfo.decoded_bytes` exceeds `max_decoded_bytes` (None: no bound);
    ImageReadError naming the file for a header that cannot be read or a layout that the readers do not support
    (PNG colour type and bit depth; TIFF: photometric, samples per pixel, sample type, volumetric depth), so that
    such a file is never decoded. Pillow's own decompression-bomb limit applies to the JPEG header (and to
    decoding 8-bit PNG) as well.

    complete: also check, from the file's first and last bytes, that it is whole and in the format its extension
    names (a PNG ends with its IEND chunk; a JPEG starts with its start-of-image marker and ends with its
    end-of-image marker; a TIFF holds every strip it lists), and refuse what the two data loaders would decode
    differently (a JPEG colour mode other than gray, RGB or CMYK; a TIFF orientation tag other than 1): the data
    scan before training (lfpv_fast.data.images.read_header), which must find a bad file before the first step.
    """
    path, suffix = _checked_image_path(path)
    try:
        if suffix in TIFF_EXTENSIONS:
            return _tiff_info(path, max_decoded_bytes, complete)
        info = _png_info(path, complete) if suffix in PNG_EXTENSIONS else _pillow_info(path, complete)
    except (ImageReadError, FileNotFoundError):
        raise
    except PermissionError as exc:
        raise ImageReadError(f"{path}: cannot be read ({exc.strerror})") from None
    except Exception as exc:  # not an image, a truncated header, or over Pillow's decompression-bomb limit
        raise ImageReadError(f"{path}: could not read image: {exc}") from exc
    _check_decoded_size(path, info, max_decoded_bytes)
    return info


def _png_info(path: Path, complete: bool) -> ImageInfo:
    with open(path, "rb") as f:
        head = f.read(33)  # signature, IHDR chunk
        if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
            raise ImageReadError(f"{path}: could not read image: not a PNG file (no PNG signature and IHDR chunk)")
        width, height, depth, color_type = struct.unpack(">IIBB", head[16:26])
        if color_type not in _PNG_SAMPLES or depth not in (1, 2, 4, 8, 16):
            raise ImageReadError(f"{path}: invalid PNG header (bit depth {depth}, colour type {color_type})")
        orientation = _png_orientation(f)
        if complete:
            f.seek(0, os.SEEK_END)
            if f.tell() < 45:  # signature, IHDR, IEND
                raise ImageReadError(f"{path}: truncated PNG file ({f.tell()} bytes)")
            f.seek(-12, os.SEEK_END)
            if f.read(12) != _PNG_IEND:
                raise ImageReadError(f"{path}: truncated PNG file (it does not end with the IEND chunk)")
    # Palette and 1/2/4-bit gray decode to 8 bit.
    return ImageInfo(height, width, _PNG_SAMPLES[color_type], 2 if depth == 16 else 1, orientation=orientation)


def _png_orientation(f: io.BufferedReader) -> int:
    """The EXIF orientation of an eXIf chunk before the image data (1 if none); read from just past IHDR."""
    f.seek(33)
    while True:
        head = f.read(8)
        if len(head) < 8:
            return 1
        length, kind = struct.unpack(">I4s", head)
        if kind in (b"IDAT", b"IEND"):
            return 1
        if kind == b"eXIf":
            from PIL import Image

            exif = Image.Exif()
            exif.load(f.read(length))
            return int(exif.get(_ORIENTATION, 1) or 1)
        f.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC


def _check_decoded_size(path: Path, info: ImageInfo, max_decoded_bytes: int | None) -> None:
    if info.height < 1 or info.width < 1:
        raise ImageReadError(f"{path}: empty image ({info.width}x{info.height})")
    if max_decoded_bytes is not None and info.decoded_bytes > max_decoded_bytes:
        raise ImageTooLargeError(f"{path}: {info.describe()} would decode to {_mib(info.decoded_bytes)}, more than "
                                 f"the {_mib(max_decoded_bytes)} allowed; refused before decoding")
    # The bound is on memory: reading also holds the RGB and float32 copies (a small 16-bit gray PNG can decode
    # to 128 MiB and take 1.2 GiB to read).
    if max_decoded_bytes is not None and info.read_peak_bytes > max_decoded_bytes:
        raise ImageTooLargeError(f"{path}: {info.describe()} would decode to {_mib(info.decoded_bytes)} but take "
                                 f"{_mib(info.read_peak_bytes)} to read (with its RGB and float32 copies), more than "
                                 f"the {_mib(max_decoded_bytes)} allowed; refused before decoding")


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _pillow_info(path: Path, complete: bool) -> ImageInfo:
    """A JPEG file's header (or whatever Pillow reads under a .jpg name, unless `complete`)."""
    from PIL import Image

    if complete:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                raise ImageReadError(f"{path}: not a JPEG file (no start-of-image marker)")
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _JPEG_TAIL))
            if b"\xff\xd9" not in f.read():
                raise ImageReadError(f"{path}: truncated JPEG file (no end-of-image marker at the end)")
    with Image.open(path) as im:  # reads the markers up to the first scan, decodes nothing
        mode = im.mode
        if complete and im.format != "JPEG":
            raise ImageReadError(f"{path}: not a JPEG file (Pillow reads it as {im.format})")
        if complete and mode not in ("L", "RGB", "CMYK"):
            raise ImageReadError(f"{path}: unsupported JPEG colour mode {mode!r} (expected grayscale, RGB or CMYK)")
        if mode.startswith("I;16"):
            bytes_per_sample = 2
        elif mode in ("I", "F"):
            bytes_per_sample = 4
        else:
            bytes_per_sample = 1
        # "1" decodes to L, "P"/"PA" are expanded to RGB(A) and CMYK/YCbCr are converted to RGB: count the larger.
        samples = 4 if mode in ("P", "PA", "CMYK") else len(im.getbands())
        orientation = int(im.getexif().get(_ORIENTATION, 1) or 1)
        return ImageInfo(im.height, im.width, samples, bytes_per_sample, orientation=orientation)


def _tiff_info(path: Path, max_decoded_bytes: int | None, complete: bool) -> ImageInfo:
    """The first page's decoded size, bounded, then its layout checked (so an unsupported one is never decoded);
    `complete`: its orientation tag and that the file holds every strip it lists."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ImageReadError(f"{path}: TIFF file holds no image")
        page = tif.pages[0]
        info = ImageInfo(int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel),
                         max(1, -(-int(page.bitspersample) // 8)), int(page.imagedepth))
        _check_decoded_size(path, info, max_decoded_bytes)
        photometric = page.photometric.name if page.photometric is not None else "?"
        if photometric not in ("MINISBLACK", "RGB"):
            raise ImageReadError(f"{path}: unsupported TIFF photometric interpretation {photometric} "
                                 "(expected MINISBLACK grayscale or RGB)")
        if info.depth != 1:
            raise ImageReadError(f"{path}: a volumetric TIFF ({info.depth} planes) is not a supported image "
                                 "(expected one 2-D image)")
        if not 1 <= info.samples <= 4:
            raise ImageReadError(f"{path}: {info.samples} samples per pixel is not a supported image layout "
                                 "(expected 1 to 4: gray, gray+alpha, RGB or RGBA)")
        if page.dtype not in (np.uint8, np.uint16):
            raise ImageReadError(f"{path}: unsupported sample type {page.dtype} (expected 8- or 16-bit unsigned "
                                 "integers)")
        if complete:
            tag = page.tags.get(_ORIENTATION)
            if tag is not None and int(tag.value) != 1:
                # DALI's decoder applies it, tifffile (the torch loader) does not: refuse rather than differ.
                raise ImageReadError(f"{path}: TIFF orientation tag {int(tag.value)} is not supported (expected 1, "
                                     "top-left); save the image upright without the tag")
            size = path.stat().st_size
            end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)), default=0)
            if end > size:
                raise ImageReadError(f"{path}: truncated TIFF file ({size} bytes, its image data ends at byte {end})")
    return info
