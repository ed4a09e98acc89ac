"""Choosing the op implementations: the one home of the backend names, of what "auto" means on each
device, and of why a backend cannot run here.

Backends (what users ask for: `LFPVNet(backend=)`, `train.backend`, `--backend`):
  reference  the eager twins (lfpv_fast.ops.reference) everywhere
  triton     the Triton kernels (lfpv_fast.kernels.ops): CUDA tensors, or CPU tensors under the Triton
             interpreter (TRITON_INTERPRET=1, tests) or while the compile gate records launches
  auto       CUDA: Triton, or the reference ops with a warning saying why Triton is unavailable;
             CPU: lfpv_fast.ops.cpu_ops (the reference ops with a memory-linear masked attention), except in
             training, which runs the reference ops there

Op sets (what runs): "reference", "cpu_ops", "triton". The dependency goes one way: this module imports
the kernels, the kernels never import it.
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from lfpv_fast.kernels import runtime
from lfpv_fast.ops import cpu_ops, reference

BackendName = Literal["auto", "reference", "triton"]
BACKENDS: tuple[str, ...] = typing.get_args(BackendName)
OpSetName = Literal["reference", "cpu_ops", "triton"]


def triton_interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return runtime.interpreting()


def triton_takes_cpu_tensors() -> bool:
    """Whether backend 'triton' can run on CPU tensors here: under the interpreter, or while the compile gate
    records launches (kernels.runtime, the rule's one home)."""
    return runtime.takes_cpu_tensors()


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot be imported here (triton not installed: not Linux x86_64, or the
    kernels missing), or None when they can. Not cached: torch.compile traces it (in select_ops) and warns
    about functools caches; after the first import, asking again is a dictionary lookup."""
    try:
        import lfpv_fast.kernels.ops  # noqa: F401
    except ImportError as exc:
        return f"the triton backend is not available here: {exc!r}"
    return None


_OP_SETS: dict[str, ModuleType] = {"reference": reference, "cpu_ops": cpu_ops}


class BackendUnavailable(RuntimeError):
    """The backend asked for by name cannot run on this device (the message says why and what to do)."""


@dataclass(frozen=True)
class Resolved:
    """What a requested backend runs as on one device."""

    requested: str
    name: OpSetName | None  # the op set that runs; None: the requested backend cannot run here
    reason: str = ""  # why `name` is not what was asked for, or why nothing can run ("" when it is)
    needs_cuda: bool = False  # nothing runs because the device is a CPU that the requested backend cannot use

    @property
    def pinned_backend(self) -> BackendName:
        """The backend name that runs this op set on this device whatever the call: 'reference' or 'triton' (a
        network built once the choice is made, as a training run's); 'auto' for the CPU op set, which only
        'auto' selects."""
        if self.name is None:
            raise BackendUnavailable(self.reason)
        return "auto" if self.name == "cpu_ops" else self.name

    @property
    def ops(self) -> ModuleType:
        """The op implementations (same signatures as lfpv_fast.ops.reference); BackendUnavailable when none."""
        if self.name is None:
            raise BackendUnavailable(self.reason)
        if self.name == "triton":
            from lfpv_fast.kernels import ops

            return ops
        return _OP_SETS[self.name]


def check_backend(requested: str) -> None:
    """ValueError unless `requested` is one of BACKENDS."""
    if requested not in BACKENDS:
        expected = ", ".join(repr(name) for name in BACKENDS[:-1]) + f" or {BACKENDS[-1]!r}"
        raise ValueError(f"unknown backend {requested!r}; expected {expected}")


def resolve_backend(requested: str, device: torch.device | str, *, training: bool = False) -> Resolved:
    """The op set that `requested` runs as on `device` ("auto" resolved), and the reason when it differs
    from what was asked for or cannot run. training: "auto" on the CPU runs the reference ops (the
    definition of correct), not the memory-linear CPU op set meant for whole photos."""
    check_backend(requested)
    on_cuda = torch.device(device).type == "cuda"
    if requested == "reference":
        return Resolved(requested, "reference")
    if requested == "auto":
        if not on_cuda:
            return Resolved(requested, "reference" if training else "cpu_ops")
        reason = triton_unavailable_reason()
        if reason is None:
            return Resolved(requested, "triton")
        return Resolved(requested, "reference", reason)
    if not on_cuda and not triton_takes_cpu_tensors():
        return Resolved(requested, None, needs_cuda=True, reason=(
            "backend='triton' got a CPU tensor: Triton kernels need a CUDA device. On the CPU, "
            "run them under the interpreter (set TRITON_INTERPRET=1 before starting Python; slow, "
            "for tests) or use backend='reference'."))
    reason = triton_unavailable_reason()
    return Resolved(requested, "triton") if reason is None else Resolved(requested, None, reason)


def require_backend(requested: str, device: torch.device | str) -> Resolved:
    """resolve_backend, with a ValueError saying why when the requested backend cannot run on `device` (the
    command-line tools check --backend with it before loading anything)."""
    resolved = resolve_backend(requested, device)
    if resolved.name is None:
        raise ValueError(f"--backend {requested} cannot run on {torch.device(device)}: {resolved.reason}")
    return resolved


def attention_is_memory_linear(backend: str, device: torch.device | str) -> bool:
    """Whether the masked attention that `backend` runs on `device` holds memory linear in the tokens
    (Triton, the CPU op set) rather than the reference's whole L x L score matrix."""
    check_backend(backend)
    if backend == "triton":  # when it cannot run, nothing runs: the forward says why
        return True
    return resolve_backend(backend, device).name != "reference"


_warned_fallback = False


def select_ops(backend: str, x: torch.Tensor) -> ModuleType:
    """The ops that `backend` runs for the input `x` (see resolve_backend).

    "auto" on CUDA without a working Triton warns (once) naming the failing import and runs the
    reference ops; "triton" that cannot run raises BackendUnavailable saying why.
    """
    global _warned_fallback
    resolved = resolve_backend(backend, x.device)
    if resolved.reason and resolved.name is not None and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"backend='auto' runs the reference ops on CUDA (slow): {resolved.reason}", RuntimeWarning,
                      stacklevel=3)
    return resolved.ops
