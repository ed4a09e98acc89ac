"""A small SMID-layout dataset built from photos shipped with scikit-image: no download needed.

    python -m lfpv_fast.data.demo --out DIR

Ground truths are real photos bundled inside the scikit-image package (astronaut, chelsea, coffee,
rocket, motorcycle_left), read from the package's own files with Pillow, so nothing goes through
scikit-image's downloader. Each photo gives three scenes: the whole photo and two zoomed crops
(`<photo>`, `<photo>_zoom1`, `<photo>_zoom2`), each a 4:3 crop resized (Lanczos) to 256 x 192.
That is 15 scenes; the three `coffee` scenes are the test scenes (a whole photo is held out, so no
crop of a test photo is seen in training), listed in `<root>/test_scenes.txt`.

Each scene has FRAMES = 6 low-light frames made from the ground truth by this model (float64, per pixel
and channel, `g` the GT in [0, 1]):

    x = g ** 2.2                                    # undo the display gamma: linear light
    n = Poisson(x * e * photons) + N(0, read_noise) # electrons: shot noise and read noise
    lq = round(255 * clip(n / photons, 0, 1) ** (1 / 2.2))   # display gamma, uint8 quantization

with three numbers drawn afresh for every frame:

    e           exposure, the fraction of the normal exposure: log-uniform within the frame's band
    photons     electrons at full scale under normal exposure (the sensor's ISO): log-uniform in [1000, 8000]
    read_noise  electrons, standard deviation: uniform in [1, 4]

The exposures span 0.01 to 0.3 (6.6 to 1.7 stops under), in three bands (BANDS):

    band        exposure        on a display (mid-grey 0.5 becomes)
    0.01-0.03   [0.01, 0.03)    0.06 - 0.10   nearly black, like SMID's and LOL's short exposures
    0.03-0.1    [0.03, 0.1)     0.10 - 0.18   dark
    0.1-0.3     [0.1, 0.3]      0.18 - 0.29   dim, like a photo taken indoors without flash

Frame k of every scene is in band k mod 3, so every scene, held-out ones included, has two frames in each
band (stratified), and validation reports PSNR per band (`frame_bands`). The noise ranges are independent
of the band: a dim frame can be noisy (few photons) and a dark one clean. A range of levels rather than one
is what LOL's synthetic pairs (LOL-v2 "Synthetic") have too: RAW photos (RAISE) darkened in Adobe
Lightroom with settings chosen so that their brightness (Y channel) histogram matches that of real
low-light photos (Wei et al., BMVC 2018, section 3). Trained on one level, a model learns one gain and
blows out photos that are only a little dark. The random numbers come from
numpy Generators seeded by (SEED, scene, frame): the dataset is deterministic. The manifest records each
frame's band, exposure, photons and read noise.

Layout, as SMID (uint8 H x W x 3, BGR)::

    <root>/lq/<scene>/0000.npy ... 0005.npy
    <root>/gt/<scene>/long.npy
    <root>/test_scenes.txt
    <root>/manifest.json          written last: its presence means the dataset is complete

The dataset is written to a temporary sibling folder and renamed into place, so concurrent callers
(several DDP ranks) and interrupted runs never see a half-written dataset; when the manifest is
already there, nothing is done, and a dataset of an earlier VERSION is replaced.

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
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lfpv_fast.data.errors import DataError

FORMAT = "lfpv_fast.demo"
VERSION = 2  # 2: exposure bands and per-frame noise (1: one exposure per scene, 0.01-0.04)
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
# Exposure bands (fraction of the normal exposure, linear light); frame k of a scene is in band k % len(BANDS).
BANDS = {"0.01-0.03": (0.01, 0.03), "0.03-0.1": (0.03, 0.1), "0.1-0.3": (0.1, 0.3)}
PHOTONS = (1000.0, 8000.0)  # electrons at full scale under normal exposure, log-uniform per frame
READ_NOISE = (1.0, 4.0)  # electrons, standard deviation, uniform per frame
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


@dataclass(frozen=True)
class FrameSettings:
    """How one low-light frame is made: its band and the numbers drawn for it."""

    band: str
    exposure: float
    photons: float
    read_noise: float


def frame_settings(rng: np.random.Generator, frame: int) -> FrameSettings:
    """Band `frame % len(BANDS)`; exposure, photons and read noise drawn from `rng` in their ranges."""
    band = list(BANDS)[frame % len(BANDS)]
    exposure = float(np.exp(rng.uniform(*np.log(BANDS[band]))))
    photons = float(np.exp(rng.uniform(*np.log(PHOTONS))))
    read_noise = float(rng.uniform(*READ_NOISE))
    return FrameSettings(band, exposure, photons, read_noise)


def darken(gt: np.ndarray, rng: np.random.Generator, settings: FrameSettings) -> np.ndarray:
    """One low-light frame of `gt` (uint8 RGB) by the model in the module docstring."""
    x = (gt.astype(np.float64) / 255.0) ** GAMMA
    photons = settings.photons
    electrons = rng.poisson(x * settings.exposure * photons) + rng.normal(0.0, settings.read_noise, size=x.shape)
    y = np.clip(electrons / photons, 0.0, 1.0) ** (1 / GAMMA)
    return np.round(y * 255.0).astype(np.uint8)


def scene_names() -> list[str]:
    return [photo + suffix for photo in PHOTOS for suffix in VIEWS]


def _build(dst: Path) -> None:
    names = scene_names()
    test = [n for n in names if any(n == p or n.startswith(p + "_") for p in TEST_PHOTOS)]
    frames: dict[str, list[dict[str, str | float]]] = {}
    for si, photo in enumerate(PHOTOS):
        img = load_photo(photo)
        for vi, (suffix, (zoom, cx, cy)) in enumerate(VIEWS.items()):
            scene = photo + suffix
            gt = view(img, zoom, cx, cy)
            scene_index = si * len(VIEWS) + vi
            (dst / "gt" / scene).mkdir(parents=True)
            (dst / "lq" / scene).mkdir(parents=True)
            np.save(dst / "gt" / scene / "long.npy", np.ascontiguousarray(gt[:, :, ::-1]))  # stored BGR
            frames[scene] = []
            for k in range(FRAMES):
                rng = np.random.default_rng([SEED, scene_index, k])
                settings = frame_settings(rng, k)
                lq = darken(gt, rng, settings)
                np.save(dst / "lq" / scene / f"{k:04d}.npy", np.ascontiguousarray(lq[:, :, ::-1]))
                frames[scene].append({"frame": f"{k:04d}", **asdict(settings)})
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
            "bands": {name: list(edges) for name, edges in BANDS.items()},
            "photons": list(PHOTONS),
            "read_noise": list(READ_NOISE),
            "gamma": GAMMA,
        },
        "frames": frames,
    }
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _manifest(paths: DemoPaths) -> dict | None:
    """The manifest of a demo dataset (any version), or None when there is none or it is not ours."""
    try:
        doc = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def _is_complete(paths: DemoPaths) -> bool:
    doc = _manifest(paths)
    return doc is not None and doc.get("version") == VERSION


def dataset_is_current(root: str | Path) -> bool:
    """Whether `root` holds the demo dataset of this version (then make_demo_dataset does nothing)."""
    return _is_complete(_paths(Path(root).expanduser()))


def make_demo_dataset(root: str | Path) -> DemoPaths:
    """Write the demo dataset into `root` unless it is already there; return its paths.

    A demo dataset of an earlier version (another low-light model) is replaced: it is a cache of ours.
    """
    root = Path(root).expanduser()
    paths = _paths(root)
    if _is_complete(paths):
        return paths
    outdated = _manifest(paths) is not None
    if not outdated and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"demo root {root} exists but holds no complete demo dataset ({paths.manifest} missing or not "
            "a demo manifest); remove it or point data.demo_root elsewhere"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(tmp)
        if outdated and not _is_complete(paths):  # (not replaced by another process meanwhile)
            os.rename(root, old)
        try:
            os.rename(tmp, root)  # atomic; also replaces an empty folder
        except OSError:
            if not _is_complete(paths):  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return paths


def frame_bands(root: str | Path) -> dict[str, str]:
    """The exposure band of every frame of the demo dataset at `root`, by image name `<scene>_<frame>` (the
    demo's pairs and the PNG files' stems), in the order of BANDS then name."""
    doc = json.loads(_paths(Path(root).expanduser()).manifest.read_text())
    bands = {f"{scene}_{f['frame']}": f["band"] for scene, frames in doc["frames"].items() for f in frames}
    order = list(BANDS)
    return dict(sorted(bands.items(), key=lambda kv: (order.index(kv[1]), kv[0])))


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
