"""Paired image folders (LOL-v1, LOL-v2, any low/high folders): listing, pairing, the header scan, presets.

Pairing. A dataset is an LQ folder (low-light inputs) and a GT folder (ground truths), searched recursively.
An LQ file `<dir>/<lq_prefix><key><lq_suffix>.<ext>` pairs with the GT file `<dir>/<gt_prefix><key><gt_suffix>.<ext>`
of the same relative folder `<dir>` and the same key; the extensions may differ (`.png`, `.jpg`, `.jpeg`, `.tif`,
`.tiff`, any case). Names starting with "." (`.DS_Store`, macOS `._12.png` resource files, `.thumbnails/`)
are ignored; every other file must be an image of one pair.

Header scan. Before any training, every file of a split is checked from its header and its last bytes by the
one header reader (`lfpv_fast.io.imageio.read_image_info`), without decoding the pixels (about a millisecond a
file): the format matches the extension, the file is not truncated (a PNG ends with its IEND chunk, a JPEG with
its end-of-image marker, a TIFF holds every strip it lists), the size (after EXIF orientation) and the bit depth.
Then: each LQ file has a GT partner and the reverse, the two have the same size, and all files of one side of a
split have the same bit depth (8 or 16; a PNG with a palette or 1/2/4-bit gray decodes to 8 bit). A file that
fails is an error naming it, or with `skip_bad` a warning, and its pair is left out.

Presets (`data.root` is the folder of the dataset; folder names match in any case). Each accepts the layouts
that the well-known low-light codebases use (its entry's `layouts` in `lfpv_fast.data.config.DATASETS`, from the
tuples below), finds which one is on disk and says so:

    lol_v1            our485/low, our485/high (train); eval15/low, eval15/high (test); same names
                      (LOL as distributed; SNR-Aware's LOLv1)
                   or Train/input, Train/target; Test/input, Test/target; same names (Retinexformer's LOL_v1)
    lol_v2_real       Train/Low, Train/Normal; Test/Low, Test/Normal; low00001.png <-> normal00001.png
                      (LOL-v2 Real_captured as distributed; SNR-Aware)
                   or the same folders with the same name on both sides, 00001.png <-> 00001.png (Retinexformer's)
    lol_v2_synthetic  Train/Low, Train/Normal; Test/Low, Test/Normal; same names (as distributed; both codebases)

Where layouts share their folders they differ in their file names: the one that pairs the most files is taken.
BasicSR-style paired folders (any two folders, the same name on both sides, e.g. lq/ and gt/) are dataset `pairs`.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lfpv_fast.data.errors import DataError, few
from lfpv_fast.data.lists import read_name_list
from lfpv_fast.io.imageio import IMAGE_EXTENSIONS, ImageReadError, read_image_info


@dataclass(frozen=True)
class ImageHeader:
    width: int  # as decoded: after EXIF orientation
    height: int
    bits: int  # 8 or 16: the sample depth the decoders give


@dataclass(frozen=True)
class Naming:
    """How file names map to pair keys: <prefix><key><suffix>.<ext> on each side."""

    lq_prefix: str = ""
    lq_suffix: str = ""
    gt_prefix: str = ""
    gt_suffix: str = ""

    def describe(self) -> str:
        """The form of the names, for messages and the log line."""
        if self == Naming():
            return "the same name on both sides (<key>.<ext>)"
        return (f"{self.lq_prefix}<key>{self.lq_suffix}.<ext> with {self.gt_prefix}<key>{self.gt_suffix}.<ext>")


@dataclass(frozen=True)
class Layout:
    """A preset's layout: the (LQ, GT) folders of each split relative to data.root, the file naming, whose it is."""

    train: tuple[str, str]
    test: tuple[str, str]
    naming: Naming = Naming()
    name: str = ""

    def folders(self, split: str) -> tuple[str, str]:
        return self.train if split == "train" else self.test


_LOL_V2 = (("Train/Low", "Train/Normal"), ("Test/Low", "Test/Normal"))

# Every layout of a dataset that the presets accept, the dataset as distributed first (on a tie it is the one
# taken). Which preset reads which: its entry in lfpv_fast.data.config.DATASETS.
LOL_V1_LAYOUTS = (
    Layout(("our485/low", "our485/high"), ("eval15/low", "eval15/high"), name="LOL as distributed, SNR-Aware's LOLv1"),
    Layout(("Train/input", "Train/target"), ("Test/input", "Test/target"), name="Retinexformer's LOL_v1"),
)
LOL_V2_REAL_LAYOUTS = (
    Layout(*_LOL_V2, Naming(lq_prefix="low", gt_prefix="normal"),
           name="LOL-v2 Real_captured as distributed, SNR-Aware's"),
    Layout(*_LOL_V2, name="Retinexformer's LOLv2 Real_captured, renamed to the same name on both sides"),
)
LOL_V2_SYNTHETIC_LAYOUTS = (
    Layout(*_LOL_V2, name="LOL-v2 Synthetic as distributed, SNR-Aware's and Retinexformer's"),
)


