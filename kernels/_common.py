"""Shared helpers of the Triton kernels: output allocation, launch counting, dtype rules."""

from __future__ import annotations

import os
from collections import Counter

import torch

# Number of kernel launches per kernel name since the last reset (eager calls only; under
# torch.compile the launches happen inside the compiled graph and are counted with the profiler).
LAUNCHES: Counter[str] = Counter()

# Tests set this to True so that every output starts as NaN: an element a kernel fails to write
# then shows up as a mismatch instead of passing by luck with stale memory.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def reset_launches() -> None:
    LAUNCHES.clear()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64 (exact under the interpreter); others in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
