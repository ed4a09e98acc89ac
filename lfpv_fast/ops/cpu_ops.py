"""The CPU op set of backend "auto": the reference ops, with a memory-linear masked attention.

Same signatures as `lfpv_fast.ops.reference`; every op but `masked_attention` is the reference one.

`masked_attention` computes what the reference computes (softmax over q k^T / sqrt(D) with masked keys
at -1e9, times v) without materialising the L x L score matrix:

- The mask is per key and the same for every query and head. A masked key's score is -1e9, so its
  softmax weight is exp(-1e9 - max) = 0 exactly in float32 and float64 whenever one key of the row is
  kept; dropping the masked keys therefore changes nothing but the summation order. The kept keys go
  through torch's scaled_dot_product_attention (a flash-style kernel on the CPU: memory linear in L).
- A batch element whose keys are all masked gives every key the same score -1e9, hence uniform weights
  1/L: its output is the mean of v over the keys, for every query.

On dark photos most tokens have a low SNR: often no key at all is kept, and the attention costs one
mean. `bench/bench_attention_snr.py` and `bench/bench_inference.py` measure both cases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lfpv_fast.ops.reference import (  # noqa: F401  (re-exported: the op set is this module's namespace)
    MASKED_SCORE,
    batch_mean,
    batch_mean_layer_norm,
    box_blur5,
    gather_samples,
    ig_msa,
    luminance,
    mutual_updater_inputs,
    query_fusion,
    sample_updater_inputs,
    sample_updater_inputs_from_features,
    snr_mask,
)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
    """The reference masked attention, memory-linear: q, k, v (B, heads, L, D); key_keep (B, L) bool."""
    outputs = []
    for i in range(q.shape[0]):  # the kept keys differ per batch element
        keep = key_keep[i]
        kept = int(keep.sum())
        if kept == keep.numel():
            out = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1])
        elif kept:
            index = keep.nonzero().squeeze(1)
            out = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1].index_select(2, index),
                                                 v[i:i + 1].index_select(2, index))
        else:  # every score is -1e9: uniform weights over all keys
            out = v[i:i + 1].mean(dim=2, keepdim=True).expand(q[i:i + 1].shape[:3] + v.shape[-1:])
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
                # q and k get zero gradients (not none), as through the reference's masked scores
                out = out + (q[i:i + 1].sum() + k[i:i + 1].sum()) * 0.0
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