@dataclass(frozen=True)
class ImagePair:
    rel_dir: str  # folder relative to the split's roots, posix ("" at the top)
    lq: Path
    gt: Path
    lq_header: ImageHeader
    gt_header: ImageHeader

    @property
    def stem(self) -> str:
        return self.lq.name[: -len(self.lq.suffix)]


# ---------------------------------------------------------------------------------------------
# Header scan


def read_header(path: str | Path) -> ImageHeader:
    """Size (as decoded) and bit depth of an image file from its header, and a check that it is complete, by the
    one header reader (`lfpv_fast.io.imageio.read_image_info`, with its decoded-size bound); DataError if not."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{path}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    try:
        info = read_image_info(path, complete=True)
    except ImageReadError as exc:  # the message names the file
        raise DataError(str(exc)) from None
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    height, width = info.oriented_size
    return ImageHeader(width, height, info.bits)


# ---------------------------------------------------------------------------------------------
# Problems: collected over a whole split, then one error or one warning each


class Problems:
    """Bad files found while scanning a split: (path, what is wrong)."""

    def __init__(self) -> None:
        self.items: list[tuple[Path, str]] = []

    def add(self, path: Path, why: str) -> None:
        self.items.append((path, why))

    def resolve(self, skip_bad: bool, what: str) -> None:
        """Raise one DataError for all problems, or (skip_bad) warn about each."""
        if not self.items:
            return
        if skip_bad:
            for path, why in self.items:
                warnings.warn(f"skipping {path}: {why} (data.skip_bad=true)", stacklevel=3)
            return
        path, why = self.items[0]
        more = ""
        if len(self.items) > 1:
            others = [str(p) for p, _ in self.items[1:]]
            more = f"; {len(others)} more bad file(s) in the {what}: {few(others, 3)}"
        raise DataError(f"{path}: {why}{more}. Fix or remove the file(s), or set data.skip_bad=true to leave them "
                        "out with a warning")


# ---------------------------------------------------------------------------------------------
# Listing and pairing


def _check_folder(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder")


def _image_files(root: Path) -> list[tuple[str, Path]]:
    """(relative folder, path) of the files under `root` that are not hidden, in sorted order."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=True):  # datasets are often assembled from links
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(folder).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        out += [(rel_dir, Path(folder) / name) for name in sorted(files) if not name.startswith(".")]
    return out


def _key(path: Path, prefix: str, suffix: str) -> str | None:
    """The pair key of an image file's name <prefix><key><suffix>.<ext>, or None when it has another form."""
    stem = path.name[: -len(path.suffix)]
    if stem.startswith(prefix) and stem.endswith(suffix) and len(stem) > len(prefix) + len(suffix):
        return stem[len(prefix): len(stem) - len(suffix)]
    return None


