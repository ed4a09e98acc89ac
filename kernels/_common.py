"""Shared helpers of the Triton kernels: targets, output allocation, launch counting and recording,
dtype rules."""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from lfpv_fast.kernels.runtime import RECORDING, interpreting

# Number of kernel launches per kernel name since the last reset (eager calls only; under
# torch.compile the launches happen inside the compiled graph and are counted with the profiler).
LAUNCHES: Counter[str] = Counter()

# Tests set this to True so that every output starts as NaN: an element a kernel fails to write
# then shows up as a mismatch instead of passing by luck with stale memory.
POISON_OUTPUTS = False


# Specialization: Triton compiles a kernel once per pattern of its integer arguments (== 1, divisible
# by 16). Arguments that only count or bound work (tiles, programs, sequence lengths) are marked
# `do_not_specialize` on each kernel, so that images of many sizes share one compiled kernel; sizes that
# scale addresses (widths, strides) stay specialized, which lets loads vectorize.

# ---------------------------------------------------------------------------------------------
# Targets: every launch configuration (tile sizes, warps, stages, programs) is a function of the
# GPU the kernel is built for, never of whether the interpreter runs it. Under TRITON_INTERPRET the
# kernels run with an H100's configuration (or LFPV_TRITON_TARGET's), so the CPU tests run exactly
# the tiles, loops and tails that the GPU runs.


@dataclass(frozen=True)
class Target:
    """The GPU a launch is configured for."""

    name: str  # "sm_90"
    arch: int  # compute capability as major * 10 + minor
    sm_count: int  # streaming multiprocessors: sizes grids that loop over work
    shared_memory: int  # bytes of shared memory one program may use (the opt-in maximum)
    interpreter: bool = False  # runs under TRITON_INTERPRET here: only interpreter workarounds look at this


# An H100 SXM and an A100: the cards the compile gate builds for (bench/compile_gate.py, tests/test_compile_gate.py).
TARGETS = {
    "sm_90": Target("sm_90", 90, 132, 232448),
    "sm_80": Target("sm_80", 80, 108, 166912),
}

_TARGET_OVERRIDE: ContextVar[Target | None] = ContextVar("lfpv_triton_target", default=None)


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    return Target(f"sm_{arch}", arch, props.multi_processor_count, props.shared_memory_per_block_optin)


def target_for(device: torch.device) -> Target:
    """The target whose configuration a launch on `device` uses."""
    override = _TARGET_OVERRIDE.get()
    if override is not None:
        # Another card's configuration; whether the interpreter runs it is this process's business.
        return replace(override, interpreter=interpreting())
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    name = os.environ.get("LFPV_TRITON_TARGET", "sm_90")
    if name not in TARGETS:
        raise ValueError(f"LFPV_TRITON_TARGET={name!r}: expected one of {sorted(TARGETS)}")
    return replace(TARGETS[name], interpreter=interpreting())


@contextlib.contextmanager
def use_target(target: Target) -> Iterator[None]:
    """Configure every launch in this block for `target` (tests of another card's configuration)."""
    token = _TARGET_OVERRIDE.set(target)
    try:
        yield
    finally:
        _TARGET_OVERRIDE.reset(token)


# ---------------------------------------------------------------------------------------------
# Launches: counted, and optionally recorded instead of run (the compile gate).


@dataclass
class LaunchRecord:
    """One kernel launch as `launch` saw it: enough to compile it ahead of time for any target."""

    name: str
    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple[Any, ...]  # tensors replaced by TensorSpec
    kwargs: dict[str, Any] = field(default_factory=dict)  # constexprs and num_warps / num_stages


@dataclass(frozen=True)
class TensorSpec:
    """What Triton specializes a tensor argument on: its dtype and whether its address is 16-byte aligned.
    Offers `data_ptr()` so that Triton's own binder accepts it in place of the tensor."""

    dtype: torch.dtype
    aligned: bool

    def data_ptr(self) -> int:
        return 1 << 20 if self.aligned else (1 << 20) + 2


def _tensor_spec(t: torch.Tensor) -> TensorSpec:
    # Allocations are at least 256-byte aligned; a view is aligned where its offset is.
    return TensorSpec(t.dtype, (t.storage_offset() * t.element_size()) % 16 == 0)


@contextlib.contextmanager
def record_launches(target: Target) -> Iterator[list[LaunchRecord]]:
    """Within the block, every launch is configured for `target` and recorded instead of run.

    Run the ops on fake tensors (torch._subclasses.FakeTensorMode) to record the launches of any
    shape without memory or a GPU; `backend="triton"` then accepts CPU tensors (kernels.runtime's
    `takes_cpu_tensors`, which lfpv_fast.ops.backends asks).
    """
    records: list[LaunchRecord] = []
    token = RECORDING.set(records)
    with use_target(target):
        try:
            yield records
        finally:
            RECORDING.reset(token)


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
    records = RECORDING.get()
    if records is not None:
        specs = tuple(_tensor_spec(a) if isinstance(a, torch.Tensor) else a for a in args)
        records.append(LaunchRecord(name, kernel, tuple(grid), specs, dict(kwargs)))
        return
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
