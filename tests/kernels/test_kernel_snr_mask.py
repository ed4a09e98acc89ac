"""Triton snr_mask vs its eager twin (lfpv_fast.ops.reference.snr_mask), forward and backward.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), where the
kernels repeat the reference's float32/float64 operations in the reference's order: the forward must
then be bit-identical to the reference, which matters because the ratio light / (|dark - light| + 1e-4)
turns a one-ulp difference in `light` into ~1e-3 relative.

On a GPU the reference runs torch's CUDA kernels, which may round a few operations differently: the
maps must then agree within a per-pixel bound from the error analysis (gpu_bound below), which is
large only where dark and light cancel. Gradients: 1e-5 relative in float32 on both.
"""

from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, assert_close
from lfpv_fast.kernels import _common
from lfpv_fast.kernels.snr_mask import snr_mask, snr_mask_fwd
from lfpv_fast.ops import reference


def make_images(batch: int, height: int, width: int, dtype: torch.dtype, seed: int,
                low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(batch, 3, height, width, generator=gen, dtype=torch.float64)
    return x.to(device=DEVICE, dtype=dtype)


def grad_of_weighted_sum(fn, x: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out, torch.autograd.grad((out * weights.to(out)).sum(), x)[0]


def gpu_bound(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel bound on |kernel - reference| on a GPU, from the error analysis of the map.

    Both compute light (a 25-term sum of the blurred channels, then the luminance) and dark in the same
    order, but a GPU may round a few operations differently (the reference's CUDA kernels are not ours).
    Allow each of light and dark a relative error of 32 eps (the blur's 25 additions, the luminance's
    products and sums). Then den = |dark - light| + 1e-4 errs by up to 32 eps (|light| + |dark|) + eps den,
    so ratio = light / den has a relative error rho = 32 eps + (32 eps (|light| + |dark|)) / den + 2 eps,
    large where dark and light cancel (up to ~1e4 times eps); t = ratio / (peak + 1e-4) adds the peak's
    error, at most the largest rho of its image. The clamp to [0, 1] only shrinks errors; the output's
    rounding adds eps.
    """
    x64 = x.double()
    eps = torch.finfo(x.dtype).eps
    dark = reference.luminance(x64)
    light = reference.luminance(reference.box_blur5(x64))
    den = (dark - light).abs() + 1e-4
    rho = 34 * eps + 32 * eps * (light.abs() + dark.abs()) / den
    t = reference.snr_mask(x64)
    peak_rho = rho.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return t * (rho + peak_rho + 2 * eps) + eps


def assert_map_matches(out: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    """Under the interpreter the kernels repeat the reference's IEEE operations in its order: the map
    must be bit-identical. On a GPU: within gpu_bound."""
    assert out.shape == expected.shape and torch.isfinite(out).all()
    if _common.interpreting():
        assert torch.equal(out, expected), (out - expected).abs().max()
    else:
        err = (out.double() - expected.double()).abs()
        bound = gpu_bound(x).to(err.device)
        assert (err <= bound).all(), f"max error {err.max():.3e}, worst excess {(err - bound).max():.3e}"


SHAPES = [(2, 5, 7), (3, 17, 33), (1, 64, 64), (1, 3, 3), (2, 4, 6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(shape, dtype):
    x = make_images(*shape, dtype, seed=sum(shape))
    out = snr_mask(x)
    expected = reference.snr_mask(x)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    assert_map_matches(out, expected, x)


def test_gpu_tiles_with_every_loop():
    """An image of 18 x 4 tiles of 8 x 128 (ragged in both directions): the per-image max and the
    backward's sum over tile partials each take several TILE_BLOCK steps."""
    x = make_images(1, 137, 500, torch.float32, seed=8)
    out, grad = grad_of_weighted_sum(snr_mask, x)
    expected, ref_grad = grad_of_weighted_sum(reference.snr_mask, x)
    assert_map_matches(out, expected, x)
    assert_close(grad, ref_grad, 1e-5, what="dx")


def test_two_launches():
    x = make_images(2, 17, 33, torch.float32, seed=0)
    snr_mask(x)
    assert dict(_common.LAUNCHES) == {"snr_mask_ratio": 1, "snr_mask_normalize": 1}


def test_strided_input():
    """A channels-last batch and a cropped view give the same map as their contiguous copies."""
    x = make_images(2, 20, 40, torch.float64, seed=1)
    cl = x.contiguous(memory_format=torch.channels_last)
    crop = x[:, :, 3:16, 5:30]
    assert_map_matches(snr_mask(cl), reference.snr_mask(x), x)
    assert_map_matches(snr_mask(crop), reference.snr_mask(crop.contiguous()), crop)


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)], ids=str)
def test_half_precision_against_float64(dtype, rel):
    """16-bit inputs computed in float32, rounded once at the end: within 2 ulps of the [0, 1] map
    (the output rounding is half an ulp; float32 cancellation in dark - light adds up to ~1e-3).
    The reference itself run in bf16 is far worse (errors near 1), so the truth is the float64
    reference of the same rounded inputs."""
    x = make_images(2, 17, 33, dtype, seed=2)
    out, grad = grad_of_weighted_sum(snr_mask, x)
    expected, expected_grad = grad_of_weighted_sum(reference.snr_mask, x.double())
    assert out.dtype == dtype and grad.dtype == dtype
    assert_close(out, expected, rel, what="out")
    assert_close(grad, expected_grad, 2 * rel, what="dx")


BACKWARD_CASES = [
    # (B, H, W, dtype)
    (2, 5, 7, torch.float64),
    (3, 17, 33, torch.float64),
    (1, 3, 3, torch.float64),
    (2, 17, 33, torch.float32),
    (1, 4, 6, torch.float32),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-{c[3]}")
def test_backward_matches_reference(case):
    b, h, w, dtype = case
    x = make_images(b, h, w, dtype, seed=h * w)
    _, grad = grad_of_weighted_sum(snr_mask, x)
    # The float32 reference, not the float64 one: the map is ill-conditioned (1 / (|dark - light| + 1e-4)),
    # so float32 and float64 maps differ by far more than float32 rounding; the kernel recomputes the
    # reference's float32 forward values exactly, and its gradient then differs only in the order of
    # the per-image sum of the peak's gradient and of the transposed blur's taps.
    _, ref_grad = grad_of_weighted_sum(reference.snr_mask, x)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, 1e-10 if dtype == torch.float64 else 1e-5, what="dx")


def test_backward_launches():
    x = make_images(1, 5, 7, torch.float64, seed=3).requires_grad_()
    snr_mask(x).sum().backward()
    assert dict(_common.LAUNCHES) == {"snr_mask_ratio": 1, "snr_mask_normalize": 1, "snr_mask_bwd_partials": 1,
                                      "snr_mask_bwd_peak": 1, "snr_mask_bwd_pixel": 1, "snr_mask_bwd_input": 1}


def test_backward_with_ties_zero_differences_and_clamping():
    """Flat regions make dark == light (|.| has sgn 0 there) and many pixels tie at the per-image max
    (the max's gradient is shared among them); negative inputs give negative ratios that the clamp
    cuts (no gradient there)."""
    x = make_images(2, 9, 11, torch.float64, seed=4, low=-0.5, high=1.0)
    x[0, :, :, :6] = 0.25  # flat block: ratio = 0.25 / 1e-4 for many pixels, ties at the peak
    x[0, :, 5:, 6:] = -0.3  # flat negative block: ratio -0.3 / 1e-4, clamped to 0
    x[1] = 0.5  # a flat image: every pixel ties
    out, grad = grad_of_weighted_sum(snr_mask, x)
    expected, ref_grad = grad_of_weighted_sum(reference.snr_mask, x)
    assert_map_matches(out, expected, x)
    assert (expected == 0).any(), "the test needs clamped pixels"
    assert_close(grad, ref_grad, 1e-10, what="dx")


def test_registered_op_schema_fake_and_autograd():
    x = make_images(1, 5, 7, torch.float64, seed=6).requires_grad_()
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    # raise_exception=False: each check's outcome comes back ("SUCCESS" or the exception), so the assertion
    # can fail; comparing the whole dict also catches a check that did not run.
    result = torch.library.opcheck(snr_mask_fwd, (x,), test_utils=checks, raise_exception=False)
    assert result == dict.fromkeys(checks, "SUCCESS"), result


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="RGB"):
        snr_mask(torch.rand(1, 1, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="H, W >= 3"):
        snr_mask(torch.rand(1, 3, 2, 8, device=DEVICE))