def _list_side(root: Path, prefix: str, suffix: str, rule: str, what: str,
               problems: Problems) -> dict[tuple[str, str], Path]:
    """{(relative folder, key): path} of one side's images; bad names go to `problems`."""
    _check_folder(root, what)
    found: dict[tuple[str, str], Path] = {}
    others, misnamed = 0, []
    for rel_dir, path in _image_files(root):
        ext = path.suffix.lower()
        if ext not in IMAGE_EXTENSIONS:
            others += 1
            problems.add(path, f"not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            continue
        key = _key(path, prefix, suffix)
        if key is None:
            misnamed.append(path)
            problems.add(path, f"the name does not have the form {prefix}<key>{suffix}{ext} that {rule} asks for")
            continue
        if (rel_dir, key) in found:
            problems.add(path, f"a second file for the image {found[(rel_dir, key)]} (same name, another "
                               "extension)")
            continue
        found[(rel_dir, key)] = path
    if not found and misnamed:
        raise DataError(f"{what} {root} holds {len(misnamed)} image(s) but none named {prefix}<key>{suffix}.<ext> as "
                        f"{rule} asks, e.g. {misnamed[0]}")
    if not found:
        extra = f" ({others} other file(s))" if others else ""
        raise DataError(f"{what} {root} holds no images{extra}: expected PNG, JPEG or TIFF files")
    return found


def _expected(root: Path, rel_dir: str, prefix: str, key: str, suffix: str) -> str:
    return str(root / rel_dir / f"{prefix}{key}{suffix}") + ".<png|jpg|tif>"


def scan_pairs(lq_root: str | Path, gt_root: str | Path, naming: Naming = Naming(), skip_bad: bool = False,
               what: str = "split", rule: str | None = None) -> list[ImagePair]:
    """Every pair of two folders, header-checked, in the order of the LQ relative paths.

    `rule` says in messages where the naming comes from (default: the data.*_prefix/suffix keys)."""
    lq_root, gt_root = Path(lq_root).expanduser(), Path(gt_root).expanduser()
    problems = Problems()
    lq_rule = rule or f"data.lq_prefix={naming.lq_prefix!r} and data.lq_suffix={naming.lq_suffix!r}"
    gt_rule = rule or f"data.gt_prefix={naming.gt_prefix!r} and data.gt_suffix={naming.gt_suffix!r}"
    lq = _list_side(lq_root, naming.lq_prefix, naming.lq_suffix, lq_rule, f"LQ folder of the {what}", problems)
    gt = _list_side(gt_root, naming.gt_prefix, naming.gt_suffix, gt_rule, f"GT folder of the {what}", problems)
    for rel_dir, key in sorted(set(lq) - set(gt)):
        problems.add(lq[(rel_dir, key)], "no ground truth: expected "
                     + _expected(gt_root, rel_dir, naming.gt_prefix, key, naming.gt_suffix))
    for rel_dir, key in sorted(set(gt) - set(lq)):
        problems.add(gt[(rel_dir, key)], "no low-light partner: expected "
                     + _expected(lq_root, rel_dir, naming.lq_prefix, key, naming.lq_suffix))
    pairs: list[ImagePair] = []
    for k in sorted(set(lq) & set(gt), key=lambda k: str(lq[k].relative_to(lq_root))):
        headers = []
        for path in (lq[k], gt[k]):
            try:
                headers.append(read_header(path))
            except DataError as exc:
                problems.add(path, str(exc).removeprefix(f"{path}: "))
        if len(headers) < 2:
            continue
        a, b = headers
        if (a.width, a.height) != (b.width, b.height):
            problems.add(lq[k], f"{a.width}x{a.height} but its ground truth {gt[k]} is {b.width}x{b.height}")
            continue
        pairs.append(ImagePair(k[0], lq[k], gt[k], a, b))
    # One bit depth per side: a 16-bit file among 8-bit ones is most likely a mistake (and the decoders are set
    # up once per side). The majority depth is the expected one.
    bad: set[Path] = set()
    for side in ("lq", "gt"):
        depths = Counter(getattr(p, f"{side}_header").bits for p in pairs)
        if len(depths) > 1:
            expected = max(sorted(depths), key=lambda d: depths[d])
            for p in pairs:
                h = getattr(p, f"{side}_header")
                if h.bits != expected:
                    path = getattr(p, side)
                    problems.add(path, f"{h.bits}-bit image among {depths[expected]} {expected}-bit ones in the "
                                       f"{side.upper()} folder; convert it to {expected} bit")
                    bad.add(path)
    pairs = [p for p in pairs if p.lq not in bad and p.gt not in bad]
    problems.resolve(skip_bad, what)
    if not pairs:
        raise DataError(f"the {what} ({lq_root} with {gt_root}) has no usable image pairs")
    return pairs


def split_by_list(pairs: list[ImagePair], lq_root: Path, list_file: Path) -> tuple[list[ImagePair], list[ImagePair]]:
    """(train, test): the pairs whose LQ path (relative to lq_root, with or without extension) is listed are test."""
    wanted = read_name_list(list_file, "test list", "images")
    index: dict[str, int] = {}
    for i, p in enumerate(pairs):
        rel = p.lq.relative_to(lq_root).as_posix()
        index[rel] = index[rel[: -len(p.lq.suffix)]] = i
    unknown = [w for w in wanted if w not in index]
    if unknown:
        raise DataError(f"test list {list_file} names images that are not pairs of {lq_root}: {few(unknown)} "
                        "(expected LQ paths relative to data.lq_root, e.g. 12.png)")
    test = sorted({index[w] for w in wanted})
    held = set(test)
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in test]


# ---------------------------------------------------------------------------------------------
# Presets


