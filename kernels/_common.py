"""Shared helpers of the Triton kernels: output allocation, launch counting, dtype rules."""

from __future__ import annotations

import os
from collections import Counter

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

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


def launch(name: str, kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Launch a Triton kernel from a `triton_op` body (through `wrap_triton`, so torch.compile sees it)
    and count it in `LAUNCHES`.

    Fake tensors (torch.compile tracing, fake-tensor checks) only trace: no count. Under the CPU
    interpreter `wrap_triton` hands back the plain interpreted kernel, which cannot run on fake
    tensors, so the launch is skipped there (the outputs' shapes are all a fake run needs).
    """
    fake = any(isinstance(a, torch.Tensor) and is_fake(a) for a in (*args, *kwargs.values()))
    if fake and interpreting():
        if torch.compiler.is_compiling():
            # The graph would be traced without this kernel and give garbage at run time.
            raise RuntimeError(
                "torch.compile of the Triton backend needs a GPU: under TRITON_INTERPRET=1 the kernels "
                "cannot be traced. On the CPU, compile with backend='reference' or run the Triton ops eagerly."
            )
        return
    if not fake:
        count_launch(name)
    wrap_triton(kernel)[grid](*args, **kwargs)


@triton.jit
def div_ieee(a, b, IS_FP64: tl.constexpr):
    """a / b rounded as torch rounds it: float32 "/" compiles to an approximate division on NVIDIA
    GPUs, so use div_rn there (it is float32-only); float64 "/" is already IEEE."""
    if IS_FP64:
        r = a / b
    else:
        r = tl.math.div_rn(a, b)
    return r
