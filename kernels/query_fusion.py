"""Query-and-fusion of the LFPV banks: Triton forward and backward, registered as `lfpv::query_fusion`.

The op (see `lfpv_fast.reference.query_fusion`) adds to every feature pixel the softmax-weighted sum of
the raw vector bank (queries: LayerNorm of the pixel's C-vector, keys: LayerNorm of the bank) and to
every p x p patch the same over the patch bank (D = C*p*p values per patch, channel-major).

Design:
- A program owns a tile of G consecutive patches of one patch row of one image (about 4K values).
  The whole (G, C, p*p) block is loaded once and, permuted to (G*p*p, C), gives the pixel queries;
  seen as (G, D) it gives the patch LayerNorm statistics. Everything touching the (N, D) patch bank
  runs over chunks of 16 channels (re-reading the block's chunk from L1/L2), so register tiles stay
  small. Both attentions are `tl.dot`s; the output (features + both updates) is written once.
- The two bank LayerNorms (keys) are tiny (N x C and N x D) and shared by every program: a small
  kernel computes them once per call, in the accumulator dtype; backward recomputes them, and a last
  small kernel takes the key grads back through their LayerNorm, adds the value path's bank grads and
  rounds each bank grad once (two separately rounded bf16 paths would cancel badly).
- Backward recomputes LayerNorms and softmaxes from the features (cheaper than storing them). The
  first kernel writes d features, the partial sums of the pixel branch's parameter grads over its
  tiles (small (N, C) accumulators), and per patch its softmax weights, score grads and statistics
  (2N + 2 values). A second kernel owns a 16-channel column chunk of the patch bank and sums the
  patch branch's parameter grads over a range of patches. A third sums the partial rows. Fixed
  order everywhere, no atomics: bitwise reproducible.

Launches: forward 2 (keys, fused op); backward 5 (keys, d features, patch sums, row sums, keys' backward).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lfpv_fast.kernels._common import accumulator_dtype, launch, new_output

# Channel and bank dimensions are padded (masked) up to this: the K of a dot must be >= 16 for
# 16-bit and >= 8 for 32-bit operands on NVIDIA GPUs.
_MIN_DOT = 16
# Values of the (patches, C, p, p) block a program holds at once, forward and backward (which holds
# more per value). Chosen by register spills in offline sm_90 builds (ptxas -v), not yet by timings.
_TILE_ELEMENTS = 4096
_TILE_ELEMENTS_BWD = 2048
# Patches per step of the patch-parameter gradient kernel: the K of its dots (>= 16).
_PATCH_BLOCK = 16
# Channels per chunk of the patch-bank work (a chunk is 16 * p * p values of the D-vectors).
_CHUNK_CHANNELS = 16





# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile(t, c0, H, W, Hp, Wp, n_groups, total_tiles,
          C: tl.constexpr, P: tl.constexpr, CW: tl.constexpr, G: tl.constexpr):
    """Tile t = G consecutive patches of one patch row of one image; channels c0 .. c0+CW-1.

    Returns the element offsets (G, CW, P*P) into the (B,C,H,W) map, their mask, the patches'
    global indices (b*Hp + r)*Wp + pw (G,) and which of them exist (G,).
    """
    PP: tl.constexpr = P * P
    grp = t % n_groups
    rest = t // n_groups
    r = rest % Hp
    b = rest // Hp
    pw = grp * G + tl.arange(0, G)
    # Out-of-range tiles (a program's tail) get no valid patch. (A scalar bool `&` a tensor mask
    # comes out int32 under the interpreter, hence the where on the bound.)
    patch_ok = pw < tl.where(t < total_tiles, Wp, 0)
    c = c0 + tl.arange(0, CW)
    pp = tl.arange(0, PP)
    g3 = pw[:, None, None]
    c3 = c[None, :, None]
    pp3 = pp[None, None, :]
    rows = r * P + pp3 // P
    cols = g3 * P + pp3 % P
    offs = b.to(tl.int64) * C * H * W + c3.to(tl.int64) * H * W + rows * W + cols
    mask = patch_ok[:, None, None] & (c3 < C) & (pp3 < PP)
    return offs, mask, (b * Hp + r) * Wp + pw, patch_ok


@triton.jit
def _pixels(x, G: tl.constexpr, CW: tl.constexpr, PP: tl.constexpr):
    """(G, CW, PP) tile -> (G*PP, CW): one row per pixel."""
    return tl.reshape(tl.permute(x, (0, 2, 1)), (G * PP, CW))


@triton.jit
def _unpixels(x, G: tl.constexpr, CW: tl.constexpr, PP: tl.constexpr):
    """(G*PP, CW) -> (G, CW, PP), the inverse of _pixels."""
    return tl.permute(tl.reshape(x, (G, PP, CW)), (0, 2, 1))


@triton.jit
def _row_stats(x, col_ok, count: tl.constexpr, eps):
    """LayerNorm statistics of the rows of x (invalid columns hold 0): mean, rstd (two-pass variance)."""
    mean = tl.sum(x, axis=1) / count
    diff = tl.where(col_ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / count + eps)
    return mean, rstd


@triton.jit
def _normalize(x, mean, rstd, col_ok):
    return tl.where(col_ok, (x - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _softmax_rows(s, n_ok):
    s = tl.where(n_ok, s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _mm(a, b):
    # "ieee": float32 must not silently drop to tf32 on GPUs; float64 dots are exact fp64.
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_rows(ptr, n, cols, n_ok, col_ok, row_len, acc_ty):
    """ptr[n, cols] of a row-major (N, row_len) matrix, zero outside, as acc_ty."""
    return tl.load(ptr + n[:, None] * row_len + cols[None, :], mask=n_ok[:, None] & col_ok[None, :],
                   other=0.0).to(acc_ty)


@triton.jit
def _query_fusion_fwd_kernel(
    x_ptr, out_ptr, vbank_ptr, vkey_ptr, pbank_ptr, pkey_ptr, xw_ptr, xb_ptr, qw_ptr, qb_ptr,
    H, W, Hp, Wp, n_groups, total_tiles,
    C: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BC: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr,
    G: tl.constexpr, EPS: tl.constexpr,
):
    """One tile of G patches. The whole (G, C, PP) block is only held for the pixel queries and the
    patch statistics; everything that involves the (N, D) patch bank runs over chunks of CC channels
    (reloading the block's chunk, an L1/L2 hit) so that register tiles stay small."""
    acc_ty = vkey_ptr.dtype.element_ty  # keys are stored in the accumulator dtype
    eps = tl.full([], EPS, acc_ty)
    PP: tl.constexpr = P * P
    D: tl.constexpr = C * PP
    t = tl.program_id(0)
    n = tl.arange(0, BN)
    n_ok = n < N
    c = tl.arange(0, BC)
    c_ok = c < C

    offs, mask, _, _ = _tile(t, 0, H, W, Hp, Wp, n_groups, total_tiles, C, P, BC, G)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)  # (G, BC, PP)

    # Pixel branch: softmax weights (G*PP, BN) over the vector bank.
    xv = _pixels(x, G, BC, PP)
    mean_v, rstd_v = _row_stats(xv, c_ok[None, :], C, eps)
    w = tl.load(xw_ptr + c, mask=c_ok, other=0.0).to(acc_ty)
    bias = tl.load(xb_ptr + c, mask=c_ok, other=0.0).to(acc_ty)
    q = _normalize(xv, mean_v, rstd_v, c_ok[None, :]) * w[None, :] + bias[None, :]
    keys = _load_rows(vkey_ptr, n, c, n_ok, c_ok, C, acc_ty)
    probs_v = _softmax_rows(_mm(q, tl.trans(keys)), n_ok[None, :])

    # Patch branch: statistics over all D values, then the scores chunk by chunk.
    d_all = tl.arange(0, BC * PP)
    mean_p, rstd_p = _row_stats(tl.reshape(x, (G, BC * PP)), (d_all < D)[None, :], D, eps)
    scores = tl.zeros((G, BN), acc_ty)
    for c0 in tl.static_range(0, BC, CC):
        offs, mask, _, _ = _tile(t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G)
        xc = tl.reshape(tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty), (G, CC * PP))
        d = c0 * PP + tl.arange(0, CC * PP)
        d_ok = d < D
        wp = tl.load(qw_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
        bp = tl.load(qb_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
        qc = _normalize(xc, mean_p, rstd_p, d_ok[None, :]) * wp[None, :] + bp[None, :]
        scores += _mm(qc, tl.trans(_load_rows(pkey_ptr, n, d, n_ok, d_ok, D, acc_ty)))
    probs_p = _softmax_rows(scores, n_ok[None, :])

    # Output chunk by chunk: features + (vector update + patch update), the reference's order.
    for c0 in tl.static_range(0, BC, CC):
        offs, mask, _, _ = _tile(t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G)
        xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        cc = c0 + tl.arange(0, CC)
        d = c0 * PP + tl.arange(0, CC * PP)
        vector_update = _unpixels(_mm(probs_v, _load_rows(vbank_ptr, n, cc, n_ok, cc < C, C, acc_ty)), G, CC, PP)
        patch_update = tl.reshape(_mm(probs_p, _load_rows(pbank_ptr, n, d, n_ok, d < D, D, acc_ty)), (G, CC, PP))
        out = xc + (vector_update + patch_update)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _query_fusion_bwd_kernel(
    x_ptr, dout_ptr, dx_ptr, part_ptr, aux_ptr, vbank_ptr, vkey_ptr, pbank_ptr, pkey_ptr,
    xw_ptr, xb_ptr, qw_ptr, qb_ptr,
    H, W, Hp, Wp, n_groups, total_tiles, tiles_per_program, part_cols,
    C: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BC: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr,
    G: tl.constexpr, EPS: tl.constexpr,
):
    """d features for this program's tiles, its partial sums of the pixel branch's parameter grads
    (vector bank, vector keys, pixel LayerNorm: small enough for registers), and per patch the softmax
    weights, their score grads and the LayerNorm statistics (aux) for _query_fusion_bwd_patch_kernel."""
    acc_ty = vkey_ptr.dtype.element_ty
    eps = tl.full([], EPS, acc_ty)
    PP: tl.constexpr = P * P
    D: tl.constexpr = C * PP
    pid = tl.program_id(0)
    n = tl.arange(0, BN)
    n_ok = n < N
    c = tl.arange(0, BC)
    c_ok = c < C
    d_all = tl.arange(0, BC * PP)
    w = tl.load(xw_ptr + c, mask=c_ok, other=0.0).to(acc_ty)
    bias = tl.load(xb_ptr + c, mask=c_ok, other=0.0).to(acc_ty)
    keys = _load_rows(vkey_ptr, n, c, n_ok, c_ok, C, acc_ty)
    bank = _load_rows(vbank_ptr, n, c, n_ok, c_ok, C, acc_ty)

    # Masked (padded or out-of-range) pixels have dO = 0 and so add nothing to the sums.
    g_bank = tl.zeros((BN, BC), acc_ty)
    g_keys = tl.zeros((BN, BC), acc_ty)
    g_w = tl.zeros((BC,), acc_ty)
    g_b = tl.zeros((BC,), acc_ty)

    for k in range(tiles_per_program):
        t = pid * tiles_per_program + k
        offs, mask, patch, patch_ok = _tile(t, 0, H, W, Hp, Wp, n_groups, total_tiles, C, P, BC, G)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_ty)

        # Pixel branch, whole rows of C.
        xv = _pixels(x, G, BC, PP)
        dv = _pixels(dout, G, BC, PP)
        mean_v, rstd_v = _row_stats(xv, c_ok[None, :], C, eps)
        xhat = _normalize(xv, mean_v, rstd_v, c_ok[None, :])
        q = xhat * w[None, :] + bias[None, :]
        probs_v = _softmax_rows(_mm(q, tl.trans(keys)), n_ok[None, :])
        dprobs = _mm(dv, tl.trans(bank))
        ds_v = probs_v * (dprobs - tl.sum(probs_v * dprobs, axis=1)[:, None])
        g_bank += _mm(tl.trans(probs_v), dv)
        g_keys += _mm(tl.trans(ds_v), q)
        dq = _mm(ds_v, keys)
        g_w += tl.sum(dq * xhat, axis=0)
        g_b += tl.sum(dq, axis=0)
        dxhat = dq * w[None, :]
        m1_v = tl.sum(dxhat, axis=1) / C  # LayerNorm backward: dx = rstd (dxhat - m1 - xhat m2)
        m2_v = tl.sum(dxhat * xhat, axis=1) / C

        # Patch branch: statistics, then scores and their grads chunk by chunk.
        mean_p, rstd_p = _row_stats(tl.reshape(x, (G, BC * PP)), (d_all < D)[None, :], D, eps)
        scores = tl.zeros((G, BN), acc_ty)
        dprobs_p = tl.zeros((G, BN), acc_ty)
        for c0 in tl.static_range(0, BC, CC):
            offs, mask, _, _ = _tile(t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G)
            xc = tl.reshape(tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty), (G, CC * PP))
            dc = tl.reshape(tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_ty), (G, CC * PP))
            d = c0 * PP + tl.arange(0, CC * PP)
            d_ok = d < D
            wp = tl.load(qw_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
            bp = tl.load(qb_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
            qc = _normalize(xc, mean_p, rstd_p, d_ok[None, :]) * wp[None, :] + bp[None, :]
            scores += _mm(qc, tl.trans(_load_rows(pkey_ptr, n, d, n_ok, d_ok, D, acc_ty)))
            dprobs_p += _mm(dc, tl.trans(_load_rows(pbank_ptr, n, d, n_ok, d_ok, D, acc_ty)))
        probs_p = _softmax_rows(scores, n_ok[None, :])
        ds_p = probs_p * (dprobs_p - tl.sum(probs_p * dprobs_p, axis=1)[:, None])

        # aux row of a patch: [softmax weights (N) | score grads (N) | mean | rstd]
        aux = aux_ptr + patch.to(tl.int64)[:, None] * (2 * N + 2)
        gn_ok = patch_ok[:, None] & n_ok[None, :]
        tl.store(aux + n[None, :], probs_p, mask=gn_ok)
        tl.store(aux + N + n[None, :], ds_p, mask=gn_ok)
        tl.store(aux_ptr + patch.to(tl.int64) * (2 * N + 2) + 2 * N, mean_p, mask=patch_ok)
        tl.store(aux_ptr + patch.to(tl.int64) * (2 * N + 2) + 2 * N + 1, rstd_p, mask=patch_ok)

        # The patch LayerNorm's backward needs two sums over all D values first.
        m1_p = tl.zeros((G,), acc_ty)
        m2_p = tl.zeros((G,), acc_ty)
        for c0 in tl.static_range(0, BC, CC):
            offs, mask, _, _ = _tile(t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G)
            xc = tl.reshape(tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty), (G, CC * PP))
            d = c0 * PP + tl.arange(0, CC * PP)
            d_ok = d < D
            wp = tl.load(qw_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
            dxhat_p = _mm(ds_p, _load_rows(pkey_ptr, n, d, n_ok, d_ok, D, acc_ty)) * wp[None, :]
            m1_p += tl.sum(dxhat_p, axis=1)
            m2_p += tl.sum(dxhat_p * _normalize(xc, mean_p, rstd_p, d_ok[None, :]), axis=1)
        m1_p = m1_p / D
        m2_p = m2_p / D

        # d features chunk by chunk: dO + (pixel LayerNorm grad + patch LayerNorm grad).
        for c0 in tl.static_range(0, BC, CC):
            offs, mask, _, _ = _tile(t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G)
            xc3 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            dc3 = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            cc = c0 + tl.arange(0, CC)
            cc_ok = cc < C
            wc = tl.load(xw_ptr + cc, mask=cc_ok, other=0.0).to(acc_ty)
            xhat_c = _normalize(_pixels(xc3, G, CC, PP), mean_v, rstd_v, cc_ok[None, :])
            dxhat_c = _mm(ds_v, _load_rows(vkey_ptr, n, cc, n_ok, cc_ok, C, acc_ty)) * wc[None, :]
            dx_v = tl.where(cc_ok[None, :], (dxhat_c - m1_v[:, None] - xhat_c * m2_v[:, None]) * rstd_v[:, None], 0.0)

            d = c0 * PP + tl.arange(0, CC * PP)
            d_ok = d < D
            wp = tl.load(qw_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
            xhat_pc = _normalize(tl.reshape(xc3, (G, CC * PP)), mean_p, rstd_p, d_ok[None, :])
            dxhat_pc = _mm(ds_p, _load_rows(pkey_ptr, n, d, n_ok, d_ok, D, acc_ty)) * wp[None, :]
            dx_p = tl.where(d_ok[None, :],
                            (dxhat_pc - m1_p[:, None] - xhat_pc * m2_p[:, None]) * rstd_p[:, None], 0.0)

            dx = dc3 + (_unpixels(dx_v, G, CC, PP) + tl.reshape(dx_p, (G, CC, PP)))
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    # This program's partial-sum row, pixel-branch columns:
    # [bank (N*C) | keys (N*C) | patch bank (N*D) | patch keys (N*D) | pixel w (C) | pixel b (C) | patch w | patch b]
    row = part_ptr + pid.to(tl.int64) * part_cols
    nc = n[:, None] * C + c[None, :]
    nc_mask = n_ok[:, None] & c_ok[None, :]
    tl.store(row + nc, g_bank, mask=nc_mask)
    tl.store(row + N * C + nc, g_keys, mask=nc_mask)
    tl.store(row + 2 * N * C + 2 * N * D + c, g_w, mask=c_ok)
    tl.store(row + 2 * N * C + 2 * N * D + C + c, g_b, mask=c_ok)


@triton.jit
def _query_fusion_bwd_patch_kernel(
    x_ptr, dout_ptr, part_ptr, aux_ptr, pkey_ptr, qw_ptr, qb_ptr,
    H, W, Hp, Wp, total_patches, patches_per_program, part_cols,
    C: tl.constexpr, N: tl.constexpr, P: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr,
):
    """Program (chunk, i): the patch branch's parameter grads restricted to one chunk of CC channels,
    summed over the i-th range of patches (GB at a time, any rows or images), into the patch columns of
    partial row i. Owning a column chunk keeps the (N, chunk) accumulators in registers."""
    acc_ty = pkey_ptr.dtype.element_ty
    PP: tl.constexpr = P * P
    D: tl.constexpr = C * PP
    c0 = tl.program_id(0) * CC
    pid = tl.program_id(1)
    n = tl.arange(0, BN)
    n_ok = n < N
    d = c0 * PP + tl.arange(0, CC * PP)
    d_ok = d < D
    wp = tl.load(qw_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
    bp = tl.load(qb_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
    pkeys = _load_rows(pkey_ptr, n, d, n_ok, d_ok, D, acc_ty)

    c = c0 + tl.arange(0, CC)
    pp = tl.arange(0, PP)
    cp_ok = (c[:, None] < C) & (pp[None, :] < PP)
    cp_offs = c[:, None].to(tl.int64) * H * W + (pp[None, :] // P) * W + pp[None, :] % P

    g_pbank = tl.zeros((BN, CC * PP), acc_ty)
    g_pkeys = tl.zeros((BN, CC * PP), acc_ty)
    g_wp = tl.zeros((CC * PP,), acc_ty)
    g_bp = tl.zeros((CC * PP,), acc_ty)
    first = pid * patches_per_program
    end = tl.minimum(first + patches_per_program, total_patches)
    for q0 in range(first, first + patches_per_program, GB):
        patch = q0 + tl.arange(0, GB)
        patch_ok = patch < end
        pw = patch % Wp
        r = (patch // Wp) % Hp
        b = patch // (Wp * Hp)
        corner = b.to(tl.int64) * C * H * W + (r * P) * W + pw * P
        mask = patch_ok[:, None, None] & cp_ok[None, :, :]
        offs = corner[:, None, None] + cp_offs[None, :, :]
        xc = tl.reshape(tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty), (GB, CC * PP))
        dc = tl.reshape(tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_ty), (GB, CC * PP))
        aux = aux_ptr + patch.to(tl.int64) * (2 * N + 2)
        gn_ok = patch_ok[:, None] & n_ok[None, :]
        probs_p = tl.load(aux[:, None] + n[None, :], mask=gn_ok, other=0.0)
        ds_p = tl.load(aux[:, None] + N + n[None, :], mask=gn_ok, other=0.0)
        mean_p = tl.load(aux + 2 * N, mask=patch_ok, other=0.0)
        rstd_p = tl.load(aux + 2 * N + 1, mask=patch_ok, other=0.0)
        xhat = _normalize(xc, mean_p, rstd_p, d_ok[None, :])
        g_pbank += _mm(tl.trans(probs_p), dc)
        g_pkeys += _mm(tl.trans(ds_p), xhat * wp[None, :] + bp[None, :])
        dq = _mm(ds_p, pkeys)  # rows of missing patches are 0: their ds_p loaded as 0
        g_wp += tl.sum(dq * xhat, axis=0)
        g_bp += tl.sum(dq, axis=0)

    row = part_ptr + pid.to(tl.int64) * part_cols + 2 * N * C
    nd = n[:, None] * D + d[None, :]
    nd_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(row + nd, g_pbank, mask=nd_mask)
    tl.store(row + N * D + nd, g_pkeys, mask=nd_mask)
    tl.store(row + 2 * N * D + 2 * C + d, g_wp, mask=d_ok)
    tl.store(row + 2 * N * D + 2 * C + D + d, g_bp, mask=d_ok)


@triton.jit
def _bank_row_norm(x_ptr, w_ptr, b_ptr, n, L: tl.constexpr, BL: tl.constexpr, eps, acc_ty):
    """Row n of an (N, L) bank: x, its normalised values, rstd and the LayerNorm weight (BL,)."""
    i = tl.arange(0, BL)
    ok = i < L
    x = tl.load(x_ptr + n * L + i, mask=ok, other=0.0).to(acc_ty)
    mean = tl.sum(x, axis=0) / L
    diff = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / L + eps)
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(acc_ty)
    bias = tl.load(b_ptr + i, mask=ok, other=0.0).to(acc_ty)
    return diff * rstd, rstd, w, bias


@triton.jit
def _bank_keys_row(bank_ptr, w_ptr, b_ptr, key_ptr, n, L: tl.constexpr, BL: tl.constexpr, eps, acc_ty):
    xhat, _, w, bias = _bank_row_norm(bank_ptr, w_ptr, b_ptr, n, L, BL, eps, acc_ty)
    i = tl.arange(0, BL)
    tl.store(key_ptr + n * L + i, xhat * w + bias, mask=i < L)


@triton.jit
def _bank_keys_kernel(vbank_ptr, vw_ptr, vb_ptr, vkey_ptr, pbank_ptr, pw_ptr, pb_ptr, pkey_ptr, N,
                      C: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr):
    """Keys = LayerNorm of each bank row, in the accumulator dtype: programs 0..N-1 the vector bank,
    N..2N-1 the patch bank. (The branches share no variables: their shapes differ.)"""
    acc_ty = vkey_ptr.dtype.element_ty
    eps = tl.full([], EPS, acc_ty)
    pid = tl.program_id(0)
    if pid < N:
        _bank_keys_row(vbank_ptr, vw_ptr, vb_ptr, vkey_ptr, pid, C, BC, eps, acc_ty)
    else:
        _bank_keys_row(pbank_ptr, pw_ptr, pb_ptr, pkey_ptr, pid - N, D, BD, eps, acc_ty)


@triton.jit
def _bank_keys_bwd_one(bank_ptr, w_ptr, b_ptr, gval_ptr, gkey_ptr, gbank_ptr, gw_ptr, gb_ptr, N,
                       L: tl.constexpr, BL: tl.constexpr, eps, acc_ty):
    i = tl.arange(0, BL)
    ok = i < L
    g_w = tl.zeros((BL,), acc_ty)
    g_b = tl.zeros((BL,), acc_ty)
    for n in range(N):
        xhat, rstd, w, _ = _bank_row_norm(bank_ptr, w_ptr, b_ptr, n, L, BL, eps, acc_ty)
        gk = tl.load(gkey_ptr + n * L + i, mask=ok, other=0.0)
        dxhat = gk * w
        dx = (dxhat - tl.sum(dxhat, axis=0) / L - xhat * (tl.sum(dxhat * xhat, axis=0) / L)) * rstd
        # The value path's grad plus the key path's, rounded once to the bank's dtype.
        g = tl.load(gval_ptr + n * L + i, mask=ok, other=0.0) + dx
        tl.store(gbank_ptr + n * L + i, g.to(gbank_ptr.dtype.element_ty), mask=ok)
        g_w += gk * xhat
        g_b += gk
    tl.store(gw_ptr + i, g_w.to(gw_ptr.dtype.element_ty), mask=ok)
    tl.store(gb_ptr + i, g_b.to(gb_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bank_keys_bwd_kernel(vbank_ptr, vw_ptr, vb_ptr, gvval_ptr, gvkey_ptr, gvbank_ptr, gvw_ptr, gvb_ptr,
                          pbank_ptr, pw_ptr, pb_ptr, gpval_ptr, gpkey_ptr, gpbank_ptr, gpw_ptr, gpb_ptr, N,
                          C: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                          EPS: tl.constexpr):
    """Program 0: the vector bank, 1: the patch bank. Back through the keys' LayerNorm, summing its
    weight/bias grads over the (few) bank rows in a fixed order."""
    acc_ty = gvkey_ptr.dtype.element_ty
    eps = tl.full([], EPS, acc_ty)
    if tl.program_id(0) == 0:
        _bank_keys_bwd_one(vbank_ptr, vw_ptr, vb_ptr, gvval_ptr, gvkey_ptr, gvbank_ptr, gvw_ptr, gvb_ptr, N,
                           C, BC, eps, acc_ty)
    else:
        _bank_keys_bwd_one(pbank_ptr, pw_ptr, pb_ptr, gpval_ptr, gpkey_ptr, gpbank_ptr, gpw_ptr, gpb_ptr, N,
                           D, BD, eps, acc_ty)


@triton.jit
def _store_segment(out_ptr, values, j, start, size):
    ok = (j >= start) & (j < start + size)
    tl.store(out_ptr + (j - start), values.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_rows_kernel(part_ptr, rows, cols,
                     o0, o1, o2, o3, o4, o5, o6, o7, s0, s1, s2, s3, s4, s5, s6, s7,
                     BLOCK: tl.constexpr):
    """Column sums of part (rows, cols), summed in row order (deterministic), scattered into up to 8
    outputs: columns [s_i, s_{i+1}) go to o_i (each cast to its own dtype)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < cols
    acc = tl.zeros((BLOCK,), part_ptr.dtype.element_ty)
    ptrs = part_ptr + j  # advanced row by row: pointer arithmetic is 64-bit
    for _ in range(rows):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += cols
    _store_segment(o0, acc, j, s0, s1 - s0)
    _store_segment(o1, acc, j, s1, s2 - s1)
    _store_segment(o2, acc, j, s2, s3 - s2)
    _store_segment(o3, acc, j, s3, s4 - s3)
    _store_segment(o4, acc, j, s4, s5 - s4)
    _store_segment(o5, acc, j, s5, s6 - s5)
    _store_segment(o6, acc, j, s6, s7 - s6)
    _store_segment(o7, acc, j, s7, cols - s7)


def sum_rows(partials: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """Write the column sums of `partials` (rows, cols) into `outputs` (1 to 8 contiguous tensors whose
    sizes add up to cols, in column order), with one Triton launch."""
    rows, cols = partials.shape
    if not 1 <= len(outputs) <= 8 or sum(o.numel() for o in outputs) != cols:
        raise ValueError("sum_rows: outputs must be 1 to 8 tensors covering every column")
    starts, start = [], 0
    for o in outputs:
        starts.append(start)
        start += o.numel()
    # Unused slots: an empty segment at the end (never stored to) pointing at the first output.
    outs = list(outputs) + [outputs[0]] * (8 - len(outputs))
    starts += [cols] * (8 - len(starts))
    block = 256
    launch("sum_rows", _sum_rows_kernel, (triton.cdiv(cols, block),),
           partials, rows, cols, *outs, *starts, BLOCK=block)


# ---------------------------------------------------------------------------------------------
# Launch configuration


def _pow2_at_least(value: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(value))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiles_per_program(total_tiles: int, device: torch.device) -> int:
    """Backward tiles per program: enough programs to fill the GPU, few enough partial-sum rows."""
    if device.type != "cuda":
        return 2  # the interpreter: exercise the multi-tile loop (and an out-of-range tail tile)
    return max(1, total_tiles // (4 * _sm_count(device.index or 0)))


def _geometry(features: torch.Tensor, bank_patches: torch.Tensor, tile_elements: int) -> dict:
    b, c, h, w = features.shape
    n, p = bank_patches.shape[0], bank_patches.shape[-1]
    if p & (p - 1):
        raise NotImplementedError(f"query_fusion's Triton kernel needs a power-of-two patch size, got {p}")
    if h % p or w % p:
        raise ValueError(f"query_fusion: feature map {h}x{w} is not a multiple of the patch size {p}")
    hp, wp = h // p, w // p
    bc = _pow2_at_least(c, _MIN_DOT)  # padded channels: the K of the pixel dots
    # Patches per tile: a (G, C, p*p) block of about tile_elements values (tl.dot takes any M >= 1).
    g = max(1, min(triton.next_power_of_2(wp), tile_elements // (bc * p * p)))
    g = max(g, triton.cdiv(_MIN_DOT, p * p))  # G*p*p pixels are the K of the pixel-branch grad dots
    n_groups = triton.cdiv(wp, g)
    return dict(H=h, W=w, Hp=hp, Wp=wp, n_groups=n_groups, total_tiles=b * hp * n_groups,
                C=c, N=n, P=p, BC=bc, CC=min(bc, _CHUNK_CHANNELS), BN=_pow2_at_least(n, _MIN_DOT), G=g)


def _check_inputs(features: torch.Tensor, bank_vectors: torch.Tensor, bank_patches: torch.Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"query_fusion expects (B,C,H,W) features, got {tuple(features.shape)}")
    c = features.shape[1]
    n = bank_vectors.shape[0]
    if bank_vectors.shape != (n, c) or bank_patches.dim() != 4 or bank_patches.shape[:2] != (n, c) \
            or bank_patches.shape[2] != bank_patches.shape[3]:
        raise ValueError(f"query_fusion: banks {tuple(bank_vectors.shape)} and {tuple(bank_patches.shape)} do not "
                         f"match features with C={c}")


# ---------------------------------------------------------------------------------------------
# Custom ops


def _bank_keys(bank_vectors: torch.Tensor, bank_patches: torch.Tensor, vkey_weight: torch.Tensor,
               vkey_bias: torch.Tensor, pkey_weight: torch.Tensor, pkey_bias: torch.Tensor, eps: float,
               acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The LayerNorm'd banks (keys), shared by every program of the main kernels: one small launch."""
    n, c = bank_vectors.shape
    d = bank_patches[0].numel()
    vector_keys = new_output((n, c), acc, bank_vectors.device)
    patch_keys = new_output((n, d), acc, bank_vectors.device)
    launch("query_fusion_keys", _bank_keys_kernel, (2 * n,),
           bank_vectors, vkey_weight, vkey_bias, vector_keys, bank_patches, pkey_weight, pkey_bias, patch_keys, n,
           C=c, D=d, BC=triton.next_power_of_2(c), BD=triton.next_power_of_2(d), EPS=eps)
    return vector_keys, patch_keys


@triton_op("lfpv::query_fusion", mutates_args=())
def _query_fusion_op(
    features: torch.Tensor, bank_vectors: torch.Tensor, bank_patches: torch.Tensor,
    pixel_weight: torch.Tensor, pixel_bias: torch.Tensor, vkey_weight: torch.Tensor, vkey_bias: torch.Tensor,
    patch_weight: torch.Tensor, patch_bias: torch.Tensor, pkey_weight: torch.Tensor, pkey_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    geo = _geometry(features, bank_patches, _TILE_ELEMENTS)
    acc = accumulator_dtype(features.dtype)
    vector_keys, patch_keys = _bank_keys(bank_vectors, bank_patches, vkey_weight, vkey_bias, pkey_weight, pkey_bias,
                                         eps, acc)
    out = new_output(features.shape, features.dtype, features.device)
    launch("query_fusion_fwd", _query_fusion_fwd_kernel, (geo["total_tiles"],),
           features, out, bank_vectors, vector_keys, bank_patches, patch_keys,
           pixel_weight, pixel_bias, patch_weight, patch_bias,
           geo["H"], geo["W"], geo["Hp"], geo["Wp"], geo["n_groups"], geo["total_tiles"],
           C=geo["C"], N=geo["N"], P=geo["P"], BC=geo["BC"], CC=geo["CC"], BN=geo["BN"], G=geo["G"], EPS=eps,
           num_warps=8)
    return out


@triton_op("lfpv::query_fusion_backward", mutates_args=())
def _query_fusion_backward_op(
    grad_out: torch.Tensor, features: torch.Tensor, bank_vectors: torch.Tensor, bank_patches: torch.Tensor,
    pixel_weight: torch.Tensor, pixel_bias: torch.Tensor, vkey_weight: torch.Tensor, vkey_bias: torch.Tensor,
    patch_weight: torch.Tensor, patch_bias: torch.Tensor, pkey_weight: torch.Tensor, pkey_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of every tensor input of lfpv::query_fusion, in its order."""
    geo = _geometry(features, bank_patches, _TILE_ELEMENTS_BWD)
    b, n, c, p = features.shape[0], geo["N"], geo["C"], geo["P"]
    d = c * p * p
    device = features.device
    acc = accumulator_dtype(features.dtype)
    vector_keys, patch_keys = _bank_keys(bank_vectors, bank_patches, vkey_weight, vkey_bias, pkey_weight, pkey_bias,
                                         eps, acc)  # recomputed: cheaper than keeping them
    per_program = _tiles_per_program(geo["total_tiles"], device)
    programs = triton.cdiv(geo["total_tiles"], per_program)
    cols = 2 * n * c + 2 * n * d + 2 * c + 2 * d
    # Row i: the partial sums of backward program i's share (pixel columns from the first kernel,
    # patch columns from the second); every element is written once.
    partials = new_output((programs, cols), acc, device)
    aux = new_output((b * geo["Hp"] * geo["Wp"], 2 * n + 2), acc, device)
    grad_features = new_output(features.shape, features.dtype, device)
    tiling = (geo["H"], geo["W"], geo["Hp"], geo["Wp"], geo["n_groups"], geo["total_tiles"], per_program, cols)
    launch("query_fusion_bwd", _query_fusion_bwd_kernel, (programs,),
           features, grad_out, grad_features, partials, aux, bank_vectors, vector_keys, bank_patches, patch_keys,
           pixel_weight, pixel_bias, patch_weight, patch_bias, *tiling,
           C=c, N=n, P=p, BC=geo["BC"], CC=geo["CC"], BN=geo["BN"], G=geo["G"], EPS=eps, num_warps=4)
    total_patches = aux.shape[0]
    launch("query_fusion_bwd_patch", _query_fusion_bwd_patch_kernel, (geo["BC"] // geo["CC"], programs),
           features, grad_out, partials, aux, patch_keys, patch_weight, patch_bias,
           geo["H"], geo["W"], geo["Hp"], geo["Wp"], total_patches, triton.cdiv(total_patches, programs), cols,
           C=c, N=n, P=p, CC=geo["CC"], BN=geo["BN"], GB=_PATCH_BLOCK, num_warps=8)

    def like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return new_output(t.shape, t.dtype if dtype is None else dtype, device)

    # Value-path bank grads and key grads stay in the accumulator dtype until the keys' backward.
    g_vvalue, g_vkeys, g_pvalue, g_pkeys = like(vector_keys), like(vector_keys), like(patch_keys), like(patch_keys)
    g_pixel_w, g_pixel_b, g_patch_w, g_patch_b = like(pixel_weight), like(pixel_bias), like(patch_weight), \
        like(patch_bias)
    sum_rows(partials, [g_vvalue, g_vkeys, g_pvalue, g_pkeys, g_pixel_w, g_pixel_b, g_patch_w, g_patch_b])

    g_bv, g_bp = like(bank_vectors), like(bank_patches)
    g_vkey_w, g_vkey_b, g_pkey_w, g_pkey_b = like(vkey_weight), like(vkey_bias), like(pkey_weight), like(pkey_bias)
    launch("query_fusion_keys_bwd", _bank_keys_bwd_kernel, (2,),
           bank_vectors, vkey_weight, vkey_bias, g_vvalue, g_vkeys, g_bv, g_vkey_w, g_vkey_b,
           bank_patches, pkey_weight, pkey_bias, g_pvalue, g_pkeys, g_bp, g_pkey_w, g_pkey_b, n,
           C=c, D=d, BC=triton.next_power_of_2(c), BD=triton.next_power_of_2(d), EPS=eps)
    return (grad_features, g_bv, g_bp, g_pixel_w, g_pixel_b, g_vkey_w, g_vkey_b, g_patch_w, g_patch_b,
            g_pkey_w, g_pkey_b)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, eps = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps = eps


def _backward(ctx, grad_out: torch.Tensor):
    grads = _query_fusion_backward_op(grad_out.contiguous(), *ctx.saved_tensors, ctx.eps)
    return (*grads, None)


_query_fusion_op.register_autograd(_backward, setup_context=_setup_context)


def query_fusion(
    features: torch.Tensor,
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    pixel_norm: tuple[torch.Tensor, torch.Tensor],
    vector_bank_norm: tuple[torch.Tensor, torch.Tensor],
    patch_norm: tuple[torch.Tensor, torch.Tensor],
    patch_bank_norm: tuple[torch.Tensor, torch.Tensor],
    eps: float = 1e-5,
) -> torch.Tensor:
    """features + vector-bank attention (per pixel) + patch-bank attention (per p x p patch).

    Same signature and semantics as `lfpv_fast.reference.query_fusion`; the output has the dtype of
    `features`. Differentiable in every tensor argument; the bank LayerNorms (keys) are computed in
    the accumulator dtype, and each gradient is rounded once to its input's dtype.
    """
    _check_inputs(features, bank_vectors, bank_patches)
    norms = [t.contiguous() for pair in (pixel_norm, vector_bank_norm, patch_norm, patch_bank_norm) for t in pair]
    return _query_fusion_op(features.contiguous(), bank_vectors.contiguous(), bank_patches.contiguous(), *norms,
                            float(eps))


__all__ = ["launch", "query_fusion", "sum_rows"]
