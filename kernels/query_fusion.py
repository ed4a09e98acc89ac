"""Query-and-fusion of the LFPV banks: Triton forward and backward, registered as `lfpv::query_fusion`.

The op (see `lfpv_fast.ops.reference.query_fusion`) adds to every feature pixel the softmax-weighted sum of
the raw vector bank (queries: LayerNorm of the pixel's C-vector, keys: LayerNorm of the bank) and to
every p x p patch the same over the patch bank (D = C*p*p values per patch, channel-major).

Design (sizes chosen with the compile gate, `python bench/compile_gate.py`: shared memory
well under both cards; no spills for the published model's fp32, bf16 and mix builds on sm_90 and sm_80
with Triton 3.6 and 3.9; the demo model's forward and some float16/float64 builds do spill, by bytes,
listed per version in bench/results/compile-triton-*.md):
- A tile is G consecutive patches of one patch row of one image. A kernel never holds a whole tile:
  it makes passes over chunks of CC channels, (G, CC, p*p) values re-read from L1/L2 each pass:
  LayerNorm statistics (mean, then mean squared deviation) of every pixel (over C) and every patch
  (over D), then the scores of both branches (`tl.dot`s against the keys' chunks), then the output.
  Only the statistics and the (G*p*p, N) and (G, N) scores stay in registers between passes.
- The two bank LayerNorms (keys) are tiny (N x C and N x D) and shared by every program: a small
  kernel computes them once per call, in the accumulator dtype; backward recomputes them, and a last
  small kernel takes the key grads back through their LayerNorm, adds the value path's bank grads and
  rounds each bank grad once (two separately rounded bf16 paths would cancel badly).
- Backward recomputes LayerNorms and softmaxes from the features (cheaper than storing them), in
  three kernels that each keep little state: the pixel branch over runs of tiles of pixels, in passes
  over chunks of channels like the forward (its part of d features, in the accumulator dtype, and its
  parameter grads summed over the run in the program's own partial-sum row, chunk by chunk: whole
  (pixels, C) and (N, C) blocks in registers spilled kilobytes at C=160); the patch branch per tile
  (d features = dO + pixel part + patch part, rounded once, and per patch its softmax weights, score
  grads and statistics: 2N + 2 values); the patch branch's parameter grads, a program per (channel
  chunk, run of patches). The partial sums of each run are added up by `sum_rows`. Fixed order
  everywhere, no atomics: bitwise reproducible.

- Dot precision: the scores (LayerNorm'd query . key) are exact float32 dots ("ieee", CUDA cores) in
  every dtype. With bf16 features (bf16 training) every other dot (softmax weights x bank, dO x bank,
  the bank and key grads, d queries) takes bf16 operands with float32 accumulation (tensor cores);
  float32 and float16 features keep all dots exact. Why, and the error of each choice:
  bench/dot_precision.py and README "Performance".

- Any channel count C (16 to 160 and beyond; powers of two or not, e.g. 40, 144, 160): the passes take
  CC channels a chunk up to C, the last chunk masked where C is no multiple of CC (or C < CC). Any
  bank size (padded to BN >= 16), power-of-two patch sizes.

Launches: forward 2 (keys, fused op); backward 7 (keys, pixel branch, patch branch, patch parameters,
two row sums, keys' backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lfpv_fast.kernels._common import accumulator_dtype, launch, new_output, target_for

# Bank dimensions (and the pixel-branch backward's channels) are padded (masked) up to this: the K of a
# dot must be >= 16 (Triton 3.6 for every operand type; 3.9 takes 8 for 32-bit operands).
_MIN_DOT = 16
# Sizes of a (patches, C, p, p) tile, forward and backward (which keeps more per value): G patches
# where G * C * p * p is about this many values. Chosen by register spills in offline sm_90 and sm_80
# builds (the compile gate), not yet by timings.
_TILE_ELEMENTS = 8192
_TILE_ELEMENTS_BWD = 4096
# The forward also holds the (G*p*p, N) pixel scores of a tile in registers: at most this many (the
# published model's 8 patches x 16 pixels x 16 entries). Without it the demo model (C=16) takes tiles of
# 32 patches (8192 scores); with it its bf16-autocast forward spills less on Triton 3.6 (sm_90 100 -> 32 B,
# sm_80 16 -> 0 B). Its fp32 forward still spills ~140 B on both versions at any G tried (8: 148 B,
# 4: 116 B on 3.9; 4 warps: worse): see bench/results/compile-triton-*.md.
_SCORE_ELEMENTS = 2048
# Channels per chunk of every pass over a tile (a chunk of a tile is G x CC x p x p values). The
# forward's chunk is the K of its pixel-score dot, which Triton 3.6 requires to be >= 16 (3.9 takes 8);
# the backward kernels' dots have K = CC * p * p, or no CC at all, so they keep the smaller chunk (the
# patch-parameter kernel's (N, CC * p * p) accumulators must stay in registers).
_CHUNK_CHANNELS_FWD = 16
_CHUNK_CHANNELS_BWD = 8
# Patches per step of the patch-parameter gradient kernel: the K of its dots (>= 16).
_PATCH_BLOCK = 16
# Pixels per tile of the pixel-branch backward and channels per chunk of its passes (a (pixels, CC)
# block; CC is the K of its score dots, >= 16), and its programs per SM: enough to fill the GPU, few
# enough partial-sum rows to add up afterwards. 32 x 16 (4 warps): of 16/32/64 pixels x 16/32 channels x
# 4/8 warps tried (compile gate: Retinexformer's sites and the published model in fp32, mix and fp64,
# sm_90 and sm_80, Triton 3.6 and 3.9) the one that spills nowhere, as the whole gate confirms for every
# build; 64 pixels spill 100-900 B, 32 channels up to 68 B.
_PIXEL_BLOCK = 32
_PIXEL_CHUNK_CHANNELS = 16
_PROGRAMS_PER_SM = 4


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
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32: what `.to(tl.bfloat16)`
    gives on a GPU. (The CPU interpreter's own float32 -> bfloat16 conversion truncates.)"""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mm_values(a, b, BF16_DOTS: tl.constexpr, EMULATE: tl.constexpr):
    """The dots that may run on bf16 tensor cores: everything but the scores. With bf16 features
    (BF16_DOTS) their float32 operands are rounded to bf16 and multiplied with float32 accumulation;
    otherwise as _mm. Under the CPU interpreter (EMULATE), whose bf16 dots multiply the raw bits, the
    rounded operands are multiplied as float32: the same products. Error model and choice per dot:
    bench/dot_precision.py and README "Performance": bf16 here adds under 1 bf16 unit of each result's
    largest value (0.8 worst); bf16 scores would add up to 5 (near one-hot softmaxes), so they stay "ieee"."""
    if BF16_DOTS:
        if EMULATE:
            r = tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
        else:
            r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        r = _mm(a, b)
    return r


