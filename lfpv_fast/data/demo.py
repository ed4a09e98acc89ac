"""A small SMID-layout dataset built from photos shipped with scikit-image: no download needed.

    python -m lfpv_fast.data.demo --out DIR

Ground truths are real photos bundled inside the scikit-image package (astronaut, chelsea, coffee,
rocket, motorcycle_left), read from the package's own files with Pillow, so nothing goes through
scikit-image's downloader. Each photo gives three scenes: the whole photo and two zoomed crops
(`<photo>`, `<photo>_zoom1`, `<photo>_zoom2`), each a 4:3 crop resized (Lanczos) to 256 x 192.
That is 15 scenes; the three `coffee` scenes are the test scenes (a whole photo is held out, so no
crop of a test photo is seen in training), listed in `<root>/test_scenes.txt`.

Each scene has FRAMES low-light frames made from the ground truth by this model (float64, per pixel
and channel, `g` the GT in [0, 1]):

    x = g ** 2.2                                    # undo the display gamma: linear light
    e = e_scene * U(0.9, 1.1)                       # exposure: e_scene log-uniform in [0.01, 0.04]
    n = Poisson(x * e * FULL_WELL) + N(0, READ_NOISE)   # electrons: shot noise and read noise
    lq = round(255 * clip(n / FULL_WELL, 0, 1) ** (1 / 2.2))   # display gamma, uint8 quantization

so frames are dark (e is the fraction of the normal exposure) and noisy, like SMID's short
exposures, and differ from frame to frame only by exposure jitter and noise. The random numbers
come from numpy Generators seeded by (SEED, scene, frame): the dataset is deterministic.

Layout, as SMID (uint8 H x W x 3, BGR)::

    <root>/lq/<scene>/0000.npy ... 0005.npy
    <root>/gt/<scene>/long.npy
    <root>/test_scenes.txt
    <root>/manifest.json          written last: its presence means the dataset is complete

The dataset is written to a temporary sibling folder and renamed into place, so concurrent callers
(several DDP ranks) and interrupted runs never see a half-written dataset; when the manifest is
already there, nothing is done.

The same pairs as 8-bit RGB PNG files, in the LOL-v1 layout (dataset `demo_png`, written on first use
and by this command; a GT is repeated for each of its scene's frames so that pairs are one to one)::

    <root>/png/our485/low/<scene>_<frame>.png    training scenes
    <root>/png/our485/high/<scene>_<frame>.png
    <root>/png/eval15/low/<scene>_<frame>.png    test scenes
    <root>/png/eval15/high/<scene>_<frame>.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lfpv_fast.data.errors import DataError

FORMAT = "lfpv_fast.demo"
VERSION = 1
SIZE = (256, 192)  # stored width, height
PHOTOS = {  # name -> file inside the installed skimage.data package (shipped, not downloaded)
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}
TEST_PHOTOS = ("coffee",)
# View suffix -> (zoom, centre x, centre y), relative to the largest 4:3 box of the photo.
VIEWS = {"": (1.0, 0.5, 0.5), "_zoom1": (0.6, 0.35, 0.4), "_zoom2": (0.6, 0.65, 0.6)}
FRAMES = 6
SEED = 20250
EXPOSURE = (0.01, 0.04)
JITTER = 0.1
FULL_WELL = 2000.0  # electrons at full scale under normal exposure
READ_NOISE = 2.0  # electrons, standard deviation
GAMMA = 2.2


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    lq_root: Path
    gt_root: Path
    test_scenes: Path
    manifest: Path


def _paths(root: Path) -> DemoPaths:
    return DemoPaths(root, root / "lq", root / "gt", root / "test_scenes.txt", root / "manifest.json")


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as uint8 RGB, read from the package folder (no network)."""
    from PIL import Image

    try:
        folder = resources.files("skimage.data")
    except ModuleNotFoundError as exc:
        raise DataError("the demo dataset needs scikit-image installed (pip install scikit-image)") from exc
    path = folder / PHOTOS[name]
    try:
        with Image.open(str(path)) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise DataError(f"{path}: bundled photo cannot be read ({exc}); reinstall scikit-image") from exc


