"""The data layer's errors and the way its messages list names.

Every reader under lfpv_fast.data (SMID frames, image pairs, the prepared cache, name lists, the demo) raises
`DataError` for a file or folder that cannot be used; the message names it and what was expected. A run config
that names no data to read (a preset without data.root, `pairs` without a test split) is a `ConfigError`. The
command-line tools print either as one `error:` line (exit 2).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and the key.

    Defined here, below every config module, so that the data layer can raise it without importing the run config
    (`lfpv_fast.config` imports the data section, `lfpv_fast.data.config`); `lfpv_fast.config.ConfigError` is
    this class."""


class DataError(ValueError):
    """A dataset file or folder that cannot be used; the message names it and what was expected."""


def few(names: list[str], n: int = 5) -> str:
    """The first `n` of `names` for a message, and how many more there are ("none" for an empty list)."""
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
