"""Choosing the op implementations: the eager reference twins or the Triton kernels."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from lfpv_fast import cpu_ops, reference


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_ops() -> ModuleType:
    """The Triton implementations (same signatures as lfpv_fast.reference)."""
    try:
        from lfpv_fast.kernels import ops
    except ImportError as exc:  # triton not installed (not Linux x86_64), or kernels missing
        raise NotImplementedError(f"the triton backend is not available here: {exc}") from exc
    return ops


def select_ops(backend: str, x: torch.Tensor) -> ModuleType:
    """backend "reference" | "triton" | "auto" (Triton on CUDA tensors, lfpv_fast.cpu_ops on the CPU)."""
    if backend == "reference":
        return reference
    if backend == "auto":
        return triton_ops() if x.is_cuda else cpu_ops
    if backend == "triton":
        if not x.is_cuda and not triton_interpreting():
            raise RuntimeError(
                "backend='triton' got a CPU tensor: Triton kernels need a CUDA device. On the CPU, "
                "run them under the interpreter (set TRITON_INTERPRET=1 before starting Python; slow, "
                "for tests) or use backend='reference'."
            )
        return triton_ops()
    raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'reference' or 'triton'")