def view(photo: np.ndarray, zoom: float, cx: float, cy: float, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A zoomed 4:3 crop of `photo` centred near (cx, cy) (relative), resized to `size` (w, h)."""
    from PIL import Image

    h, w = photo.shape[:2]
    aspect = size[0] / size[1]
    bw, bh = (w, w / aspect) if w / h < aspect else (h * aspect, h)
    bw, bh = bw * zoom, bh * zoom
    x0 = min(max(cx * w - bw / 2, 0.0), w - bw)
    y0 = min(max(cy * h - bh / 2, 0.0), h - bh)
    im = Image.fromarray(photo).resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x0 + bw, y0 + bh))
    return np.asarray(im)


def darken(gt: np.ndarray, rng: np.random.Generator, exposure: float) -> np.ndarray:
    """One low-light frame of `gt` (uint8 RGB) by the model in the module docstring."""
    x = (gt.astype(np.float64) / 255.0) ** GAMMA
    e = exposure * rng.uniform(1 - JITTER, 1 + JITTER)
    electrons = rng.poisson(x * e * FULL_WELL) + rng.normal(0.0, READ_NOISE, size=x.shape)
    y = np.clip(electrons / FULL_WELL, 0.0, 1.0) ** (1 / GAMMA)
    return np.round(y * 255.0).astype(np.uint8)


def scene_names() -> list[str]:
    return [photo + suffix for photo in PHOTOS for suffix in VIEWS]


def _build(dst: Path) -> None:
    names = scene_names()
    test = [n for n in names if any(n == p or n.startswith(p + "_") for p in TEST_PHOTOS)]
    for si, photo in enumerate(PHOTOS):
        img = load_photo(photo)
        for vi, (suffix, (zoom, cx, cy)) in enumerate(VIEWS.items()):
            scene = photo + suffix
            gt = view(img, zoom, cx, cy)
            scene_index = si * len(VIEWS) + vi
            exposure = float(np.exp(np.random.default_rng([SEED, scene_index]).uniform(*np.log(EXPOSURE))))
            (dst / "gt" / scene).mkdir(parents=True)
            (dst / "lq" / scene).mkdir(parents=True)
            np.save(dst / "gt" / scene / "long.npy", np.ascontiguousarray(gt[:, :, ::-1]))  # stored BGR
            for k in range(FRAMES):
                lq = darken(gt, np.random.default_rng([SEED, scene_index, k]), exposure)
                np.save(dst / "lq" / scene / f"{k:04d}.npy", np.ascontiguousarray(lq[:, :, ::-1]))
    (dst / "test_scenes.txt").write_text("".join(f"{n}\n" for n in test))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "size": list(SIZE),
        "frames_per_scene": FRAMES,
        "scenes": names,
        "test_scenes": test,
        "photos": {p: f"skimage.data/{f}" for p, f in PHOTOS.items()},
        "low_light": {
            "seed": SEED,
            "exposure": list(EXPOSURE),
            "jitter": JITTER,
            "full_well": FULL_WELL,
            "read_noise": READ_NOISE,
            "gamma": GAMMA,
        },
    }
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _is_complete(paths: DemoPaths) -> bool:
    if not paths.manifest.is_file():
        return False
    try:
        doc = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("version") == VERSION


def make_demo_dataset(root: str | Path) -> DemoPaths:
    """Write the demo dataset into `root` unless it is already there; return its paths."""
    root = Path(root).expanduser()
    paths = _paths(root)
    if _is_complete(paths):
        return paths
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"demo root {root} exists but holds no complete demo dataset ({paths.manifest} missing or from "
            "another version); remove it or point data.demo_root elsewhere"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(tmp)
        try:
            os.rename(tmp, root)  # atomic; also replaces an empty folder
        except OSError:
            if not _is_complete(paths):  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def make_demo_png(root: str | Path) -> Path:
    """The demo dataset as PNG pairs in the LOL-v1 layout under `root`/png (written once); returns that folder."""
    from PIL import Image

    paths = make_demo_dataset(root)
    png = paths.root / "png"
    if png.is_dir():  # renamed into place only when complete
        return png
    test = set(paths.test_scenes.read_text().split())
    tmp = paths.root / f".png.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for scene_dir in sorted(p for p in paths.lq_root.iterdir() if p.is_dir()):
            split = "eval15" if scene_dir.name in test else "our485"
            gt = np.load(paths.gt_root / scene_dir.name / "long.npy")[:, :, ::-1]  # stored BGR
            for side in ("low", "high"):
                (tmp / split / side).mkdir(parents=True, exist_ok=True)
            for frame in sorted(scene_dir.glob("*.npy")):
                name = f"{scene_dir.name}_{frame.stem}.png"
                Image.fromarray(np.load(frame)[:, :, ::-1]).save(tmp / split / "low" / name)
                Image.fromarray(gt).save(tmp / split / "high" / name)
        try:
            os.rename(tmp, png)
        except OSError:
            if not png.is_dir():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return png


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lfpv_fast.data.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="~/.cache/lfpv_fast/demo", help="dataset folder (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = make_demo_dataset(args.out)
        png = make_demo_png(args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = json.loads(paths.manifest.read_text())
    print(
        f"demo dataset at {paths.root}: {len(doc['scenes'])} scenes ({len(doc['test_scenes'])} for testing, "
        f"listed in {paths.test_scenes}), {doc['frames_per_scene']} frames each, {SIZE[0]}x{SIZE[1]}; "
        f"as PNG pairs in the LOL-v1 layout in {png}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
