"""Name-list files: SMID test-scene lists and the held-out image lists of `pairs` (data.test_list), and where
the files a config names are found (a path, or a file shipped in the packaged configs/)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lfpv_fast.data.errors import ConfigError, DataError


def configs_dir() -> Path:
    """The folder of the packaged configs and lists (the repository's `configs/`)."""
    return Path(str(resources.files("lfpv_fast.configs")))


def resolve_data_file(name: str) -> Path:
    """A data file named in the config: a path, or a file shipped in configs/."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    packaged = configs_dir() / p.name
    if packaged.is_file():
        return packaged
    raise ConfigError(f"file {name!r} named in the config does not exist")


def read_name_list(path: str | Path, what: str = "test-scene list", items: str = "scenes") -> list[str]:
    """A list file: one name a line; blank lines and `#` comments are ignored. Errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot be read ({exc})") from exc
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{what} {path} names no {items}")
    return names