@triton.jit
def _load_rows(ptr, n, cols, n_ok, col_ok, row_len, acc_ty):
    """ptr[n, cols] of a row-major (N, row_len) matrix, zero outside, as acc_ty."""
    return tl.load(ptr + n[:, None] * row_len + cols[None, :], mask=n_ok[:, None] & col_ok[None, :],
                   other=0.0).to(acc_ty)


@triton.jit
def _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles,
           C: tl.constexpr, P: tl.constexpr, CC: tl.constexpr, G: tl.constexpr, acc_ty):
    """Channels c0 .. c0+CC-1 of tile t as a (G, CC, P*P) block in acc_ty (zeros outside), its offsets and mask."""
    offs, mask, _, _ = _tile(t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G)
    return tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty), offs, mask


@triton.jit
def _tile_stats(x_ptr, t, H, W, Hp, Wp, n_groups, total_tiles, eps,
                C: tl.constexpr, P: tl.constexpr, CC: tl.constexpr, G: tl.constexpr, acc_ty):
    """LayerNorm statistics of tile t: per pixel over its C channels (G, P*P) and per patch over its
    D = C*P*P values (G,). Two passes over chunks of CC channels, mean then mean squared deviation, so
    that no more than a chunk is held at once."""
    PP: tl.constexpr = P * P
    sum_v = tl.zeros((G, PP), acc_ty)
    for c0 in tl.range(0, C, CC):
        x, _, _ = _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        sum_v += tl.sum(x, axis=1)
    mean_v = sum_v / C
    mean_p = tl.sum(sum_v, axis=1) / (C * PP)
    sq_v = tl.zeros((G, PP), acc_ty)
    sq_p = tl.zeros((G, PP), acc_ty)
    for c0 in tl.range(0, C, CC):
        x, _, mask = _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        dv = tl.where(mask, x - mean_v[:, None, :], 0.0)
        dp = tl.where(mask, x - mean_p[:, None, None], 0.0)
        sq_v += tl.sum(dv * dv, axis=1)
        sq_p += tl.sum(dp * dp, axis=1)
    rstd_v = 1.0 / tl.sqrt(sq_v / C + eps)
    rstd_p = 1.0 / tl.sqrt(tl.sum(sq_p, axis=1) / (C * PP) + eps)
    return mean_v, rstd_v, mean_p, rstd_p


