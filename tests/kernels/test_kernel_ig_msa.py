"""Triton ig_msa (Retinexformer's channel attention) vs its eager twin (lfpv_fast.ops.reference.ig_msa), forward
and every gradient (q, k, v, illumination, rescale).

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py): exact float64
arithmetic, so float64 results match the reference to ~1e-10 relative (measured: ~1e-15).

Tolerance model: errors are measured against the float64 reference of the same (rounded) inputs and
output gradient, in units of each tensor's largest true value (max |truth|).
- float32: float32 accumulation over N pixels and d channels, IEEE dots: a few 1e-7; 1e-5 leaves a wide
  margin yet fails on any real error (a wrong norm, scale or softmax is off by >= 1e-3).
- bf16 (autocast: 16-bit q, k, v, illumination), in bf16 ulps (2^-7, the spacing at 1): every result is
  rounded to bf16 once (at most 1 ulp of its largest value: the interpreter truncates, a GPU rounds to
  nearest, half that), and the dots with A and P round them to bf16 first, as V . I is (half an ulp of
  each term; the terms' signs vary, so the sum's error stays a fraction of an ulp of the result).
  Bounds: 2 ulps for the output, 3 for q, k, v and illumination's gradients (one more rounded dot
  operand). Measured (3 seeds, C = 40, 80, 160): kernel <= 0.8 ulp (output) and <= 0.95 (gradients);
  the reference under the same autocast, which also rounds the normalised q and k, <= 0.6 and <= 1.3.
  rescale's gradient sums B*d*d terms dS_ij M_ij that cancel (every row of dS sums to zero): it is held
  to 1 ulp of the sum of its terms' magnitudes (measured: kernel <= 0.01, reference <= 0.03).
- float16 (autocast): the same bounds in float16 ulps (2^-10); measured kernel <= 0.6 ulp.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, assert_close
from lfpv_fast.kernels import _common
from lfpv_fast.kernels.ig_msa import ig_msa, ig_msa_fwd
from lfpv_fast.ops import reference


def ig_msa_inputs(batch: int, tokens: int, channels: int, heads: int, dtype: torch.dtype, seed: int,
                rescale: list[float] | None = None) -> list[torch.Tensor]:
    """q, k, v, illumination (B, N, C) in `dtype` and rescale (heads, 1, 1) float32 (float64 for float64),
    as leaves. Illumination is positive, as Retinexformer's (a conv of the lit-up image) mostly is."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, tokens, channels, generator=gen, dtype=torch.float64) for _ in range(3))
    illumination = torch.rand(batch, tokens, channels, generator=gen, dtype=torch.float64) + 0.25
    if rescale is None:
        rescale = (0.5 + 2 * torch.rand(heads, generator=gen, dtype=torch.float64)).tolist()
    scale = torch.tensor(rescale, dtype=torch.float64).reshape(heads, 1, 1)
    tensors = [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, illumination)]
    tensors.append(scale.to(device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32))
    return [t.requires_grad_() for t in tensors]


def output_weights(shape, dtype: torch.dtype = torch.float64, seed: int = 7) -> torch.Tensor:
    """The weights of the random-weighted sum whose gradients the tests compare: the output's gradient.
    Rounded to `dtype`: a 16-bit output's gradient is 16-bit (autograd rounds it), so the float64 truth
    gets the same rounded values."""
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return weights.to(dtype).double().to(DEVICE)


def ig_msa_with_grads(fn, leaves: list[torch.Tensor], heads: int, autocast: torch.dtype | None = None,
                     weights_dtype: torch.dtype = torch.float64):
    """out, and the gradients of a weighted sum of out (output_weights) w.r.t. every leaf."""
    with torch.autocast(DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = fn(*leaves, heads)
    grads = torch.autograd.grad((out.double() * output_weights(out.shape, weights_dtype)).sum(), leaves)
    return out, grads


def truth(leaves: list[torch.Tensor], heads: int, weights_dtype: torch.dtype = torch.float64):
    """The float64 reference of the same (rounded) values, output gradient included."""
    exact = [t.detach().double().requires_grad_() for t in leaves]
    return ig_msa_with_grads(reference.ig_msa, exact, heads, weights_dtype=weights_dtype)


def rescale_grad_terms(leaves: list[torch.Tensor], heads: int, weights_dtype: torch.dtype) -> float:
    """The largest (over heads) sum of |dS_ij M_ij| over batch rows and (i, j): the magnitude of the terms
    whose sum is rescale's gradient, in float64 (module docstring: dS is the scores' gradient)."""
    q, k, v, illumination, rescale = (t.detach().double() for t in leaves)
    b, n, c = q.shape
    d = c // heads

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n, heads, d).permute(0, 2, 3, 1)

    cos = F.normalize(per_head(k), dim=-1) @ F.normalize(per_head(q), dim=-1).transpose(-2, -1)
    attn = (cos * rescale.reshape(1, heads, 1, 1)).softmax(dim=-1)
    grad_attn = per_head(output_weights((b, n, c), weights_dtype)) @ per_head(v * illumination).transpose(-2, -1)
    grad_scores = attn * (grad_attn - (grad_attn * attn).sum(dim=-1, keepdim=True))
    return (grad_scores * cos).abs().sum(dim=(0, 2, 3)).max().item()


