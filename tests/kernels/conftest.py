"""The kernel tests' shared setup (every test module in this folder).

- Every module here is skipped, with the reason, where Triton is missing or where there is no CUDA device
  and TRITON_INTERPRET is not set (tests/conftest.py sets it on machines without CUDA before anything
  imports triton). The modules are not even imported then: they import the kernels, which import triton.
- Every test starts with every Triton kernel output poisoned with NaN, so an element a kernel fails to
  write shows up, and with the launch counter at zero.

The tests' device is helpers.DEVICE. No __init__.py here: a package named `kernels` would shadow the
repository's top-level kernels/ folder.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lfpv_fast.kernels.runtime import interpreting


def why_kernels_cannot_run() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device and TRITON_INTERPRET is not set"
    return None


class SkippedModule(pytest.Module):
    """A kernel test module that cannot run here: collected as one skip, never imported."""

    def collect(self):
        pytest.skip(why_kernels_cannot_run())


def pytest_pycollect_makemodule(module_path, parent):
    if why_kernels_cannot_run() is not None:
        return SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every Triton kernel output starts as NaN; the launch counter starts at zero."""
    from lfpv_fast.kernels import _common

    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    _common.reset_launches()
