"""Triton masked_attention vs its eager twin (lfpv_fast.ops.reference.masked_attention), forward and backward.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py): exact float64
arithmetic, so float64 results must match the reference to ~1e-10 relative.

Tolerances on a GPU are the same, by the error analysis: float32 dots run in IEEE float32
(input_precision="ieee": no TF32), in another summation order (a few ulps of a 64-term dot), and exp2 is
approximate (2^-22 relative): errors of a few 1e-7 against 1e-5. 16-bit inputs use tensor cores with
float32 accumulation, and the rounding of q / sqrt(D), P and dS to 16 bits dominates, as on the CPU:
the 5-ulp (10 for gradients) bounds hold on both.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, assert_close
from lfpv_fast.kernels import _common
from lfpv_fast.kernels.masked_attention import masked_attention, masked_attention_fwd
from lfpv_fast.ops import reference


def make_mask(batch: int, length: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """(B, L) key_keep. "mixed": row 0 keeps no key, row 1 keeps every key, the rest are random."""
    keep = torch.rand(batch, length, generator=gen) > 0.5
    if kind == "mixed":
        keep[0] = False
        if batch > 1:
            keep[1] = True
    elif kind == "none_masked":
        keep[:] = True
    elif kind == "last_only":  # only the last key, which sits in the ragged last tile
        keep[:] = False
        keep[:, -1] = True
    elif kind == "first_only":
        keep[:] = False
        keep[:, 0] = True
    return keep.to(DEVICE)


def make_qkv(batch: int, heads: int, lq: int, lk: int, dim: int, dtype: torch.dtype, seed: int,
             spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, dim, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(batch, heads, lk, dim, generator=gen, dtype=torch.float64) * spread
    v = torch.randn(batch, heads, lk, dim, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (q, k, v))


def attention_with_grads(fn, q, k, v, keep, seed: int = 7):
    """out and the gradients of a random-weighted sum of out w.r.t. q, k, v."""
    out = fn(q, k, v, keep)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights.to(out)).sum(), (q, k, v))
    return out, grads


def assert_attention_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """helpers.assert_close relative to the tensor's scale, max |expected|; a tensor that is exactly zero in the
    reference (e.g. dq when one key takes all the weight) gets the scale 1e-3."""
    assert_close(actual, expected, rel, scale=max(expected.abs().max().item(), 1e-3), what=what)


FP64_CASES = [
    # (B, heads, Lq, Lk, D, mask kind)
    (1, 1, 7, 7, 16, "random"),
    (3, 2, 33, 33, 16, "mixed"),
    (3, 1, 70, 70, 16, "mixed"),
    (2, 8, 17, 17, 64, "mixed"),
    (1, 2, 33, 33, 16, "last_only"),
    (2, 1, 20, 20, 16, "first_only"),
    (2, 2, 18, 18, 16, "none_masked"),
    (1, 2, 9, 33, 24, "random"),  # Lq != Lk, head dim that is not a power of two
]


@pytest.mark.parametrize("case", FP64_CASES, ids=lambda c: "x".join(map(str, c[:5])) + "-" + c[5])
def test_float64_matches_reference(case):
    b, h, lq, lk, d, kind = case
    q, k, v = make_qkv(b, h, lq, lk, d, torch.float64, seed=lq * 31 + d)
    keep = make_mask(b, lk, kind, torch.Generator().manual_seed(lk))
    out, grads = attention_with_grads(masked_attention, q, k, v, keep)
    ref_out, ref_grads = attention_with_grads(reference.masked_attention, q, k, v, keep)
    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    assert_attention_close(out, ref_out, 1e-10, "out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_attention_close(g, rg, 1e-10, f"d{name}")


def test_launch_counts():
    q, k, v = make_qkv(2, 2, 20, 20, 16, torch.float64, seed=0)
    keep = make_mask(2, 20, "random", torch.Generator().manual_seed(0))
    out = masked_attention(q, k, v, keep)
    assert dict(_common.LAUNCHES) == {"masked_attention_fwd": 1}
    out.sum().backward()
    assert dict(_common.LAUNCHES) == {"masked_attention_fwd": 1, "masked_attention_bwd_preprocess": 1,
                                      "masked_attention_bwd": 1}


def test_all_masked_rows_are_uniform_and_pass_no_gradient_to_q_k():
    """A batch row keeping no key: every score is -1e9, so weights are 1/L (the mean of v), and the
    masked_fill blocks every gradient to q and k of that row."""
    q, k, v = make_qkv(3, 2, 21, 21, 16, torch.float64, seed=3)
    keep = make_mask(3, 21, "mixed", torch.Generator().manual_seed(3))  # row 0 keeps nothing
    out, (dq, dk, dv) = attention_with_grads(masked_attention, q, k, v, keep)
    expected = v[0].mean(dim=-2, keepdim=True).expand_as(out[0])
    assert_attention_close(out[0], expected, 1e-12, "all-masked row")
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dk[0], torch.zeros_like(dk[0]))
    assert dv[0].abs().max() > 0


def test_large_scores_stay_stable():
    """Scores of tens (softmax nearly one-hot) exercise the running max of the online softmax."""
    q, k, v = make_qkv(2, 2, 40, 40, 16, torch.float64, seed=5, spread=4.0)
    keep = make_mask(2, 40, "random", torch.Generator().manual_seed(5))
    out, grads = attention_with_grads(masked_attention, q, k, v, keep)
    ref_out, ref_grads = attention_with_grads(reference.masked_attention, q, k, v, keep)
    assert_attention_close(out, ref_out, 1e-10, "out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_attention_close(g, rg, 1e-9, f"d{name}")


def test_strided_inputs_like_the_model():
    """The model passes q, k, v as (B, L, heads, D) views transposed to (B, heads, L, D)."""
    gen = torch.Generator().manual_seed(11)
    b, length, heads, d = 3, 19, 2, 16
    proj = torch.randn(b, length, 3 * heads * d, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    keep = make_mask(b, length, "mixed", gen)

    def run(fn):
        q, k, v = (t.reshape(b, length, heads, d).transpose(1, 2) for t in proj.split(heads * d, dim=-1))
        out = fn(q, k, v, keep)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return out, torch.autograd.grad((out * weights.to(out)).sum(), proj)[0]

    out, grad = run(masked_attention)
    ref_out, ref_grad = run(reference.masked_attention)
    assert_attention_close(out, ref_out, 1e-10, "out")
    assert_attention_close(grad, ref_grad, 1e-10, "dproj")


def test_float32_matches_reference():
    """float32 in, float32 accumulation: as close to the float64 truth as the float32 reference is."""
    q, k, v = make_qkv(3, 2, 70, 70, 64, torch.float32, seed=13)
    keep = make_mask(3, 70, "mixed", torch.Generator().manual_seed(13))
    out, grads = attention_with_grads(masked_attention, q, k, v, keep)
    ref32_out, ref32_grads = attention_with_grads(reference.masked_attention, q, k, v, keep)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_grads = attention_with_grads(reference.masked_attention, q64, k64, v64, keep)
    assert out.dtype == torch.float32
    # float32 rounding of a 70-term softmax-weighted sum: a few 1e-7 relative; 1e-5 leaves a 30x margin
    # yet fails on any real error (a wrong mask, scale or softmax is off by >= 1e-2).
    assert_attention_close(out, ref_out, 1e-5, "out")
    assert_attention_close(ref32_out, ref_out, 1e-5, "reference out (sanity)")
    for name, g, g32, rg in zip("qkv", grads, ref32_grads, ref_grads, strict=True):
        assert_attention_close(g, rg, 1e-5, f"d{name}")
        assert_attention_close(g32, rg, 1e-5, f"reference d{name} (sanity)")


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 5 * 2.0**-8), (torch.float16, 5 * 2.0**-11)])
@pytest.mark.parametrize("batch,length", [(3, 40), (1, 300)])
def test_half_precision_against_float64(dtype, rel, batch, length):
    """16-bit inputs, float32 accumulation, vs the float64 reference of the same (rounded) inputs.

    Tolerances: outputs are rounded to the input type (bf16: 2^-8 relative, fp16: 2^-11) and q / sqrt(D),
    the softmax weights and dS are rounded to it before their dots: allow 5 ulps of the output scale
    (10 for the gradients, which go through two rounded dots).
    (The reference itself cannot run in fp16: masked_fill(-1e9) overflows half.)
    Length 300 runs the 16-bit GPU tiles through several steps of every loop, with ragged last tiles
    (query tiles of 128, key tiles of 64; backward key blocks of 128 over query steps of 32, query
    blocks of 128 over key steps of 32)."""
    q, k, v = make_qkv(batch, 2, length, length, 64, dtype, seed=17)
    keep = make_mask(batch, length, "mixed" if batch > 1 else "random", torch.Generator().manual_seed(17))
    out, grads = attention_with_grads(masked_attention, q, k, v, keep)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_grads = attention_with_grads(reference.masked_attention, q64, k64, v64, keep)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_attention_close(out, ref_out, rel, "out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_attention_close(g, rg, 2 * rel, f"d{name}")


def test_a100_configuration():
    """sm_80 takes its own 16-bit backward blocks (32 x 32): long rows through every loop."""
    with _common.use_target(_common.TARGETS["sm_80"]):
        test_half_precision_against_float64(torch.bfloat16, 5 * 2.0**-8, 1, 300)


def test_agrees_with_sdpa_where_a_key_is_kept():
    """torch SDPA with a boolean mask is the same attention wherever a row keeps at least one key
    (SDPA gives NaN for rows that keep none, where the published -1e9 gives uniform weights)."""
    q, k, v = make_qkv(4, 2, 33, 33, 16, torch.float64, seed=19)
    keep = make_mask(4, 33, "mixed", torch.Generator().manual_seed(19))
    rows = keep.any(dim=1)
    assert not rows.all() and rows.any()
    sdpa = lambda q, k, v, keep: F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    out, grads = attention_with_grads(masked_attention, q[rows], k[rows], v[rows], keep[rows])
    ref_out, ref_grads = attention_with_grads(sdpa, q[rows], k[rows], v[rows], keep[rows])
    assert_attention_close(out, ref_out, 1e-10, "out vs SDPA")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_attention_close(g, rg, 1e-10, f"d{name} vs SDPA")


def test_registered_op_schema_fake_and_autograd():
    q, k, v = make_qkv(2, 2, 9, 9, 16, torch.float64, seed=23)
    keep = make_mask(2, 9, "random", torch.Generator().manual_seed(23))
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    # raise_exception=False: each check's outcome comes back ("SUCCESS" or the exception), so the assertion
    # can fail; comparing the whole dict also catches a check that did not run.
    result = torch.library.opcheck(masked_attention_fwd, (q, k, v, keep), test_utils=checks, raise_exception=False)
    assert result == dict.fromkeys(checks, "SUCCESS"), result


def test_rejects_bad_inputs():
    q, k, v = make_qkv(2, 1, 8, 8, 16, torch.float64, seed=0)
    with pytest.raises(ValueError, match="key_keep"):
        masked_attention(q, k, v, torch.ones(2, 8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="key_keep"):
        masked_attention(q, k, v, torch.ones(2, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError):
        masked_attention(q, k.float(), v, torch.ones(2, 8, dtype=torch.bool, device=DEVICE))
