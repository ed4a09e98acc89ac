"""Networks: backbones (each declares its LFPV sites, see `backbone.py`), the LFPV plug-in (`lfpv.py`) and the
table of backbones a config can name (`BACKBONES`: a name -> how to build it, its options, its published format).

A config may also name a backbone of your own as "package.module:factory": `factory(**model.options)` must
return an nn.Module with the Backbone contract (sites, default_site, align, encode, decode).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from lfpv_fast.models.backbone import Backbone, Site


@dataclass
class RetinexformerOptions:
    """Retinexformer's options (its published option files all use n_feat 40, stage 1, num_blocks [1, 2, 2])."""

    in_channels: int = 3
    out_channels: int = 3
    n_feat: int = 40
    stage: int = 1
    num_blocks: list[int] = field(default_factory=lambda: [1, 2, 2])

    def __post_init__(self) -> None:
        # The other checks are RetinexFormer's own (made when the config builds it on the meta device).
        if self.in_channels != 3 or self.out_channels != 3:
            raise ValueError("model.options: in_channels and out_channels must be 3 (RGB in, RGB out)")


def _build_snr_aware(options: Any, backend: str) -> nn.Module:
    from lfpv_fast.models.snr_aware import SNRAware

    return SNRAware(options, backend)


def _build_retinexformer(options: RetinexformerOptions, backend: str) -> nn.Module:
    from lfpv_fast.models.retinexformer import RetinexFormer

    return RetinexFormer(**dataclasses.asdict(options), backend=backend)


@dataclass(frozen=True)
class BackboneEntry:
    """How a config's backbone name becomes a module."""

    options: type  # the options dataclass (dict: keyword arguments, unchecked)
    build: Callable[[Any, str], nn.Module]  # (options, backend) -> backbone module
    # The flat `model:` keys of the first config format that are this backbone's options (SNR-Aware only).
    legacy_flat_keys: tuple[str, ...] | None = None

    def check(self, config: Any) -> None:
        """Checks across a ModelConfig's keys: the backbone builds (on the meta device) and the LFPV site exists
        (ValueError naming it)."""
        _ = config.site


def _snr_aware_entry() -> BackboneEntry:
    from lfpv_fast.models.snr_aware import SNRAwareOptions

    return BackboneEntry(SNRAwareOptions, _build_snr_aware,
                         tuple(f.name for f in dataclasses.fields(SNRAwareOptions)))


BACKBONES: dict[str, BackboneEntry] = {
    "snr_aware": _snr_aware_entry(),
    "retinexformer": BackboneEntry(RetinexformerOptions, _build_retinexformer),
}


def backbone_entry(name: str) -> BackboneEntry:
    """The entry of a backbone name, or of "package.module:factory" (options: its keyword arguments)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model.backbone {name!r}: cannot import {attr!r} from {module_name!r} ({exc})") from None
        return BackboneEntry(dict, lambda options, backend: factory(**options))
    raise ValueError(f"model.backbone {name!r}: expected one of {', '.join(BACKBONES)}, "
                     "or 'package.module:factory' for a network of your own")


def build_backbone(config: Any, backend: str) -> nn.Module:
    """The backbone module of a ModelConfig."""
    return backbone_entry(config.backbone).build(config.options, backend)


from lfpv_fast.models.config import LFPVConfig, ModelConfig  # noqa: E402  (the config module reads BACKBONES)
from lfpv_fast.models.lfpv import BankDraws, LFPVModule, LFPVNet  # noqa: E402
from lfpv_fast.models.retinexformer import RetinexFormer  # noqa: E402

__all__ = ["BACKBONES", "Backbone", "BackboneEntry", "BankDraws", "LFPVConfig", "LFPVModule", "LFPVNet",
           "ModelConfig", "RetinexFormer", "RetinexformerOptions", "Site", "backbone_entry", "build_backbone"]