@triton.jit
def _pixel_queries(x, c0, mean_v, rstd_v, xw_ptr, xb_ptr, C: tl.constexpr, CC: tl.constexpr, acc_ty):
    """Chunk (G, CC, PP) -> the pixels' LayerNorm'd queries on these channels (G, CC, PP), and xhat."""
    cc = c0 + tl.arange(0, CC)
    cc_ok = cc < C
    w = tl.load(xw_ptr + cc, mask=cc_ok, other=0.0).to(acc_ty)
    bias = tl.load(xb_ptr + cc, mask=cc_ok, other=0.0).to(acc_ty)
    xhat = tl.where(cc_ok[None, :, None], (x - mean_v[:, None, :]) * rstd_v[:, None, :], 0.0)
    return xhat * w[None, :, None] + bias[None, :, None], xhat


@triton.jit
def _patch_queries(x, c0, mean_p, rstd_p, qw_ptr, qb_ptr, C: tl.constexpr, CC: tl.constexpr, PP: tl.constexpr,
                   G: tl.constexpr, acc_ty):
    """Chunk (G, CC, PP) -> the patches' LayerNorm'd queries on its CC*PP values (G, CC*PP), and xhat."""
    d = c0 * PP + tl.arange(0, CC * PP)
    d_ok = d < C * PP
    wp = tl.load(qw_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
    bp = tl.load(qb_ptr + d, mask=d_ok, other=0.0).to(acc_ty)
    xhat = _normalize(tl.reshape(x, (G, CC * PP)), mean_p, rstd_p, d_ok[None, :])
    return xhat * wp[None, :] + bp[None, :], xhat


@triton.jit(do_not_specialize=["Hp", "Wp", "n_groups", "total_tiles"])
def _query_fusion_fwd_kernel(
    x_ptr, out_ptr, vbank_ptr, vkey_ptr, pbank_ptr, pkey_ptr, xw_ptr, xb_ptr, qw_ptr, qb_ptr,
    H, W, Hp, Wp, n_groups, total_tiles,
    C: tl.constexpr, N: tl.constexpr, P: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr,
    G: tl.constexpr, EPS: tl.constexpr, BF16_DOTS: tl.constexpr, EMULATE: tl.constexpr,
):
    """One tile of G patches, in passes over chunks of CC channels (re-read from L1/L2), so that only a
    chunk, the statistics and the (pixels, N) and (G, N) scores are held: statistics, scores of both
    branches, then the output chunk by chunk, written once."""
    acc_ty = vkey_ptr.dtype.element_ty  # keys are stored in the accumulator dtype
    eps = tl.full([], EPS, acc_ty)
    PP: tl.constexpr = P * P
    D: tl.constexpr = C * PP
    t = tl.program_id(0)
    n = tl.arange(0, BN)
    n_ok = n < N
    mean_v, rstd_v, mean_p, rstd_p = _tile_stats(x_ptr, t, H, W, Hp, Wp, n_groups, total_tiles, eps,
                                                 C, P, CC, G, acc_ty)
    scores_v = tl.zeros((G * PP, BN), acc_ty)
    scores_p = tl.zeros((G, BN), acc_ty)
    for c0 in tl.range(0, C, CC):
        x, offs, mask = _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        cc = c0 + tl.arange(0, CC)
        q, xhat = _pixel_queries(x, c0, mean_v, rstd_v, xw_ptr, xb_ptr, C, CC, acc_ty)
        scores_v += _mm(_pixels(q, G, CC, PP), tl.trans(_load_rows(vkey_ptr, n, cc, n_ok, cc < C, C, acc_ty)))
        d = c0 * PP + tl.arange(0, CC * PP)
        qp, xhat_p = _patch_queries(x, c0, mean_p, rstd_p, qw_ptr, qb_ptr, C, CC, PP, G, acc_ty)
        scores_p += _mm(qp, tl.trans(_load_rows(pkey_ptr, n, d, n_ok, d < D, D, acc_ty)))
    probs_v = _softmax_rows(scores_v, n_ok[None, :])
    probs_p = _softmax_rows(scores_p, n_ok[None, :])

    # Output chunk by chunk: features + (vector update + patch update), the reference's order.
    for c0 in tl.range(0, C, CC):
        x, offs, mask = _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        cc = c0 + tl.arange(0, CC)
        d = c0 * PP + tl.arange(0, CC * PP)
        vector_update = _unpixels(_mm_values(probs_v, _load_rows(vbank_ptr, n, cc, n_ok, cc < C, C, acc_ty),
                                               BF16_DOTS, EMULATE), G, CC, PP)
        patch_update = tl.reshape(_mm_values(probs_p, _load_rows(pbank_ptr, n, d, n_ok, d < D, D, acc_ty),
                                             BF16_DOTS, EMULATE), (G, CC, PP))
        out = x + (vector_update + patch_update)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_chunk(ptr, image, hw, px_ok, c0, HW, C: tl.constexpr, CC: tl.constexpr, acc_ty):
    """Channels c0 .. c0+CC-1 of BM pixels of one image as a (BM, CC) block in acc_ty (zeros outside), its
    offsets and mask."""
    c = c0 + tl.arange(0, CC)
    offs = image.to(tl.int64) * C * HW + c[None, :].to(tl.int64) * HW + hw[:, None]
    mask = px_ok[:, None] & (c[None, :] < C)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(acc_ty), offs, mask


@triton.jit
def _pixel_queries_rows(x, c, c_ok, mean, rstd, xw_ptr, xb_ptr, acc_ty):
    """(BM, CC) chunk of pixels on channels c -> their LayerNorm'd queries on these channels, xhat, and the
    LayerNorm weight w (zeros on masked channels)."""
    w = tl.load(xw_ptr + c, mask=c_ok, other=0.0).to(acc_ty)
    bias = tl.load(xb_ptr + c, mask=c_ok, other=0.0).to(acc_ty)
    xhat = _normalize(x, mean, rstd, c_ok[None, :])
    return xhat * w[None, :] + bias[None, :], xhat, w


@triton.jit(do_not_specialize=["tiles_per_image", "total_tiles", "tiles_per_program"])
def _query_fusion_bwd_pixel_kernel(
    x_ptr, dout_ptr, dxv_ptr, part_ptr, vbank_ptr, vkey_ptr, xw_ptr, xb_ptr,
    HW, tiles_per_image, total_tiles, tiles_per_program,
    C: tl.constexpr, N: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, EPS: tl.constexpr,
    BF16_DOTS: tl.constexpr, EMULATE: tl.constexpr,
):
    """The pixel branch's backward over this program's run of pixel tiles (BM consecutive pixels of one
    image): its part of d features (dxv, accumulator dtype; the patch-branch kernel adds the rest) and
    this program's partial sums of the vector bank, vector key and pixel LayerNorm grads.

    Like the forward it never holds a tile's C channels: passes over chunks of CC channels (re-read from
    L1/L2) take the pixels' LayerNorm statistics (mean, then mean squared deviation), then the (BM, N)
    scores and d softmax weights (whole-channel dots, summed chunk by chunk), then, per chunk, the
    parameter grads and the LayerNorm-backward sums, then d features. Only (BM,) statistics and (BM, N)
    blocks stay in registers. The partial sums (N*C values each) live in this program's own row of
    part, added to chunk by chunk, tile by tile, in a fixed order: no atomics."""
    acc_ty = vkey_ptr.dtype.element_ty
    eps = tl.full([], EPS, acc_ty)
    pid = tl.program_id(0)
    n = tl.arange(0, BN)
    n_ok = n < N
    m = tl.arange(0, BM)
    # This program's partial-sum row: [bank (N*C) | keys (N*C) | pixel w (C) | pixel b (C)]
    row = part_ptr + pid.to(tl.int64) * (2 * N * C + 2 * C)

    # Masked (padded or out-of-range) pixels have dO = 0 and so add nothing to the sums.
    for k in range(tiles_per_program):
        t = pid * tiles_per_program + k
        image = t // tiles_per_image
        hw = (t % tiles_per_image) * BM + m
        # A program's tail tiles beyond the last get no pixel. (A scalar bool `&` a tensor mask comes out
        # int32 under the interpreter, hence the where on the bound.)
        px_ok = hw < tl.where(t < total_tiles, HW, 0)
        # The first tile starts the partial sums (the row is uninitialised), later ones add to them.
        n_prev = n < tl.where(k > 0, N, 0)
        c_prev = tl.where(k > 0, C, 0)

        # Pass 1 and 2: LayerNorm statistics of each pixel over its C channels.
        sum_x = tl.zeros((BM,), acc_ty)
        for c0 in tl.range(0, C, CC):
            x, offs, mask = _pixel_chunk(x_ptr, image, hw, px_ok, c0, HW, C, CC, acc_ty)
            sum_x += tl.sum(x, axis=1)
        mean = sum_x / C
        sq = tl.zeros((BM,), acc_ty)
        for c0 in tl.range(0, C, CC):
            x, offs, mask = _pixel_chunk(x_ptr, image, hw, px_ok, c0, HW, C, CC, acc_ty)
            diff = tl.where(mask, x - mean[:, None], 0.0)
            sq += tl.sum(diff * diff, axis=1)
        rstd = 1.0 / tl.sqrt(sq / C + eps)

        # Pass 3: scores and d softmax weights, whole-channel dots summed over the chunks.
        scores = tl.zeros((BM, BN), acc_ty)
        dprobs = tl.zeros((BM, BN), acc_ty)
        for c0 in tl.range(0, C, CC):
            x, offs, mask = _pixel_chunk(x_ptr, image, hw, px_ok, c0, HW, C, CC, acc_ty)
            dout, offs, mask = _pixel_chunk(dout_ptr, image, hw, px_ok, c0, HW, C, CC, acc_ty)
            c = c0 + tl.arange(0, CC)
            c_ok = c < C
            q, xhat, w = _pixel_queries_rows(x, c, c_ok, mean, rstd, xw_ptr, xb_ptr, acc_ty)
            scores += _mm(q, tl.trans(_load_rows(vkey_ptr, n, c, n_ok, c_ok, C, acc_ty)))
            dprobs += _mm_values(dout, tl.trans(_load_rows(vbank_ptr, n, c, n_ok, c_ok, C, acc_ty)),
                                 BF16_DOTS, EMULATE)
        probs = _softmax_rows(scores, n_ok[None, :])
        ds = probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])

        # Pass 4: per chunk, the bank, key and pixel LayerNorm grads (added to the row) and the sums of
        # the LayerNorm backward: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
        m1 = tl.zeros((BM,), acc_ty)
        m2 = tl.zeros((BM,), acc_ty)
        for c0 in tl.range(0, C, CC):
            x, offs, mask = _pixel_chunk(x_ptr, image, hw, px_ok, c0, HW, C, CC, acc_ty)
            dout, offs, mask = _pixel_chunk(dout_ptr, image, hw, px_ok, c0, HW, C, CC, acc_ty)
            c = c0 + tl.arange(0, CC)
            c_ok = c < C
            q, xhat, w = _pixel_queries_rows(x, c, c_ok, mean, rstd, xw_ptr, xb_ptr, acc_ty)
            nc = n[:, None] * C + c[None, :]
            nc_ok = n_ok[:, None] & c_ok[None, :]
            prev_ok = n_prev[:, None] & c_ok[None, :]
            g_bank = tl.load(row + nc, mask=prev_ok, other=0.0) + _mm_values(tl.trans(probs), dout, BF16_DOTS,
                                                                             EMULATE)
            g_keys = tl.load(row + N * C + nc, mask=prev_ok, other=0.0) + _mm_values(tl.trans(ds), q, BF16_DOTS,
                                                                                     EMULATE)
            tl.store(row + nc, g_bank, mask=nc_ok)
            tl.store(row + N * C + nc, g_keys, mask=nc_ok)
            dq = _mm_values(ds, _load_rows(vkey_ptr, n, c, n_ok, c_ok, C, acc_ty), BF16_DOTS, EMULATE)
            g_w = tl.load(row + 2 * N * C + c, mask=c < c_prev, other=0.0) + tl.sum(dq * xhat, axis=0)
            g_b = tl.load(row + 2 * N * C + C + c, mask=c < c_prev, other=0.0) + tl.sum(dq, axis=0)
            tl.store(row + 2 * N * C + c, g_w, mask=c_ok)
            tl.store(row + 2 * N * C + C + c, g_b, mask=c_ok)
            dxhat = dq * w[None, :]
            m1 += tl.sum(dxhat, axis=1)
            m2 += tl.sum(dxhat * xhat, axis=1)
        m1 = m1 / C
        m2 = m2 / C

        # Pass 5: d features, chunk by chunk (d queries recomputed: a small dot, cheaper than storing them).
        for c0 in tl.range(0, C, CC):
            x, offs, mask = _pixel_chunk(x_ptr, image, hw, px_ok, c0, HW, C, CC, acc_ty)
            c = c0 + tl.arange(0, CC)
            c_ok = c < C
            q, xhat, w = _pixel_queries_rows(x, c, c_ok, mean, rstd, xw_ptr, xb_ptr, acc_ty)
            dxhat = _mm_values(ds, _load_rows(vkey_ptr, n, c, n_ok, c_ok, C, acc_ty), BF16_DOTS, EMULATE) * w[None, :]
            dxv = (dxhat - m1[:, None] - xhat * m2[:, None]) * rstd[:, None]
            tl.store(dxv_ptr + offs, dxv, mask=mask)
        # The next tile reads back this tile's partial sums: make every thread's stores visible first.
        tl.debug_barrier()


