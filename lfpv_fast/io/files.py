"""Atomic file writes with the usual permissions, shared by checkpoints, run files and enhanced images.

A write goes to a temporary file in the target's folder, is fsync'ed and renamed over the target, so a crash
(even kill -9) leaves either the old file or the new one, never a torn one. The file gets the mode that
open() would give it (0666 minus the umask), not mkstemp's private 0600.

The rule of every tool for a write that fails during the work (a disk that fills up, a folder that turned
read-only): `write_output` raises OutputWriteError, one line naming the file and why, with no partial file
left; the tools print it as their `error:` line (after any results they have) and exit with status 1.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def default_file_mode() -> int:
    """0666 minus the umask: what open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, give it the usual mode, rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class OutputWriteError(OSError):
    """A file of the work could not be written (a full disk, a read-only folder); the message is one line naming
    the file and why, and no partial file is left behind. The tools exit with status 1 on it."""


def write_output(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """atomic_write, with a failure to write raised as OutputWriteError naming the file."""
    try:
        atomic_write(path, write)
    except OutputWriteError:
        raise
    except OSError as exc:
        error = OutputWriteError(f"could not write {path}: {exc.strerror or exc} (no partial file was left)")
        error.errno = exc.errno  # str(error) stays the message alone
        raise error from exc


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
