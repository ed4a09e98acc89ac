"""The CPU op set of backend "auto" against the reference: same numbers to float rounding."""

from __future__ import annotations

import pytest
import torch

from lfpv_fast import LFPVNet, ModelConfig
from lfpv_fast.ops import cpu_ops, reference


def _attention_inputs(batch: int, length: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (scale * torch.randn(batch, 2, length, 8, generator=gen, dtype=dtype) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_masked_attention_matches_reference_for_every_kind_of_row(dtype, tol):
    q, k, v = _attention_inputs(4, 33, dtype)
    keep = torch.rand(4, 33, generator=torch.Generator().manual_seed(1)) > 0.6
    keep[1] = True  # every key kept
    keep[2] = False  # every key masked: uniform weights
    keep[3] = False
    keep[3, 5] = True  # a single kept key
    expected = reference.masked_attention(q, k, v, keep)
    got = cpu_ops.masked_attention(q, k, v, keep)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # The fully masked element: every query gets the mean of v, as the reference's -1e9 gives.
    torch.testing.assert_close(got[2], v[2].mean(dim=1, keepdim=True).expand_as(got[2]), rtol=tol, atol=tol)


def test_fully_masked_rows_stay_uniform_with_large_scores():
    """Scores far above 32 would not round to -1e9 exactly in an additive mask: uniform weights must hold anyway."""
    q, k, v = _attention_inputs(1, 20, torch.float32, scale=30.0)
    keep = torch.zeros(1, 20, dtype=torch.bool)
    torch.testing.assert_close(cpu_ops.masked_attention(q, k, v, keep), reference.masked_attention(q, k, v, keep),
                               rtol=1e-5, atol=1e-4)


def test_masked_attention_gradients_match_reference():
    q, k, v = _attention_inputs(3, 17, torch.float64)
    keep = torch.rand(3, 17, generator=torch.Generator().manual_seed(2)) > 0.5
    keep[0] = False
    grads = []
    for ops in (reference, cpu_ops):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.masked_attention(*leaves, keep)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out) + out.detach()))
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_fully_masked_batch_gives_zero_gradients_to_queries_and_keys():
    q, k, v = (t.requires_grad_() for t in _attention_inputs(1, 9, torch.float64))
    out = cpu_ops.masked_attention(q, k, v, torch.zeros(1, 9, dtype=torch.bool))
    grad_q, grad_k, grad_v = torch.autograd.grad(out.sum(), (q, k, v))
    assert not grad_q.any() and not grad_k.any()
    torch.testing.assert_close(grad_v, torch.full_like(v, 1.0))  # each key carries 1/L of each of L queries


def test_model_auto_on_cpu_matches_reference_backend():
    cfg = ModelConfig(nf=8, light_blocks=1, layers=2, heads=2, head_dim=8, ffn_dim=32, bank_size=4)
    torch.manual_seed(0)
    ref = LFPVNet(cfg, backend="reference").eval()
    with torch.no_grad():
        ref.bank_vectors.normal_()
        ref.bank_patches.normal_()
    auto = LFPVNet(cfg, backend="auto").eval()
    auto.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 64, 80)
    x[1, :, :32] = 0.5  # a flat region: a high SNR there, so some keys are kept
    snr = ref.snr_mask(x)
    quarter = torch.nn.functional.interpolate(snr, scale_factor=0.25, mode="nearest")
    kept = (torch.nn.functional.avg_pool2d(quarter, 4).flatten(1) > 0.5).float().mean(dim=1)
    assert kept[0] == 0 and 0 < kept[1] < 1  # one element fully masked, one partly
    with torch.no_grad():
        torch.testing.assert_close(auto(x, snr), ref(x, snr), rtol=0, atol=1e-5)
