"""What the command-line tools (train, evaluate, enhance, prepare) share: one error convention.

A usage or input error prints one line, `error: <what is wrong, naming the flag, key, file or value>`, on
stderr and exits with status 2, before anything is written. Status 1 is left for failures during the work
(a non-finite loss, images that could not be enhanced).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import NoReturn

import torch

# The longest error line printed: what a message quotes is cut where it is made (lfpv_fast.config.quote); this
# is the last guard, for a message that quotes something long that nobody cut (a path, a library's text).
MAX_ERROR_CHARS = 1000


def one_line(message: str) -> str:
    """The message on one line (line breaks become " | "), its middle cut when longer than MAX_ERROR_CHARS."""
    text = " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if len(text) <= MAX_ERROR_CHARS:
        return text
    head, tail = MAX_ERROR_CHARS * 3 // 4, MAX_ERROR_CHARS // 4
    return f"{text[:head]} [... {len(text) - head - tail} characters cut ...] {text[-tail:]}"


# Paths quoted in error messages are cut to this many characters (their start and their end are kept).
MAX_PATH_CHARS = 160


def cut_path(path: object) -> str:
    """A path for an error message: as given (undecodable bytes escaped), its middle cut when it is long."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # surrogates of a non-UTF-8 name
    if len(text) <= MAX_PATH_CHARS:
        return text
    return f"{text[:MAX_PATH_CHARS // 2]}...[{len(text)} characters]...{text[-MAX_PATH_CHARS // 3:]}"


def os_error_line(exc: OSError, what: str = "") -> str:
    """One line for an OSError about a file: `<what> <path>: <why>`, the path cut; a name too long for the file
    system says which limit it passed."""
    name = exc.filename if exc.filename is not None else ""
    shown = f"{what} {cut_path(name)}".strip()
    if exc.errno == errno.ENAMETOOLONG and name:
        text = os.fsdecode(name)
        longest = max((len(os.fsencode(part)) for part in text.split(os.sep)), default=0)
        return (f"{shown}: the name is too long for the file system ({len(os.fsencode(text))} bytes in all, "
                f"{longest} in its longest part; the usual limits are 4096 and 255)")
    return f"{shown}: {exc.strerror or exc}" if shown else one_line(str(exc))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's convention: a usage error is one `error:` line and status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def fail(message: str) -> int:
    """Print `error: message` on stderr, as one line of bounded length; returns the exit status of an input
    error, 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA if there is one), cpu, cuda, cuda:N. ValueError for a name that cannot be used here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name (expected auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible to torch {torch.__version__} here "
                             "(use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device