@triton.jit(do_not_specialize=["Hp", "Wp", "n_groups", "total_tiles"])
def _query_fusion_bwd_patch_kernel(
    x_ptr, dout_ptr, dxv_ptr, dx_ptr, aux_ptr, pbank_ptr, pkey_ptr, qw_ptr, qb_ptr,
    H, W, Hp, Wp, n_groups, total_tiles,
    C: tl.constexpr, N: tl.constexpr, P: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr,
    G: tl.constexpr, EPS: tl.constexpr, BF16_DOTS: tl.constexpr, EMULATE: tl.constexpr,
):
    """The patch branch's backward for one tile of G patches, and d features: dO + (pixel part + patch
    part), rounded once. Per patch it also stores the softmax weights, their score grads and the
    LayerNorm statistics (aux) for _query_fusion_bwd_patch_params_kernel. Passes over chunks of CC
    channels as in the forward."""
    acc_ty = pkey_ptr.dtype.element_ty
    eps = tl.full([], EPS, acc_ty)
    PP: tl.constexpr = P * P
    D: tl.constexpr = C * PP
    t = tl.program_id(0)
    n = tl.arange(0, BN)
    n_ok = n < N
    # (The pixel statistics are unused here; the compiler drops them. Names bound in these loops keep
    # one type from loop to loop, as Triton requires: hence no `_` for unused results.)
    mean_v, rstd_v, mean_p, rstd_p = _tile_stats(x_ptr, t, H, W, Hp, Wp, n_groups, total_tiles, eps,
                                                 C, P, CC, G, acc_ty)
    scores = tl.zeros((G, BN), acc_ty)
    dprobs = tl.zeros((G, BN), acc_ty)
    for c0 in tl.range(0, C, CC):
        x, offs, mask = _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        dout, offs, mask = _chunk(dout_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        d = c0 * PP + tl.arange(0, CC * PP)
        qp, xhat = _patch_queries(x, c0, mean_p, rstd_p, qw_ptr, qb_ptr, C, CC, PP, G, acc_ty)
        scores += _mm(qp, tl.trans(_load_rows(pkey_ptr, n, d, n_ok, d < D, D, acc_ty)))
        dprobs += _mm_values(tl.reshape(dout, (G, CC * PP)),
                             tl.trans(_load_rows(pbank_ptr, n, d, n_ok, d < D, D, acc_ty)), BF16_DOTS, EMULATE)
    probs = _softmax_rows(scores, n_ok[None, :])
    ds = probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])

    # aux row of a patch: [softmax weights (N) | score grads (N) | mean | rstd]
    offs, mask, patch, patch_ok = _tile(t, 0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G)
    aux = aux_ptr + patch.to(tl.int64) * (2 * N + 2)
    gn_ok = patch_ok[:, None] & n_ok[None, :]
    tl.store(aux[:, None] + n[None, :], probs, mask=gn_ok)
    tl.store(aux[:, None] + N + n[None, :], ds, mask=gn_ok)
    tl.store(aux + 2 * N, mean_p, mask=patch_ok)
    tl.store(aux + 2 * N + 1, rstd_p, mask=patch_ok)

    # The patch LayerNorm's backward needs two sums over all D values first.
    m1 = tl.zeros((G,), acc_ty)
    m2 = tl.zeros((G,), acc_ty)
    for c0 in tl.range(0, C, CC):
        x, offs, mask = _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        d = c0 * PP + tl.arange(0, CC * PP)
        wp = tl.load(qw_ptr + d, mask=d < D, other=0.0).to(acc_ty)
        qp, xhat = _patch_queries(x, c0, mean_p, rstd_p, qw_ptr, qb_ptr, C, CC, PP, G, acc_ty)
        dxhat = _mm_values(ds, _load_rows(pkey_ptr, n, d, n_ok, d < D, D, acc_ty), BF16_DOTS, EMULATE) * wp[None, :]
        m1 += tl.sum(dxhat, axis=1)
        m2 += tl.sum(dxhat * xhat, axis=1)
    m1 = m1 / D
    m2 = m2 / D

    # d features chunk by chunk: dO + (pixel LayerNorm grad + patch LayerNorm grad).
    for c0 in tl.range(0, C, CC):
        x, offs, mask = _chunk(x_ptr, t, c0, H, W, Hp, Wp, n_groups, total_tiles, C, P, CC, G, acc_ty)
        d = c0 * PP + tl.arange(0, CC * PP)
        wp = tl.load(qw_ptr + d, mask=d < D, other=0.0).to(acc_ty)
        qp, xhat = _patch_queries(x, c0, mean_p, rstd_p, qw_ptr, qb_ptr, C, CC, PP, G, acc_ty)
        dxhat = _mm_values(ds, _load_rows(pkey_ptr, n, d, n_ok, d < D, D, acc_ty), BF16_DOTS, EMULATE) * wp[None, :]
        dx_p = tl.where((d < D)[None, :], (dxhat - m1[:, None] - xhat * m2[:, None]) * rstd_p[:, None], 0.0)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        dx_v = tl.load(dxv_ptr + offs, mask=mask, other=0.0)
        dx = dout + (dx_v + tl.reshape(dx_p, (G, CC, PP)))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["Hp", "Wp", "total_patches", "patches_per_program"])
