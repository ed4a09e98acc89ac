"""The data layer's error and the way its messages list names.

Every reader under lfpv_fast.data (SMID frames, image pairs, the prepared cache, name lists, the demo) raises
`DataError` for a file or folder that cannot be used; the message names it and what was expected. The
command-line tools print it as one `error:` line (exit 2).
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file or folder that cannot be used; the message names it and what was expected."""


def few(names: list[str], n: int = 5) -> str:
    """The first `n` of `names` for a message, and how many more there are ("none" for an empty list)."""
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
