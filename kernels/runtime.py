"""Where the Triton kernels run, answered without importing Triton (so that lfpv_fast.ops.backends can ask
before, or without, importing the kernels: importing Triton fixes whether it interprets for the rest of
the process).

The one home of two rules: whether Triton runs under its CPU interpreter (the only reader of
TRITON_INTERPRET), and when the kernels take CPU tensors at all (`takes_cpu_tensors`).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any

# Set by kernels._common.record_launches: the list that launches are recorded into, or None.
RECORDING: ContextVar[list[Any] | None] = ContextVar("lfpv_triton_recording", default=None)


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def recording_launches() -> bool:
    """True inside kernels._common.record_launches: launches are recorded (the compile gate), not run."""
    return RECORDING.get() is not None


def takes_cpu_tensors() -> bool:
    """Whether the Triton kernels accept CPU tensors here: only under the interpreter, or while the compile
    gate records their launches on fake CPU tensors. Everywhere else they need CUDA tensors."""
    return interpreting() or recording_launches()