def _query_fusion_bwd_patch_params_kernel(
    x_ptr, dout_ptr, part_ptr, aux_ptr, pkey_ptr, qw_ptr, qb_ptr,
    H, W, Hp, Wp, total_patches, patches_per_program,
    C: tl.constexpr, N: tl.constexpr, P: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr,
    BF16_DOTS: tl.constexpr, EMULATE: tl.constexpr,
):
    """Program (chunk, i): the patch branch's parameter grads restricted to one chunk of CC channels,
    summed over the i-th range of patches (GB at a time, any rows or images), into partial row i.
    Owning a column chunk keeps the (N, chunk) accumulators in registers."""
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
        g_pbank += _mm_values(tl.trans(probs_p), dc, BF16_DOTS, EMULATE)
        g_pkeys += _mm_values(tl.trans(ds_p), xhat * wp[None, :] + bp[None, :], BF16_DOTS, EMULATE)
        dq = _mm_values(ds_p, pkeys, BF16_DOTS, EMULATE)  # rows of missing patches are 0: their ds_p loaded as 0
        g_wp += tl.sum(dq * xhat, axis=0)
        g_bp += tl.sum(dq, axis=0)

    # Partial row i: [patch bank (N*D) | patch keys (N*D) | patch w (D) | patch b (D)]
    row = part_ptr + pid.to(tl.int64) * (2 * N * D + 2 * D)
    nd = n[:, None] * D + d[None, :]
    nd_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(row + nd, g_pbank, mask=nd_mask)
    tl.store(row + N * D + nd, g_pkeys, mask=nd_mask)
    tl.store(row + 2 * N * D + d, g_wp, mask=d_ok)
    tl.store(row + 2 * N * D + D + d, g_bp, mask=d_ok)


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


