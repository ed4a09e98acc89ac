"""PSNR/SSIM against the published code's values, and the batched torch twins against the uint8 ones."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lfpv_fast.training.metrics import gaussian_kernel_1d, psnr, psnr_batch, quantize, ssim, ssim_batch

CASE = torch.load(Path(__file__).parent / "data" / "metrics_case.pt", weights_only=True)["shared"]


def test_golden_psnr_ssim_match_published() -> None:
    a, b = CASE["a_hwc_uint8"], CASE["b_hwc_uint8"]
    assert abs(psnr(a, b) - CASE["psnr"]) < 1e-10
    assert abs(ssim(a, b) - CASE["ssim"]) < 1e-10
    # numpy input gives the same, and the metrics are symmetric
    assert psnr(a.numpy(), b.numpy()) == psnr(a, b)
    assert abs(ssim(b.numpy(), a.numpy()) - CASE["ssim"]) < 1e-10


def test_golden_batched_match_published() -> None:
    a = CASE["a_hwc_uint8"].permute(2, 0, 1)[None].double() / 255
    b = CASE["b_hwc_uint8"].permute(2, 0, 1)[None].double() / 255
    p, s = psnr_batch(a, b), ssim_batch(a, b)
    assert p.dtype == torch.float64 and s.dtype == torch.float64 and p.shape == (1,)
    assert abs(p.item() - CASE["psnr"]) < 1e-10
    assert abs(s.item() - CASE["ssim"]) < 1e-10


def test_gaussian_window_is_opencv_kernel() -> None:
    g = gaussian_kernel_1d()
    x = np.arange(11) - 5.0
    expected = np.exp(-(x**2) / (2 * 1.5**2))
    np.testing.assert_allclose(g, expected / expected.sum(), rtol=0, atol=1e-16)
    assert g.argmax() == 5 and abs(g.sum() - 1) < 1e-15


def test_identical_images() -> None:
    a = CASE["a_hwc_uint8"]
    assert psnr(a, a) == math.inf
    assert abs(ssim(a, a) - 1.0) < 1e-12
    x = a.permute(2, 0, 1)[None].float() / 255
    assert psnr_batch(x, x).item() == math.inf
    assert abs(ssim_batch(x, x).item() - 1.0) < 1e-12


def test_psnr_hand_computed() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 48  # mse = 48^2 / 48 = 48
    assert abs(psnr(a, b) - 20 * math.log10(255 / math.sqrt(48))) < 1e-12


def test_ssim_constant_shift_hand_computed() -> None:
    # Constant images: sigma terms vanish, SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a = np.full((16, 20, 3), 100, np.uint8)
    b = np.full((16, 20, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert abs(ssim(a, b) - (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)) < 1e-12


def test_quantize_follows_published_tensor2img() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 17, 19, generator=g, dtype=torch.float64) * 1.4 - 0.2
    # Values straddling rounding boundaries, where a float64 and a float32 quantization can disagree.
    x[0, 0, 0, :10] = (torch.arange(10, dtype=torch.float64) + 0.5) / 255
    # Published: tensor.float().clamp_(0, 1); (img_np * 255.0).round(); astype(uint8)
    published = np.round(np.clip(x.float().numpy(), 0, 1) * 255.0).astype(np.uint8)
    q = quantize(x)
    assert q.dtype == torch.uint8
    np.testing.assert_array_equal(q.numpy(), published)
    assert q.min() == 0 and q.max() == 255  # clamped, not wrapped


def test_batched_equal_uint8_versions() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.rand(3, 3, 24, 31, generator=g)
    pred = (target + 0.1 * torch.randn(3, 3, 24, 31, generator=g)).clamp(-0.1, 1.1)
    p, s = psnr_batch(pred, target), ssim_batch(pred, target)
    assert p.shape == (3,) and s.shape == (3,)
    for i in range(3):
        a = quantize(pred[i]).permute(1, 2, 0)
        b = quantize(target[i]).permute(1, 2, 0)
        assert abs(p[i].item() - psnr(a, b)) < 1e-10
        assert abs(s[i].item() - ssim(a, b)) < 1e-10
    # different images get different values: the batch is not reduced across images
    assert len(set(p.tolist())) == 3


def test_grayscale_and_single_channel() -> None:
    g = np.random.default_rng(0)
    a = g.integers(0, 256, (20, 20), dtype=np.uint8)
    b = g.integers(0, 256, (20, 20), dtype=np.uint8)
    assert ssim(a, b) == ssim(a[:, :, None], b[:, :, None])
    assert psnr(a, b) == psnr(a[:, :, None], b[:, :, None])


def test_bad_inputs_raise_clear_errors() -> None:
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[:19])
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:10], a[:10])
    with pytest.raises(ValueError, match="HxWxC"):
        psnr(a[:, :, :2], a[:, :, :2])
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        psnr_batch(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        ssim_batch(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.zeros(3, dtype=torch.uint8))