def _find_folder(root: Path, rel: str) -> Path | None:
    """root/rel with each part matched exactly, or else in any case when that is unambiguous."""
    folder = root
    for part in rel.split("/"):
        exact = folder / part
        if exact.is_dir():
            folder = exact
            continue
        try:
            matches = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == part.lower()]
        except OSError:
            return None
        if len(matches) != 1:
            return None
        folder = matches[0]
    return folder


@dataclass(frozen=True)
class FoundLayout:
    """The layout of a preset found under data.root for one split."""

    preset: str
    root: Path
    layout: Layout
    lq: Path
    gt: Path

    @property
    def naming(self) -> Naming:
        return self.layout.naming

    @property
    def rule(self) -> str:
        """Where the naming comes from, for messages about names."""
        return f"the {self.preset} layout found in {self.root} ({self.layout.name})"

    def describe(self) -> str:
        return (f"{self.preset} in {self.root}: {self.layout.name}; {self.lq.relative_to(self.root).as_posix()} with "
                f"{self.gt.relative_to(self.root).as_posix()}, {self.naming.describe()}")


def _pairing_keys(folder: Path, prefix: str, suffix: str) -> set[tuple[str, str]]:
    keys = set()
    for rel_dir, path in _image_files(folder):
        key = _key(path, prefix, suffix) if path.suffix.lower() in IMAGE_EXTENSIONS else None
        if key is not None:
            keys.add((rel_dir, key))
    return keys


def _pair_count(found: FoundLayout) -> int:
    """How many files the layout's naming pairs in its folders (a listing; no file is opened)."""
    n = found.naming
    return len(_pairing_keys(found.lq, n.lq_prefix, n.lq_suffix) & _pairing_keys(found.gt, n.gt_prefix, n.gt_suffix))


def find_layout(name: str, layouts: tuple[Layout, ...], root: str | Path, split: str) -> FoundLayout:
    """Which of the preset `name`'s `layouts` is under `root`, with the folders of `split`.

    Layouts whose folders are there are told apart by their file names: the one that pairs the most files wins
    (the first listed on a tie). A DataError names what was expected when no layout fits."""
    root = Path(root).expanduser()
    _check_folder(root, f"data.root of dataset {name!r}:")
    candidates = []
    for layout in layouts:
        lq, gt = (_find_folder(root, rel) for rel in layout.folders(split))
        if lq is not None and gt is not None:
            candidates.append(FoundLayout(name, root, layout, lq, gt))
    if not candidates:
        raise _no_layout(name, layouts, root)
    if len(candidates) == 1:
        return candidates[0]
    counts = [_pair_count(c) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (counts[i], -i))
    if counts[best] == 0:
        first = candidates[0]
        lq_files = [p for _, p in _image_files(first.lq) if p.suffix.lower() in IMAGE_EXTENSIONS]
        gt_files = [p for _, p in _image_files(first.gt) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if lq_files and gt_files:  # (an empty folder is reported by the scan, naming it)
            forms = " or ".join(f"{c.naming.describe()} ({c.layout.name})" for c in candidates)
            raise DataError(f"{first.lq} and {first.gt} hold no pair of images in any layout of {name}: expected "
                            f"{forms}; e.g. {lq_files[0]} has no partner")
    return candidates[best]


def _no_layout(name: str, layouts: tuple[Layout, ...], root: Path) -> DataError:
    """The error for a data.root that holds none of the preset's layouts: what was expected, what is there."""
    shapes = []
    folder_sets = list(dict.fromkeys((lay.train, lay.test) for lay in layouts))  # layouts that share folders once
    for folders in folder_sets:
        text = ", ".join(f"{a} and {b}" for a, b in folders)
        if len(folder_sets) > 1:
            text += f" ({'; '.join(lay.name for lay in layouts if (lay.train, lay.test) == folders)})"
        shapes.append(text)
    wanted = " or ".join(shapes)
    try:
        here = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    except OSError:
        here = []
    hint = ""
    for candidate in _nearby(root):
        if any(all(_find_folder(candidate, rel) for rel in (*lay.train, *lay.test)) for lay in layouts):
            hint = f"; did you mean data.root={candidate}?"
            break
    return DataError(f"data.root {root} does not have the {name} layout: expected the folders {wanted} "
                     f"(found: {few(here)}){hint}")


def _nearby(root: Path, depth: int = 2) -> list[Path]:
    """Sub-folders of root up to `depth` levels down (for a hint when data.root is a level too high)."""
    out, level = [], [root]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                nxt += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                pass
        out += nxt
        level = nxt
    return out