@triton.jit(do_not_specialize=["rows"])
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


def _geometry(features: torch.Tensor, bank_patches: torch.Tensor, tile_elements: int, chunk_channels: int,
              score_elements: int | None = None) -> dict:
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
    bn = _pow2_at_least(n, _MIN_DOT)
    if score_elements is not None:
        g = max(1, min(g, score_elements // (p * p * bn)))
    g = max(g, triton.cdiv(_MIN_DOT, p * p))  # G*p*p pixels are the K of the pixel-branch grad dots
    n_groups = triton.cdiv(wp, g)
    # Chunk channels: the backward's patch dots have K = CC * p * p, which must be >= 16 too (p = 1, 2).
    cc = min(bc, max(chunk_channels, triton.cdiv(_MIN_DOT, p * p)))
    return dict(H=h, W=w, Hp=hp, Wp=wp, n_groups=n_groups, total_tiles=b * hp * n_groups,
                C=c, N=n, P=p, BC=bc, CC=cc, BN=bn, G=g)


def _dot_precision(dtype: torch.dtype, device: torch.device) -> dict[str, bool]:
    """The kernels' BF16_DOTS and EMULATE: bf16 features (bf16 training) run the dots other than the
    scores on bf16 tensor cores; float32, float16 and float64 keep exact float32/float64 dots ("ieee").
    Under the CPU interpreter the bf16 dots are emulated (see _mm_values)."""
    return dict(BF16_DOTS=dtype == torch.bfloat16, EMULATE=target_for(device).interpreter)


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
    geo = _geometry(features, bank_patches, _TILE_ELEMENTS, _CHUNK_CHANNELS_FWD, _SCORE_ELEMENTS)
    acc = accumulator_dtype(features.dtype)
    vector_keys, patch_keys = _bank_keys(bank_vectors, bank_patches, vkey_weight, vkey_bias, pkey_weight, pkey_bias,
                                         eps, acc)
    out = new_output(features.shape, features.dtype, features.device)
    launch("query_fusion_fwd", _query_fusion_fwd_kernel, (geo["total_tiles"],),
           features, out, bank_vectors, vector_keys, bank_patches, patch_keys,
           pixel_weight, pixel_bias, patch_weight, patch_bias,
           geo["H"], geo["W"], geo["Hp"], geo["Wp"], geo["n_groups"], geo["total_tiles"],
           C=geo["C"], N=geo["N"], P=geo["P"], CC=geo["CC"], BN=geo["BN"], G=geo["G"], EPS=eps,
           **_dot_precision(features.dtype, features.device), num_warps=8)
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
    geo = _geometry(features, bank_patches, _TILE_ELEMENTS_BWD, _CHUNK_CHANNELS_BWD)
    b, n, c, p = features.shape[0], geo["N"], geo["C"], geo["P"]
    d = c * p * p
    device = features.device
    acc = accumulator_dtype(features.dtype)
    target = target_for(device)
    dots = _dot_precision(features.dtype, device)
    vector_keys, patch_keys = _bank_keys(bank_vectors, bank_patches, vkey_weight, vkey_bias, pkey_weight, pkey_bias,
                                         eps, acc)  # recomputed: cheaper than keeping them

    # 1. The pixel branch over runs of pixel tiles: its part of d features and its partial sums.
    hw = geo["H"] * geo["W"]
    tiles_per_image = triton.cdiv(hw, _PIXEL_BLOCK)
    pixel_tiles = b * tiles_per_image
    per_program = triton.cdiv(pixel_tiles, min(pixel_tiles, _PROGRAMS_PER_SM * target.sm_count))
    pixel_programs = triton.cdiv(pixel_tiles, per_program)
    pixel_partials = new_output((pixel_programs, 2 * n * c + 2 * c), acc, device)
    grad_pixels = new_output(features.shape, acc, device)
    launch("query_fusion_bwd_pixel", _query_fusion_bwd_pixel_kernel, (pixel_programs,),
           features, grad_out, grad_pixels, pixel_partials, bank_vectors, vector_keys, pixel_weight, pixel_bias,
           hw, tiles_per_image, pixel_tiles, per_program,
           C=c, N=n, CC=min(geo["BC"], _PIXEL_CHUNK_CHANNELS), BN=geo["BN"], BM=_PIXEL_BLOCK, EPS=eps, **dots,
           num_warps=4)

    # 2. The patch branch per tile of patches, and d features (pixel part + patch part + dO).
    total_patches = b * geo["Hp"] * geo["Wp"]
    aux = new_output((total_patches, 2 * n + 2), acc, device)
    grad_features = new_output(features.shape, features.dtype, device)
    launch("query_fusion_bwd_patch", _query_fusion_bwd_patch_kernel, (geo["total_tiles"],),
           features, grad_out, grad_pixels, grad_features, aux, bank_patches, patch_keys, patch_weight, patch_bias,
           geo["H"], geo["W"], geo["Hp"], geo["Wp"], geo["n_groups"], geo["total_tiles"],
           C=c, N=n, P=p, CC=geo["CC"], BN=geo["BN"], G=geo["G"], EPS=eps, **dots, num_warps=4)

    # 3. The patch branch's parameter grads: a program per (channel chunk, run of patches).
    chunks = triton.cdiv(c, geo["CC"])
    patch_programs = min(total_patches, target.sm_count)
    patch_partials = new_output((patch_programs, 2 * n * d + 2 * d), acc, device)
    launch("query_fusion_bwd_patch_params", _query_fusion_bwd_patch_params_kernel, (chunks, patch_programs),
           features, grad_out, patch_partials, aux, patch_keys, patch_weight, patch_bias,
           geo["H"], geo["W"], geo["Hp"], geo["Wp"], total_patches, triton.cdiv(total_patches, patch_programs),
           C=c, N=n, P=p, CC=geo["CC"], BN=geo["BN"], GB=_PATCH_BLOCK, **dots, num_warps=8)

    def like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return new_output(t.shape, t.dtype if dtype is None else dtype, device)

    # 4. Sums of the partial rows. Value-path bank grads and key grads stay in the accumulator dtype
    # until the keys' backward.
    g_vvalue, g_vkeys, g_pvalue, g_pkeys = like(vector_keys), like(vector_keys), like(patch_keys), like(patch_keys)
    g_pixel_w, g_pixel_b, g_patch_w, g_patch_b = like(pixel_weight), like(pixel_bias), like(patch_weight), \
        like(patch_bias)
    sum_rows(pixel_partials, [g_vvalue, g_vkeys, g_pixel_w, g_pixel_b])
    sum_rows(patch_partials, [g_pvalue, g_pkeys, g_patch_w, g_patch_b])

    # 5. Back through the keys' LayerNorm.
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

    Same signature and semantics as `lfpv_fast.ops.reference.query_fusion`; the output has the dtype of
    `features`. Differentiable in every tensor argument; the bank LayerNorms (keys) are computed in
    the accumulator dtype, and each gradient is rounded once to its input's dtype.
    """
    _check_inputs(features, bank_vectors, bank_patches)
    norms = [t.contiguous() for pair in (pixel_norm, vector_bank_norm, patch_norm, patch_bank_norm) for t in pair]
    return _query_fusion_op(features.contiguous(), bank_vectors.contiguous(), bank_patches.contiguous(), *norms,
                            float(eps))


__all__ = ["launch", "query_fusion", "sum_rows"]