NAMES = ("out", "dq", "dk", "dv", "dillumination", "drescale")

CASES = [
    # (B, N, C, heads): Retinexformer's three levels (d = 40), a small and a tiny head dim, ragged tails
    (1, 37, 40, 1),
    (2, 130, 80, 2),
    (1, 70, 160, 4),
    (2, 45, 32, 2),  # d = 16
    (2, 19, 24, 3),  # d = 8: padded to the dot's minimum 16
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_float64_matches_reference(case):
    b, n, c, heads = case
    leaves = ig_msa_inputs(b, n, c, heads, torch.float64, seed=n + c)
    out, grads = ig_msa_with_grads(ig_msa, leaves, heads)
    ref_out, ref_grads = ig_msa_with_grads(reference.ig_msa, leaves, heads)
    assert out.dtype == torch.float64 and out.shape == (b, n, c)
    for name, a, e in zip(NAMES, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert a.shape == e.shape, name
        assert_close(a, e, 1e-10, what=name)


def test_sharp_and_negative_rescale():
    """Near one-hot softmaxes (rescale 30) and a negative rescale, per head."""
    leaves = ig_msa_inputs(2, 50, 80, 2, torch.float64, seed=3, rescale=[30.0, -4.0])
    out, grads = ig_msa_with_grads(ig_msa, leaves, 2)
    ref_out, ref_grads = ig_msa_with_grads(reference.ig_msa, leaves, 2)
    for name, a, e in zip(NAMES, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(a, e, 1e-10, what=name)


def test_few_programs_loop_over_many_blocks():
    """On a GPU of one SM the pixel passes run a few programs, each over many blocks (with a partial
    last block): the loops and the addition of partial rows, not just one block per program."""
    one_sm = dataclasses.replace(_common.TARGETS["sm_90"], sm_count=1)
    leaves = ig_msa_inputs(1, 300, 40, 1, torch.float64, seed=5)
    with _common.use_target(one_sm):
        out, grads = ig_msa_with_grads(ig_msa, leaves, 1)
    ref_out, ref_grads = ig_msa_with_grads(reference.ig_msa, leaves, 1)
    for name, a, e in zip(NAMES, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(a, e, 1e-10, what=name)


def test_zero_channel_is_clamped_like_f_normalize():
    """A channel that is zero at every pixel has norm 0 < eps: F.normalize divides it by eps (so its
    gradient is dQn / eps, ~1e12 here) and no projection term passes through the clamped norm."""
    leaves = ig_msa_inputs(1, 33, 32, 2, torch.float64, seed=9)
    with torch.no_grad():
        leaves[0][..., 3] = 0  # q channel 3 (head 0)
        leaves[1][..., 20] = 0  # k channel 20 (head 1)
    out, grads = ig_msa_with_grads(ig_msa, leaves, 2)
    ref_out, ref_grads = ig_msa_with_grads(reference.ig_msa, leaves, 2)
    assert ref_grads[0][..., 3].abs().max() > 1e6  # the clamp's 1/eps is really exercised
    for name, a, e in zip(NAMES, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(a, e, 1e-10, what=name)


def test_strided_inputs():
    """q, k, v as slices of one (B, N, 3C) projection and a transposed illumination map: any strides."""
    b, n, c, heads = 2, 29, 80, 2
    gen = torch.Generator().manual_seed(11)
    proj = torch.randn(b, n, 3 * c, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    illum_map = (torch.rand(b, c, n, generator=gen, dtype=torch.float64) + 0.25).to(DEVICE).requires_grad_()
    rescale = torch.tensor([1.5, 0.7], dtype=torch.float64, device=DEVICE).requires_grad_()

    def run(fn):
        q, k, v = proj.split(c, dim=-1)
        out = fn(q, k, v, illum_map.transpose(1, 2), rescale, heads)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return out, torch.autograd.grad((out * weights.to(DEVICE)).sum(), (proj, illum_map, rescale))

    out, grads = run(ig_msa)
    ref_out, ref_grads = run(reference.ig_msa)
    assert_close(out, ref_out, 1e-10, what="out")
    for name, g, rg in zip(("dproj", "dillumination", "drescale"), grads, ref_grads, strict=True):
        assert_close(g, rg, 1e-10, what=name)


def test_float32_matches_float64_truth():
    b, n, c, heads = 2, 150, 160, 4
    leaves = ig_msa_inputs(b, n, c, heads, torch.float32, seed=13)
    out, grads = ig_msa_with_grads(ig_msa, leaves, heads)
    ref32_out, ref32_grads = ig_msa_with_grads(reference.ig_msa, leaves, heads)
    true_out, true_grads = truth(leaves, heads)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    for name, a, r, t in zip(NAMES, (out, *grads), (ref32_out, *ref32_grads), (true_out, *true_grads), strict=True):
        assert_close(a, t, 1e-5, what=name)
        assert_close(r, t, 1e-5, what=f"reference {name} (sanity)")


BF16_ULPS = (2, 3, 3, 3, 3)  # out, dq, dk, dv, dillumination (module docstring)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_16bit_close(results, expected, leaves, heads: int, who: str, dtype: torch.dtype = torch.bfloat16) -> None:
    for name, ulps, a, t in zip(NAMES[:5], BF16_ULPS, results[:5], expected[:5], strict=True):
        assert_close(a, t, ulps * ULP[dtype], what=f"{who}{name}")
    assert_close(results[5], expected[5], ULP[dtype], what=f"{who}drescale",
                 scale=rescale_grad_terms(leaves, heads, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [(2, 130, 40, 1), (1, 200, 160, 4)], ids=lambda c: "x".join(map(str, c)))
def test_16bit_autocast_mix(case, dtype):
    """What Retinexformer's IG-MSA sees in bf16 training: bf16 q, k, v (linear layers) and illumination
    (a conv) under autocast, a float32 rescale parameter (and the same in float16). Dtypes as the
    reference's; values within the module docstring's bounds (in the dtype's ulps) of the float64 truth."""
    b, n, c, heads = case
    leaves = ig_msa_inputs(b, n, c, heads, dtype, seed=17 + n)
    out, grads = ig_msa_with_grads(ig_msa, leaves, heads, autocast=dtype)
    ref_out, ref_grads = ig_msa_with_grads(reference.ig_msa, leaves, heads, autocast=dtype)
    true_out, true_grads = truth(leaves, heads, dtype)
    assert out.dtype == ref_out.dtype == dtype
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] == [t.dtype for t in leaves]
    assert_16bit_close((out, *grads), (true_out, *true_grads), leaves, heads, "", dtype)
    assert_16bit_close((ref_out, *ref_grads), (true_out, *true_grads), leaves, heads, "reference (the model) ", dtype)


def test_float32_leaves_under_autocast():
    """float32 q, k, v, illumination under bf16 autocast are cast as the reference's matmuls cast them:
    a bf16 result, float32 gradients."""
    leaves = ig_msa_inputs(1, 40, 40, 1, torch.float32, seed=19)
    out, grads = ig_msa_with_grads(ig_msa, leaves, 1, autocast=torch.bfloat16)
    rounded = [t.detach().to(torch.bfloat16) if i < 4 else t for i, t in enumerate(leaves)]
    true_out, true_grads = truth(rounded, 1, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    assert_16bit_close((out, *grads), (true_out, *true_grads), rounded, 1, "")


def test_launch_counts():
    leaves = ig_msa_inputs(2, 20, 40, 1, torch.float64, seed=0)
    out = ig_msa(*leaves, 1)
    assert dict(_common.LAUNCHES) == {"ig_msa_gram": 1, "ig_msa_attention": 1, "ig_msa_apply": 1}
    out.sum().backward()
    assert dict(_common.LAUNCHES) == {"ig_msa_gram": 1, "ig_msa_attention": 1, "ig_msa_apply": 1,
                                      "ig_msa_bwd_reduce": 1, "ig_msa_bwd_stats": 1, "ig_msa_bwd_apply": 1}


def test_registered_op_schema_fake_and_autograd():
    leaves = ig_msa_inputs(2, 9, 32, 2, torch.float64, seed=23)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    # raise_exception=False: each check's outcome comes back, so the assertion can fail.
    result = torch.library.opcheck(ig_msa_fwd, (*leaves, 2), test_utils=checks, raise_exception=False)
    assert result == dict.fromkeys(checks, "SUCCESS"), result


def test_rejects_bad_inputs():
    q, k, v, illumination, rescale = ig_msa_inputs(1, 8, 40, 2, torch.float64, seed=0)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        ig_msa(q, k, v, illumination, rescale, 3)
    with pytest.raises(ValueError, match="illumination"):
        ig_msa(q, k, v, illumination[:, :4], rescale, 2)
    with pytest.raises(ValueError, match="rescale has 1 values"):
        ig_msa(q, k, v, illumination, rescale[:1], 2)
    with pytest.raises(TypeError, match="must share"):
        ig_msa(q, k.float(), v, illumination, rescale, 2)
    with pytest.raises(ValueError, match="no pixels"):
        ig_msa(q[:, :0], k[:, :0], v[:, :0], illumination[:, :0], rescale, 2)
    with pytest.raises(ValueError, match="head dim 80 > 64"):
        ig_msa(*ig_msa_inputs(1, 8, 80, 1, torch.float64, seed=0)[:5], 1)


def test_backend_switch_gives_the_kernel():
    """backend "triton" runs this kernel; the CPU op set and the reference run the eager twin; all take the
    reference's signature (Retinexformer calls `ops.ig_msa` on whichever set the backend picks)."""
    import inspect

    from lfpv_fast.ops import cpu_ops
    from lfpv_fast.ops.backends import select_ops

    x = torch.zeros(1, device=DEVICE)
    assert select_ops("triton", x).ig_msa is ig_msa
    assert select_ops("reference", x).ig_msa is reference.ig_msa
    assert cpu_ops.ig_msa is reference.ig_msa
    assert inspect.signature(ig_msa) == inspect.signature(reference.ig_msa)
