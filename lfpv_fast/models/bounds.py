"""Bounding a network before building it: any backbone, probed on the meta device.

A checkpoint's model config says how big a network is; a tiny file can claim a huge one (nf=4096 asks for
about 117 GiB). So a reader first builds the network on `torch.device("meta")` (shapes only, no memory),
compares the file's weights with it and bounds what building it and running it on the smallest input
would take, and only then builds it for real. Nothing here knows one network from another: the caller
passes how to build it and, where it has one, an estimate of its activation memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

# Share of the available memory that the weights plus the smallest input's activations may take: the process,
# the decoded images and the allocator need room too.
MEMORY_SHARE = 0.5


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The network `build()` makes, with every tensor on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        return build()


def tensor_count(net: nn.Module) -> int:
    """Values held by the network's state (parameters and buffers)."""
    return sum(t.numel() for t in net.state_dict().values())


def _shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def weights_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """How a state dict differs from a network's (missing, unexpected keys, other shapes), or None if it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        first = ", ".join(f"{k!r} is {_shape(state[k].shape)} in the file, {_shape(own[k].shape)} in the model"
                          for k in shapes[:2])
        parts.append(f"{len(shapes)} tensor(s) differ in shape ({first}{', ...' if len(shapes) > 2 else ''})")
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {name} key(s) ({', '.join(repr(k) for k in keys[:3])}"
                         f"{', ...' if len(keys) > 3 else ''})")
    return "; ".join(parts)


def check_network_fits_memory(net_on_meta: nn.Module, path: str | Path, available: int,
                              smallest_input_bytes: int = 0) -> None:
    """Refuse (one-line ValueError) a network whose weights plus the activations of its smallest input
    (`smallest_input_bytes`, the caller's estimate) would take more than MEMORY_SHARE of `available` bytes."""
    weights = tensor_count(net_on_meta) * 4  # float32 weights
    need = weights + smallest_input_bytes
    if need > MEMORY_SHARE * available:
        raise ValueError(f"checkpoint {path}: its model config describes a network of {tensor_count(net_on_meta):,} "
                         f"weights that needs {need / 2**30:.1f} GiB to run on the smallest image, more than "
                         f"{MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available here")
