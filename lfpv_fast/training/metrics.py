"""PSNR and SSIM exactly as the published evaluation computes them, plus batched torch twins.

The published test script turns the network output and the ground truth into uint8 HWC images
(`tensor2img`: cast to float32, clamp to [0, 1], multiply by 255, round half to even, cast to uint8)
and then calls `calculate_psnr` / `calculate_ssim` on them:

- PSNR: MSE of the uint8 values in float64; `20 * log10(255 / sqrt(mse))`; identical images give +inf.
- SSIM: float64; an 11x11 Gaussian window (sigma 1.5, the outer product of OpenCV's 1-D kernel),
  C1 = (0.01*255)^2, C2 = (0.03*255)^2; the filtered maps are cut to the 'valid' region (5 pixels
  off every border, so the border mode never matters); the SSIM map is averaged over every pixel
  of every channel. (The published `calculate_ssim` runs `ssim` on the whole 3-channel image three
  times instead of once per channel; the mean of the 3-channel map is the per-channel average.)

`psnr` / `ssim` take uint8 images (numpy or torch, HxW or HxWxC); `psnr_batch` / `ssim_batch` take
float (B,3,H,W) batches in [0, 1] on any device, quantize them like `tensor2img`, and return the
same numbers per image (float64), so that validation can run on the training device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2
PEAK = 255.0


def gaussian_kernel_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """OpenCV's getGaussianKernel(size, sigma) in float64: exp(-x^2 / (2 sigma^2)), normalised to sum 1."""
    x = np.arange(size, dtype=np.float64) - (size - 1) * 0.5
    kernel = np.exp((-0.5 / (sigma * sigma)) * x * x)
    return kernel * (1.0 / kernel.sum())


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float image(s) in [0, 1] -> uint8, as the published `tensor2img`: round(clamp(float32(x), 0, 1) * 255).

    The cast to float32 comes first because the published code calls `.float()` before scaling, so a
    float64 value near a rounding boundary quantizes as its float32 neighbour does. Rounding is half
    to even (numpy's and torch's `round`).
    """
    if not torch.is_tensor(x):
        raise TypeError(f"quantize expects a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor in [0, 1], got dtype {x.dtype}")
    return (x.to(torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _as_uint8_array(img: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if torch.is_tensor(img):
        img = img.detach().cpu().numpy()
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"{name}: expected a uint8 image (values 0..255), got dtype {img.dtype}; "
                        "quantize float images in [0, 1] with lfpv_fast.training.metrics.quantize first")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"{name}: expected an HxW or HxWxC image with C in (1, 3), got shape {img.shape}")
    return img


def _pair(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_uint8_array(a, "first image"), _as_uint8_array(b, "second image")
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _psnr_from_mse(mse: float) -> float:
    if mse == 0:
        return math.inf  # published: identical images give inf
    return 20 * math.log10(PEAK / math.sqrt(mse))


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR (dB) of two uint8 images with peak 255, as the published `calculate_psnr`; inf if identical."""
    a, b = _pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return _psnr_from_mse(float(np.mean(diff**2)))


def _valid_filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of an HxW(xC) float64 image with kernel x kernel (per channel)."""
    k = kernel.shape[0]
    h, w = img.shape[:2]
    rows = sum(kernel[i] * img[i:h - k + 1 + i] for i in range(k))
    return sum(kernel[j] * rows[:, j:w - k + 1 + j] for j in range(k))


def _ssim_map_terms(mu1: torch.Tensor | np.ndarray, mu2, s11, s22, s12):
    """The SSIM map from the filtered means and second moments (shared by numpy and torch paths)."""
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq, sigma2_sq, sigma12 = s11 - mu1_sq, s22 - mu2_sq, s12 - mu1_mu2
    return ((2 * mu1_mu2 + SSIM_C1) * (2 * sigma12 + SSIM_C2)) / (
        (mu1_sq + mu2_sq + SSIM_C1) * (sigma1_sq + sigma2_sq + SSIM_C2))


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """SSIM of two uint8 images as the published `calculate_ssim` (see the module docstring)."""
    a, b = _pair(a, b)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[:2]}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    g = gaussian_kernel_1d()
    ssim_map = _ssim_map_terms(_valid_filter(x, g), _valid_filter(y, g), _valid_filter(x * x, g),
                               _valid_filter(y * y, g), _valid_filter(x * y, g))
    return float(ssim_map.mean())


def _check_batch(pred: torch.Tensor, target: torch.Tensor) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() != 4 or t.shape[1] != 3:
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name}: expected a float (B,3,H,W) batch in [0, 1], got {shape}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def psnr_batch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) float64 of float (B,3,H,W) batches in [0, 1], quantized as `quantize`."""
    _check_batch(pred, target)
    diff = quantize(pred).to(torch.float64) - quantize(target).to(torch.float64)
    mse = (diff * diff).flatten(1).mean(dim=1)
    out = 20 * torch.log10(PEAK / torch.sqrt(mse))
    return torch.where(mse == 0, torch.full_like(out, math.inf), out)


def ssim_batch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) float64 of float (B,3,H,W) batches in [0, 1], quantized as `quantize`."""
    _check_batch(pred, target)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {tuple(pred.shape[-2:])}")
    x = quantize(pred).to(torch.float64)
    y = quantize(target).to(torch.float64)
    g = torch.from_numpy(gaussian_kernel_1d()).to(x.device)
    channels = x.shape[1]
    col = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous()
    row = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:  # 'valid' separable correlation, per channel
        return F.conv2d(F.conv2d(t, col, groups=channels), row, groups=channels)

    ssim_map = _ssim_map_terms(filt(x), filt(y), filt(x * x), filt(y * y), filt(x * y))
    return ssim_map.flatten(1).mean(dim=1)


def gray_opencv(img: np.ndarray) -> np.ndarray:
    """Gray levels of a uint8 RGB image exactly as OpenCV's cvtColor(COLOR_RGB2GRAY) computes them on uint8:
    (4899 R + 9617 G + 1868 B + 2^13) >> 14, i.e. 0.299 R + 0.587 G + 0.114 B in 14-bit fixed point, rounded."""
    x = _as_uint8_array(img, "image").astype(np.int64)
    if x.ndim == 2:
        return x
    return (4899 * x[..., 0] + 9617 * x[..., 1] + 1868 * x[..., 2] + (1 << 13)) >> 14


def psnr_gt_mean(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """GT-mean-corrected PSNR, as several LOL papers report it next to the plain PSNR (not comparable with it):
    the uint8 output is scaled by k = mean gray(gt) / mean gray(pred) (gray as `gray_opencv`), clipped to
    [0, 255] and, not re-quantized, compared with the ground truth by the PSNR formula above. It forgives a
    wrong overall brightness. An all-black output (mean 0) is left as it is (k = 1)."""
    a, b = _pair(pred, gt)
    mean_pred, mean_gt = float(gray_opencv(a).mean()), float(gray_opencv(b).mean())
    k = mean_gt / mean_pred if mean_pred > 0 else 1.0
    scaled = np.clip(a.astype(np.float64) * k, 0.0, 255.0)
    return _psnr_from_mse(float(np.mean((scaled - b.astype(np.float64)) ** 2)))
