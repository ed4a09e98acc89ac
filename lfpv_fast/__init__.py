"""lfpv_fast: the fast implementation of LFPVs (ICCV 2025) for low-light image enhancement."""

from lfpv_fast.model import BankDraws, LFPVNet, ModelConfig, snr_mask

__all__ = ["BankDraws", "LFPVNet", "ModelConfig", "snr_mask"]
__version__ = "0.1.0"
