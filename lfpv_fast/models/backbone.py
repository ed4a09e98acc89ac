"""The seam between a backbone network and the LFPV plug-in.

A backbone is any `nn.Module` that can be cut in two at one of its declared sites:

    features, state = backbone.encode(x, site)     # x (B, 3, H, W), H and W multiples of `align`
    out = backbone.decode(features, state)          # features (B, site.channels, H/stride, W/stride)

with `backbone.decode(*backbone.encode(x, site))` equal to `backbone(x)` bit for bit. The LFPV plug-in
sits between the two halves: it updates its banks from `features` (training) and adds its
query-and-fusion result to them before `decode`. `state` is whatever the second half needs (skips,
illumination features, the input); the plug-in never looks into it.

One optional extension: a backbone that needs a per-pixel map computed from the WHOLE input beside x
(SNR-Aware's SNR map, normalised by its maximum over the image) defines `guide(x) -> (B,1,H,W)` and takes
it as `encode(x, site, guide=None)` (computing it from x when None). LFPVNet passes it through, so that the
tools can compute it once per image and hand crops of it to tiles and strips (lfpv_fast.inference.enhancement).
Backbones without `guide` are called as `encode(x, site)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Site:
    """A place in a backbone where LFPVs can attach: a [B, channels, H/stride, W/stride] feature map."""

    name: str
    channels: int
    stride: int


@runtime_checkable
class Backbone(Protocol):
    """What a backbone declares and provides to the LFPV plug-in."""

    sites: dict[str, Site]  # every site where LFPVs can attach, by name
    default_site: str  # the one used when a config names none
    align: int  # input sides must be multiples of this

    def encode(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, Any]: ...

    def decode(self, features: torch.Tensor, state: Any) -> torch.Tensor: ...


# A published checkpoint saved from inside torch's (Distributed)DataParallel has every key prefixed 'module.'.
# Every published format strips it here, the one place that spells it.
DATA_PARALLEL_PREFIX = "module."


def without_data_parallel_prefix(state: Mapping[Any, Any]) -> dict[Any, Any]:
    """`state` with DataParallel's 'module.' prefix removed from its keys (other keys kept as they are)."""
    return {(k.removeprefix(DATA_PARALLEL_PREFIX) if isinstance(k, str) else k): v for k, v in state.items()}
