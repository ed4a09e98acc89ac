"""SNR map of an RGB batch in two launches, forward and backward; same as `lfpv_fast.ops.reference.snr_mask`.

light = lum(blur5(x)), dark = lum(x), ratio = light / (|dark - light| + 1e-4),
out = clamp(ratio / (max_per_image(ratio) + 1e-4), 0, 1).

Forward: kernel 1 computes the ratio of a BLOCK_H x BLOCK_W tile and that tile's max (written to a
(B, tiles) buffer: deterministic, no atomics); kernel 2 reduces the tile maxima of its image and
normalises + clamps its part of the image.

Rounding parity: ratio has a cancellation (dark - light, then + 1e-4 and a division), so a one-ulp
difference in `light` can move the ratio by ~1e-3 relative in float32. The kernels therefore repeat
the reference's operations in its order: blur each channel by summing the 25 taps row by row from
zero then dividing by 25 (what avg_pool2d does), then take the luminance of the blurred channels as
(r*0.299 + g*0.587) + b*0.114, with IEEE divisions and, on the GPU, products that the compiler may
not fuse into FMAs (libdevice mul_rn). In float32 and float64 the result then matches the reference
bit for bit on the CPU interpreter. bf16/fp16 inputs are computed in float32 (the reference would
compute in the 16-bit type).

Backward (four launches; the SNR map is computed from the low-light input, which never needs a
gradient in training, so it is written for correctness rather than speed): per-tile partial sums of
the gradient reaching the per-image max; their sum per image; then dlight and ddark per pixel; then the
transposed reflect-101 blur as a gather with per-tap multiplicities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lfpv_fast.kernels._common import Target, accumulator_dtype, div_ieee, launch, new_output, target_for

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lum(r, g, b, NO_FMA: tl.constexpr):
    """reference.luminance, x0*0.299 + x1*0.587 + x2*0.114 evaluated left to right, every product
    rounded on its own: on the GPU mul_rn keeps the compiler from contracting a product with the
    following add into an FMA (the reference's separate torch ops never fuse). The interpreter has no
    libdevice but never fuses either."""
    if NO_FMA:
        z = tl.zeros_like(r)  # mul_rn needs tensor operands of one dtype: z + w is w in r's dtype
        y = libdevice.mul_rn(r, z + 0.299) + libdevice.mul_rn(g, z + 0.587)
        y = y + libdevice.mul_rn(b, z + 0.114)
    else:
        y = (r * 0.299 + g * 0.587) + b * 0.114
    return y


@triton.jit
def _tile_coords(pid_t, n_tiles_w, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    th = pid_t // n_tiles_w
    tw = pid_t % n_tiles_w
    rows = th * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tw * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (rows[:, None] < H) & (cols[None, :] < W)
    return rows, cols, ok


@triton.jit
def _ratio_tile(X, sxc, sxh, sxw, rows, cols, ok, H, W, IS_FP64: tl.constexpr, NO_FMA: tl.constexpr):
    """(ratio, light, dark) of a tile, in the accumulator dtype, in the reference's operation order.

    The loops inline their arithmetic: under TRITON_INTERPRET every @triton.jit helper call costs
    milliseconds."""
    if IS_FP64:
        s0 = tl.zeros(ok.shape, dtype=tl.float64)
    else:
        s0 = tl.zeros(ok.shape, dtype=tl.float32)
    s1 = s0
    s2 = s0
    # Lanes outside the image (ragged last tiles) read pixel (H-1, W-1) instead of masking: every load
    # then stays in bounds without a mask, and those lanes are never stored.
    rows = tl.minimum(rows, H - 1)
    cols = tl.minimum(cols, W - 1)
    X1 = X + sxc
    X2 = X + 2 * sxc
    # reflect-101 column offsets of the five taps: -1 -> 1, W -> W - 2 (torch "reflect" padding)
    c0 = tl.abs(cols - 2)
    c1 = tl.abs(cols - 1)
    c3 = cols + 1
    c4 = cols + 2
    c3 = (tl.where(c3 >= W, 2 * (W - 1) - c3, c3) * sxw)[None, :]
    c4 = (tl.where(c4 >= W, 2 * (W - 1) - c4, c4) * sxw)[None, :]
    c0 = (c0 * sxw)[None, :]
    c1 = (c1 * sxw)[None, :]
    c2 = (cols * sxw)[None, :]
    # avg_pool2d's order: the 25 taps row by row, added to a zero accumulator (16-bit loads promote
    # to the accumulator dtype in the add)
    for di in tl.static_range(5):
        r = tl.abs(rows + (di - 2))
        r = (tl.where(r >= H, 2 * (H - 1) - r, r) * sxh)[:, None]
        for dj in tl.static_range(5):
            if dj == 0:
                off = r + c0
            elif dj == 1:
                off = r + c1
            elif dj == 2:
                off = r + c2
            elif dj == 3:
                off = r + c3
            else:
                off = r + c4
            s0 = s0 + tl.load(X + off)
            s1 = s1 + tl.load(X1 + off)
            s2 = s2 + tl.load(X2 + off)
    off = (rows * sxh)[:, None] + c2
    c0 = tl.load(X + off).to(s0.dtype)
    c1 = tl.load(X1 + off).to(s0.dtype)
    c2 = tl.load(X2 + off).to(s0.dtype)
    dark = _lum(c0, c1, c2, NO_FMA)
    if IS_FP64:
        light = _lum(s0 / 25.0, s1 / 25.0, s2 / 25.0, NO_FMA)
        ratio = light / (tl.abs(dark - light) + 0.0001)
    else:
        # float32 "/" is an approximate division on NVIDIA GPUs; div_rn is IEEE, like torch
        light = _lum(tl.math.div_rn(s0, 25.0), tl.math.div_rn(s1, 25.0), tl.math.div_rn(s2, 25.0), NO_FMA)
        ratio = tl.math.div_rn(light, tl.abs(dark - light) + 0.0001)
    return ratio, light, dark


@triton.jit
def _image_peak(TILE_MAX, n_tiles, TILE_BLOCK: tl.constexpr):
    offs = tl.arange(0, TILE_BLOCK)
    m = tl.load(TILE_MAX + offs, mask=offs < n_tiles, other=float("-inf"))
    for start in range(TILE_BLOCK, n_tiles, TILE_BLOCK):
        m = tl.maximum(m, tl.load(TILE_MAX + start + offs, mask=start + offs < n_tiles, other=float("-inf")))
    return tl.max(m, axis=0)


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_tiles_w", "n_tiles"])
def _snr_ratio_kernel(
    X, RATIO, TILE_MAX,
    sxb, sxc, sxh, sxw,
    H, W, n_tiles_w, n_tiles,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, IS_FP64: tl.constexpr, NO_FMA: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, cols, ok = _tile_coords(pid_t, n_tiles_w, H, W, BLOCK_H, BLOCK_W)
    ratio, _, _ = _ratio_tile(X + b * sxb, sxc, sxh, sxw, rows, cols, ok, H, W, IS_FP64, NO_FMA)
    tl.store(RATIO + b * H * W + rows[:, None] * W + cols[None, :], ratio, mask=ok)
    tile_max = tl.max(tl.max(tl.where(ok, ratio, float("-inf")), axis=1), axis=0)
    tl.store(TILE_MAX + b * n_tiles + pid_t, tile_max)


@triton.jit(do_not_specialize=["n_tiles"])
def _snr_normalize_kernel(
    RATIO, TILE_MAX, OUT, PEAK,
    HW, n_tiles,
    BLOCK: tl.constexpr, TILE_BLOCK: tl.constexpr, IS_FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    peak = _image_peak(TILE_MAX + b * n_tiles, n_tiles, TILE_BLOCK)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < HW
    ratio = tl.load(RATIO + b * HW + offs, mask=ok, other=0.0)
    t = div_ieee(ratio, peak + 0.0001, IS_FP64)  # reference: ratio * 1.0 / (peak + 1e-4); "* 1.0" is exact
    # torch.clamp(min=0, max=1) keeps NaN; comparisons with NaN are False so these wheres keep it too
    t = tl.where(t < 0.0, 0.0, t)
    t = tl.where(t > 1.0, 1.0, t)
    tl.store(OUT + b * HW + offs, t.to(OUT.dtype.element_ty), mask=ok)
    if pid == 0:
        tl.store(PEAK + b, peak)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _clamp_pass(ratio, g, ok, peak, IS_FP64: tl.constexpr):
    """(denominator D = peak + 1e-4, gradient reaching t = ratio / D through the clamp)."""
    denom = peak + 0.0001
    t = div_ieee(ratio, denom, IS_FP64)
    # torch's clamp backward passes the gradient where min <= t <= max (bounds included)
    gt = tl.where(ok & (t >= 0.0) & (t <= 1.0), g, 0.0)
    return denom, gt


@triton.jit(do_not_specialize=["n_tiles_w", "n_tiles"])
def _snr_bwd_partials_kernel(
    X, G, PEAK, PART_S, PART_N,
    sxb, sxc, sxh, sxw, sgb, sgh, sgw,
    H, W, n_tiles_w, n_tiles,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, IS_FP64: tl.constexpr, NO_FMA: tl.constexpr,
):
    """Per tile: sum of g_t * (t / D) / D (minus the gradient of D) and the count of pixels equal to the peak."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, cols, ok = _tile_coords(pid_t, n_tiles_w, H, W, BLOCK_H, BLOCK_W)
    ratio, _, _ = _ratio_tile(X + b * sxb, sxc, sxh, sxw, rows, cols, ok, H, W, IS_FP64, NO_FMA)
    g = tl.load(G + b * sgb + rows[:, None] * sgh + cols[None, :] * sgw, mask=ok, other=0.0).to(ratio.dtype)
    peak = tl.load(PEAK + b)
    denom, gt = _clamp_pass(ratio, g, ok, peak, IS_FP64)
    # div backward w.r.t. the divisor, as torch writes it: -grad * ((self / other) / other)
    part = gt * div_ieee(div_ieee(ratio, denom, IS_FP64), denom, IS_FP64)
    tl.store(PART_S + b * n_tiles + pid_t, tl.sum(tl.sum(part, axis=1), axis=0))
    ties = tl.where(ok & (ratio == peak), 1, 0)
    tl.store(PART_N + b * n_tiles + pid_t, tl.sum(tl.sum(ties, axis=1), axis=0))


@triton.jit(do_not_specialize=["n_tiles"])
def _snr_bwd_peak_kernel(PART_S, PART_N, PEAK_GRAD, n_tiles, TILE_BLOCK: tl.constexpr):
    """Per image: the gradient reaching the peak, shared equally by the pixels equal to it (torch's amax
    backward), from the tiles' partial sums in a fixed order."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, TILE_BLOCK)
    s_acc = tl.load(PART_S + b * n_tiles + offs, mask=offs < n_tiles, other=0.0)
    n_acc = tl.load(PART_N + b * n_tiles + offs, mask=offs < n_tiles, other=0)
    for start in range(TILE_BLOCK, n_tiles, TILE_BLOCK):
        s_acc += tl.load(PART_S + b * n_tiles + start + offs, mask=start + offs < n_tiles, other=0.0)
        n_acc += tl.load(PART_N + b * n_tiles + start + offs, mask=start + offs < n_tiles, other=0)
    g_peak = -tl.sum(s_acc, axis=0)
    n_ties = tl.sum(n_acc, axis=0)
    tl.store(PEAK_GRAD + b, div_ieee(g_peak, n_ties.to(g_peak.dtype), g_peak.dtype == tl.float64))


@triton.jit(do_not_specialize=["n_tiles_w"])
def _snr_bwd_pixel_kernel(
    X, G, PEAK, PEAK_GRAD, GLIGHT, GDARK,
    sxb, sxc, sxh, sxw, sgb, sgh, sgw,
    H, W, n_tiles_w,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, IS_FP64: tl.constexpr, NO_FMA: tl.constexpr,
):
    """Per pixel: gradients of light and dark (the ratio's two inputs)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, cols, ok = _tile_coords(pid_t, n_tiles_w, H, W, BLOCK_H, BLOCK_W)
    ratio, light, dark = _ratio_tile(X + b * sxb, sxc, sxh, sxw, rows, cols, ok, H, W, IS_FP64, NO_FMA)
    g = tl.load(G + b * sgb + rows[:, None] * sgh + cols[None, :] * sgw, mask=ok, other=0.0).to(ratio.dtype)
    peak = tl.load(PEAK + b)
    denom, gt = _clamp_pass(ratio, g, ok, peak, IS_FP64)
    g_ratio = div_ieee(gt, denom, IS_FP64)
    g_ratio += tl.where(ratio == peak, tl.load(PEAK_GRAD + b), 0.0)

    # ratio = light / den, den = |dark - light| + 1e-4
    den = tl.abs(dark - light) + 0.0001
    g_den = -g_ratio * div_ieee(div_ieee(light, den, IS_FP64), den, IS_FP64)
    u = dark - light
    g_u = tl.where(u > 0, g_den, tl.where(u < 0, -g_den, 0.0))  # abs backward: sgn(0) = 0
    g_light = div_ieee(g_ratio, den, IS_FP64) - g_u
    offs_px = b * H * W + rows[:, None] * W + cols[None, :]
    tl.store(GLIGHT + offs_px, g_light, mask=ok)
    tl.store(GDARK + offs_px, g_u, mask=ok)


@triton.jit(do_not_specialize=["n_tiles_w"])
def _snr_bwd_input_kernel(
    GLIGHT, GDARK, DX,
    sdb, sdc, sdh, sdw,
    H, W, n_tiles_w,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, IS_FP64: tl.constexpr,
):
    """dx_c = w_c * ddark + w_c * blur5^T(dlight), the transposed blur gathered from the 5x5 neighbours.

    Along one axis of size n, the reflect-101 5-window centred on q reads input p (|p - q| <= 2)
    m(p, q) times: 1 when q is inside the image, plus 1 for the low reflection (p in {1, 2} read as -p
    by windows with p + q <= 2) and 1 for the high reflection (p in {n-3, n-2} read as 2(n-1) - p by
    windows with p + q >= 2n - 4). The 2-D multiplicity is the product of the two axes'."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, cols, ok = _tile_coords(pid_t, n_tiles_w, H, W, BLOCK_H, BLOCK_W)
    GLIGHT += b * H * W
    if IS_FP64:
        acc = tl.zeros(ok.shape, dtype=tl.float64)
    else:
        acc = tl.zeros(ok.shape, dtype=tl.float32)
    row_low = (rows >= 1) & (rows <= 2)
    row_high = (rows >= H - 3) & (rows <= H - 2)
    col_low = (cols >= 1) & (cols <= 2)
    col_high = (cols >= W - 3) & (cols <= W - 2)
    for er in tl.static_range(5):
        q_r = rows + (er - 2)
        m_r = tl.where((q_r >= 0) & (q_r < H), 1 + (row_low & (rows + q_r <= 2)).to(tl.int32)
                       + (row_high & (rows + q_r >= 2 * H - 4)).to(tl.int32), 0)
        for ec in tl.static_range(5):
            q_c = cols + (ec - 2)
            m_c = tl.where((q_c >= 0) & (q_c < W), 1 + (col_low & (cols + q_c <= 2)).to(tl.int32)
                           + (col_high & (cols + q_c >= 2 * W - 4)).to(tl.int32), 0)
            m = m_r[:, None] * m_c[None, :]
            live = ok & (m > 0)
            gl = tl.load(GLIGHT + q_r[:, None] * W + q_c[None, :], mask=live, other=0.0)
            acc += m.to(acc.dtype) * gl
    if IS_FP64:
        g_blur = acc / 25.0
    else:
        g_blur = tl.math.div_rn(acc, 25.0)
    g_dark = tl.load(GDARK + b * H * W + rows[:, None] * W + cols[None, :], mask=ok, other=0.0)
    base = DX + b * sdb + rows[:, None] * sdh + cols[None, :] * sdw
    tl.store(base, (g_dark * 0.299 + g_blur * 0.299).to(DX.dtype.element_ty), mask=ok)
    tl.store(base + sdc, (g_dark * 0.587 + g_blur * 0.587).to(DX.dtype.element_ty), mask=ok)
    tl.store(base + 2 * sdc, (g_dark * 0.114 + g_blur * 0.114).to(DX.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launch configuration and custom ops
# ----------------------------------------------------------------------------------------------


def _tile_config(target: Target) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_W, BLOCK of the normalise kernel, TILE_BLOCK of the tile-max reduction).

    8 x 128 = 1024 pixels per program (4 warps), loads coalesced along W: a 960-wide image is 8 column
    tiles. The per-image max reads TILE_BLOCK tile maxima per step (a 512 x 960 image has 512 tiles).
    The same on sm_80 and sm_90, and under the interpreter, whose tests therefore cover these tiles.
    """
    return 8, 128, 1024, 64


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"snr_mask expects a (B,3,H,W) RGB batch, got shape {tuple(x.shape)}")
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"snr_mask needs H, W >= 3 for the 5x5 reflect-101 blur, got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"snr_mask supports {_SUPPORTED_DTYPES}, got {x.dtype}")


def _no_fma(target: Target) -> bool:
    # The interpreter has no libdevice (mul_rn), and never fuses a product and an add anyway: the one
    # switch that differs between the interpreter and the GPU, and both round every product alone.
    return not target.interpreter


@torch.library.triton_op("lfpv::snr_mask_fwd", mutates_args=())
def snr_mask_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SNR map (B,1,H,W) in x's dtype, per-image peak ratio (B,) in the accumulator dtype)."""
    _check_input(x)
    b, _, h, w = x.shape
    acc = accumulator_dtype(x.dtype)
    target = target_for(x.device)
    block_h, block_w, block, tile_block = _tile_config(target)
    n_tiles_w = triton.cdiv(w, block_w)
    n_tiles = triton.cdiv(h, block_h) * n_tiles_w
    out = new_output((b, 1, h, w), x.dtype, x.device)
    # float32/float64: the ratio goes into `out` and is normalised in place; 16-bit outputs keep the
    # ratio in float32 scratch so that it is rounded once, after the normalisation.
    ratio = out if x.dtype == acc else torch.empty((b, 1, h, w), dtype=acc, device=x.device)
    tile_max = torch.empty((b, n_tiles), dtype=acc, device=x.device)
    peak = new_output((b,), acc, x.device)
    is_fp64 = x.dtype == torch.float64
    launch(
        "snr_mask_ratio", _snr_ratio_kernel, (n_tiles, b),
        x, ratio, tile_max, *x.stride(), h, w, n_tiles_w, n_tiles,
        BLOCK_H=block_h, BLOCK_W=block_w, IS_FP64=is_fp64, NO_FMA=_no_fma(target), num_warps=4,
    )
    launch(
        "snr_mask_normalize", _snr_normalize_kernel, (triton.cdiv(h * w, block), b),
        ratio, tile_max, out, peak, h * w, n_tiles,
        BLOCK=block, TILE_BLOCK=tile_block, IS_FP64=is_fp64, num_warps=4,
    )
    return out, peak


@torch.library.triton_op("lfpv::snr_mask_bwd", mutates_args=())
def snr_mask_bwd(grad_out: torch.Tensor, x: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """d(sum(grad_out * snr_mask(x)))/dx, (B,3,H,W) in x's dtype."""
    b, _, h, w = x.shape
    acc = accumulator_dtype(x.dtype)
    target = target_for(x.device)
    block_h, block_w, _, tile_block = _tile_config(target)
    n_tiles_w = triton.cdiv(w, block_w)
    n_tiles = triton.cdiv(h, block_h) * n_tiles_w
    is_fp64 = x.dtype == torch.float64
    g = grad_out[:, 0]  # (B, H, W) view
    part_s = torch.empty((b, n_tiles), dtype=acc, device=x.device)
    part_n = torch.empty((b, n_tiles), dtype=torch.int32, device=x.device)
    common = dict(BLOCK_H=block_h, BLOCK_W=block_w, IS_FP64=is_fp64, num_warps=4)
    launch(
        "snr_mask_bwd_partials", _snr_bwd_partials_kernel, (n_tiles, b),
        x, g, peak, part_s, part_n, *x.stride(), *g.stride(), h, w, n_tiles_w, n_tiles,
        NO_FMA=_no_fma(target), **common,
    )
    peak_grad = torch.empty((b,), dtype=acc, device=x.device)
    launch("snr_mask_bwd_peak", _snr_bwd_peak_kernel, (b,), part_s, part_n, peak_grad, n_tiles, TILE_BLOCK=tile_block)
    g_light = torch.empty((b, h, w), dtype=acc, device=x.device)
    g_dark = torch.empty((b, h, w), dtype=acc, device=x.device)
    launch(
        "snr_mask_bwd_pixel", _snr_bwd_pixel_kernel, (n_tiles, b),
        x, g, peak, peak_grad, g_light, g_dark, *x.stride(), *g.stride(), h, w, n_tiles_w,
        NO_FMA=_no_fma(target), **common,
    )
    dx = new_output((b, 3, h, w), x.dtype, x.device)
    launch(
        "snr_mask_bwd_input", _snr_bwd_input_kernel, (n_tiles, b),
        g_light, g_dark, dx, *dx.stride(), h, w, n_tiles_w, **common,
    )
    return dx


def _setup_context(ctx, inputs, output) -> None:
    (x,) = inputs
    _, peak = output
    ctx.save_for_backward(x, peak)


def _backward(ctx, grad_out, grad_peak):
    # grad_peak is ignored: the peak is an internal output that the public function never returns.
    x, peak = ctx.saved_tensors
    return snr_mask_bwd(grad_out, x, peak)


snr_mask_fwd.register_autograd(_backward, setup_context=_setup_context)


def snr_mask(x: torch.Tensor) -> torch.Tensor:
    """SNR map (B,1,H,W) of an RGB batch (B,3,H,W); same as reference.snr_mask, differentiable."""
    return snr_mask_fwd(x)[0]
