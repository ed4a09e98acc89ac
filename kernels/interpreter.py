"""Whether Triton runs under its CPU interpreter. Imports no Triton, so that lfpv_fast.backends can ask
before (or without) importing the kernels."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
