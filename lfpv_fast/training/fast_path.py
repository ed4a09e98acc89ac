"""Which fast-path switches a training run uses on this machine ("auto" resolved): the device policy.

`resolve_features(cfg)` turns the train section's switches (device, backend, compile, bf16, channels_last,
fused Adam, CUDA graphs) into what this machine will run, and refuses GPU-only switches on a machine without a
GPU (a ConfigError, before any work).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lfpv_fast.config import ConfigError, RunConfig
from lfpv_fast.ops.backends import BackendName, OpSetName, resolve_backend


@dataclass
class Features:
    """The fast-path switches as this run uses them ("auto" resolved)."""

    device: torch.device
    backend: BackendName  # the backend the network is built with, "auto" resolved: "reference" or "triton"
    ops: OpSetName  # the op set that runs (lfpv_fast.ops.backends' vocabulary; the same name in training)
    backend_note: str
    compile: bool
    bf16: bool
    channels_last: bool
    fused_adam: bool
    cuda_graphs: bool

    def describe(self) -> str:
        on = {True: "on", False: "off"}
        graphs = " + CUDA graphs (reduce-overhead)" if self.cuda_graphs else ""
        return (f"device {self.device}, backend {self.ops}{self.backend_note}, compile {on[self.compile]}{graphs}, "
                f"bf16 {on[self.bf16]}, channels_last {on[self.channels_last]}, fused Adam {on[self.fused_adam]}")


def resolve_features(cfg: RunConfig, local_rank: int = 0) -> Features:
    """Resolve "auto" switches for this machine; GPU-only switches without a GPU are a ConfigError."""
    t, d, src = cfg.train, cfg.data, cfg.source
    has_cuda = torch.cuda.is_available()
    if t.device == "cuda" and not has_cuda:
        raise ConfigError(f"{src}: train.device is 'cuda' but this machine has no CUDA device visible to torch "
                          f"{torch.__version__}; set train.device to 'auto' or 'cpu'")
    use_cuda = t.device == "cuda" or (t.device == "auto" and has_cuda)
    if not use_cuda:
        asked = []
        if resolve_backend(t.backend, "cpu", training=True).needs_cuda:
            asked.append("train.backend=triton -> 'reference' or 'auto'")
        if t.bf16 == "on":
            asked.append("train.bf16=on -> 'auto' or 'off'")
        if t.fused_adam == "on":
            asked.append("train.fused_adam=on -> 'auto' or 'off'")
        if t.cuda_graphs:
            asked.append("train.cuda_graphs=true -> false")
        if t.backend == "triton" and t.compile == "on":  # interpreted kernels cannot be traced
            asked.append("train.compile=on with train.backend=triton -> compile 'off', or backend 'reference'")
        if d.device == "gpu":
            asked.append("data.device=gpu -> 'cpu'")
        if asked:
            why = "train.device is 'cpu'" if t.device == "cpu" else "no CUDA device is visible"
            raise ConfigError(f"{src}: this run trains on the CPU ({why}), but the config asks for GPU-only "
                              f"features; change {'; '.join(asked)} (or run on a machine with a CUDA GPU)")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    resolved = resolve_backend(t.backend, device, training=True)
    if resolved.name is None:
        raise ConfigError(f"{src}: train.backend=triton: {resolved.reason}; set train.backend to 'reference' or 'auto'")
    backend_note = ""
    if resolved.reason:  # the reference ops run on CUDA too, slowly: say why
        backend_note = f" (Triton unavailable: {resolved.reason})"
        warnings.warn(f"train.backend=auto runs the reference ops on {device}{backend_note}", RuntimeWarning,
                      stacklevel=2)

    def switch(value: str) -> bool:
        return value == "on" or (value == "auto" and use_cuda)

    return Features(
        device=device,
        backend=resolved.pinned_backend,
        ops=resolved.name,
        backend_note=backend_note,
        compile=switch(t.compile),
        bf16=switch(t.bf16) and (t.bf16 == "on" or torch.cuda.is_bf16_supported()),
        channels_last=t.channels_last,
        fused_adam=switch(t.fused_adam),
        cuda_graphs=t.cuda_graphs,
    )
