"""Choosing the op implementations: the eager reference twins or the Triton kernels."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from lfpv_fast import cpu_ops, reference


def triton_interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_recording_launches = False


@contextlib.contextmanager
def recording_triton_launches() -> Iterator[None]:
    """While the kernels record their launches instead of running them (the compile gate, on fake
    tensors), backend="triton" accepts CPU tensors. Use lfpv_fast.kernels._common.record_launches."""
    global _recording_launches
    previous, _recording_launches = _recording_launches, True
    try:
        yield
    finally:
        _recording_launches = previous


def triton_ops() -> ModuleType:
    """The Triton implementations (same signatures as lfpv_fast.reference)."""
    try:
        from lfpv_fast.kernels import ops
    except ImportError as exc:  # triton not installed (not Linux x86_64), or kernels missing
        raise NotImplementedError(f"the triton backend is not available here: {exc!r}") from exc
    return ops


_warned_fallback = False


def _auto_ops_on_cuda() -> ModuleType:
    """backend="auto" on CUDA: the Triton ops, or the reference ops with a warning that says why."""
    global _warned_fallback
    try:
        return triton_ops()
    except NotImplementedError as exc:
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"backend='auto' runs the reference ops on CUDA (slow): {exc}", RuntimeWarning,
                          stacklevel=3)
        return reference


def select_ops(backend: str, x: torch.Tensor) -> ModuleType:
    """backend "reference" | "triton" | "auto" (Triton on CUDA tensors, lfpv_fast.cpu_ops on the CPU).

    "auto" on CUDA without a working Triton warns (once) naming the failing import and runs the
    reference ops; "triton" raises instead.
    """
    if backend == "reference":
        return reference
    if backend == "auto":
        return _auto_ops_on_cuda() if x.is_cuda else cpu_ops
    if backend == "triton":
        if not x.is_cuda and not triton_interpreting() and not _recording_launches:
            raise RuntimeError(
                "backend='triton' got a CPU tensor: Triton kernels need a CUDA device. On the CPU, "
                "run them under the interpreter (set TRITON_INTERPRET=1 before starting Python; slow, "
                "for tests) or use backend='reference'."
            )
        return triton_ops()
    raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'reference' or 'triton'")
