"""Name-list files: SMID test-scene lists and the held-out image lists of `pairs` (data.test_list)."""

from __future__ import annotations

from pathlib import Path

from lfpv_fast.data.errors import DataError


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
