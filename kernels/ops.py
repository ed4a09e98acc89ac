"""The Triton backend: the same functions, with the same signatures, as lfpv_fast.ops.reference.

LFPVNet(backend="triton") calls these; each is a registered torch custom op with autograd, so
torch.compile traces through them without graph breaks.
"""

from lfpv_fast.kernels.bank_update import (
    batch_mean_layer_norm,
    gather_samples,
    mutual_updater_inputs,
    sample_updater_inputs,
    sample_updater_inputs_from_features,
)
from lfpv_fast.kernels.ig_msa import ig_msa
from lfpv_fast.kernels.masked_attention import masked_attention
from lfpv_fast.kernels.query_fusion import query_fusion
from lfpv_fast.kernels.snr_mask import snr_mask

__all__ = [
    "batch_mean_layer_norm",
    "gather_samples",
    "ig_msa",
    "masked_attention",
    "mutual_updater_inputs",
    "query_fusion",
    "sample_updater_inputs",
    "sample_updater_inputs_from_features",
    "snr_mask",
]
