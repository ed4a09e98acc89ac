"""`make demo`'s check of the index it installs torch from (PyTorch's CPU wheel index by default).

Prints `--index-url URL` when URL answers for torch within a few seconds. Otherwise it says on stderr why not
and that pip's default index is used instead, and prints nothing: a machine that cannot reach the index falls
back at once, where pip would retry each request for minutes before giving up.

    python3 bench/torch_index.py https://download.pytorch.org/whl/cpu

Standard library only: it runs in the Python that creates the venv, before anything is installed.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0


def unreachable_reason(index_url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when the index answers for torch's project page (`INDEX/torch/`, where pip looks) within
    timeout_s; otherwise why not, in a few words."""
    page = index_url.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(page, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        return f"{page} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # no route, refused, timed out, DNS, a malformed URL
        return f"{page}: {getattr(exc, 'reason', None) or exc}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 bench/torch_index.py INDEX_URL", file=sys.stderr)
        return 2
    index_url = argv[0]
    reason = unreachable_reason(index_url)
    if reason is None:
        print(f"--index-url {index_url}")
    else:
        print(f"make demo: cannot reach the torch index {index_url} ({reason}; waited {TIMEOUT_S:g} s at most): "
              "installing torch from pip's default index instead (on Linux x86_64 that is the CUDA build, a few "
              "GB with its own triton; DEMO_TORCH_INDEX=URL names another index)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
