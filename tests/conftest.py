"""Shared test setup: run Triton kernels under the CPU interpreter where there is no GPU.

This must happen before anything imports triton, which reads TRITON_INTERPRET when kernels are
launched and JIT-decorated; conftest.py is imported by pytest before any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every Triton kernel output starts as NaN, so an element a kernel fails to write shows up; the
    launch counter starts at zero. Kernel test modules use it with pytest.mark.usefixtures."""
    from lfpv_fast.kernels import _common

    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    _common.reset_launches()
