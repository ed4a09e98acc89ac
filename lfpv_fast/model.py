"""Compatibility: the names that lived here before backbones (`lfpv_fast.models` holds them now)."""

from __future__ import annotations

import torch

from lfpv_fast.models.config import ModelConfig
from lfpv_fast.models.lfpv import BankDraws, LFPVModule, LFPVNet
from lfpv_fast.models.snr_aware import (
    Encoder,
    FeedForward,
    MaskedSelfAttention,
    ResidualBlock,
    SNRDecoder,
    TransformerLayer,
    original_name,
)
from lfpv_fast.ops.backends import select_ops

__all__ = ["BankDraws", "Encoder", "FeedForward", "LFPVModule", "LFPVNet", "MaskedSelfAttention", "ModelConfig",
           "ResidualBlock", "SNRDecoder", "TransformerLayer", "original_name", "snr_mask"]


def snr_mask(x: torch.Tensor) -> torch.Tensor:
    """The SNR map (B,1,H,W) of an RGB batch in [0,1], as the published code computes it."""
    return select_ops("auto", x).snr_mask(x)
