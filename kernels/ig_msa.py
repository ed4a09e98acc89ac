"""Retinexformer's illumination-guided channel attention (IG-MSA core): Triton forward and backward,
registered as `lfpv::ig_msa_fwd` / `lfpv::ig_msa_bwd`.

Same semantics as `lfpv_fast.ops.reference.ig_msa`. Per batch row b and head h, with the head's d channels
as rows of (d, N) matrices Q, K and V' = V * I (N pixels):

    nq_j = max(|Q_j|, eps), nk_i = max(|K_i|, eps)        row norms over all N pixels (eps = 1e-12)
    M = diag(1/nk) G diag(1/nq),  G = K Q^T              = Kn Qn^T, the normalised rows' Gram (d x d)
    A = softmax(r_h M) over the last axis                 (d x d)
    out = A V'                                            (d, N)

Forward: the normalisation is applied to the d x d Gram after the reduction, so the pixels are read
twice, the least the maths allows (A needs every pixel before any output):
  1. `_gram_kernel`: per (b, h), programs split the pixel blocks; each sums its blocks' K Q^T and the
     squared row norms of Q and K into its own partial row (no atomics).
  2. `_attention_kernel`: a program per (b, h) adds the partial rows in a fixed order (bitwise
     reproducible), normalises, scales and takes the softmax: A, and M and the norms for the backward.
  3. `_apply_kernel`: out = A V' per pixel block.

Backward, derived by hand (dO the output grad as (d, N); "." the elementwise product):
    dV' = A^T dO,  dV = dV' . I,  dI = dV' . V
    dA = dO V'^T                                                          (a reduction over N)
    dS = A . (dA - rowsum(dA . A))                                        (softmax backward)
    dr_h = sum_b sum_ij dS_ij M_ij,   dM = r_h dS
    Kn = K / nk and Qn = Q / nq: dKn = dM Qn, dQn = dM^T Kn, and through the normalisation
        dK_i = (dKn_i - Kn_i <dKn_i, Kn_i>) / nk_i     (where |K_i| > eps; else nk_i = eps is a constant:
                                                         dK_i = dKn_i / eps)
    The row products need no pass over the pixels: <dKn_i, Kn_i> = sum_j dM_ij M_ij (a row sum of
    dM . M), <dQn_j, Qn_j> = sum_i dM_ij M_ij (a column sum). With P = diag(1/nk) dM diag(1/nq):
        dK = P Q - diag(c_k <dKn, Kn> / nk^2) K,    dQ = P^T K - diag(c_q <dQn, Qn> / nq^2) Q
    (c = 1 where the norm is above eps, 0 where clamped).
So the backward reads the pixels twice too:
  1. `_grad_attention_kernel`: partial rows of dA = dO V'^T, split over pixel blocks as in the forward.
  2. `_grad_stats_kernel`: a program per (b, h) adds them up and computes dS, dr, P and the two
     diagonal terms (d x d work).
  3. `_grad_apply_kernel`: dV, dI, dQ and dK per pixel block.
rescale's gradient is the sum over batch rows of dr (torch's sum over a (B, heads) tensor).

Precision: float64 inputs accumulate in float64 and every dot is exact fp64 (the interpreter's float64
results match the reference to ~1e-12). float32: float32 accumulation and IEEE float32 dots (no TF32).
16-bit inputs (bf16 autocast): the Gram and dO V'^T are 16-bit dots with float32 accumulation (their
operands are the inputs themselves: exact products); the dots with A and P round them to 16 bits
first, as the reference under autocast rounds attn to bf16 for attn @ v; norms, softmax and the d x d
step in float32. V' = V . I is rounded to the inputs' dtype before its dots, as the reference's
product is. Tolerances: tests/test_kernel_ig_msa.py.

Launches: forward 3, backward 3 (+ torch's sum of rescale's per-row gradient).

Compile gate (`python -m lfpv_fast.kernels.compile_gate --models ig_msa`: fp32, bf16 and fp64 at
Retinexformer's three levels for 128x128 crops and a 1024x1920 frame): 0 failed and no spills on sm_90 and
sm_80 with Triton 3.6 and 3.9; at most 123 KB of shared memory (the fp64 backward apply), 66 KB in fp32, 49 KB in bf16
(bench/results/compile-ig_msa-triton-*.md). 16-bit loads of rows of d = 40 channels (80 bytes) are not
known to Triton to be 16-byte aligned (it tracks divisibility by 16 only): a possible speed-up, untimed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lfpv_fast.kernels._common import Target, accumulator_dtype, launch, new_output, target_for

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# F.normalize's default eps (the reference's).
NORM_EPS = 1e-12
# tl.dot needs every dimension >= 16 (Triton 3.6 for every operand type): the head dim is padded to a
# power of two >= 16 and masked.
_MIN_DOT = 16
# The tile configurations (register budgets of the d x d matrices) are sized for head dims up to 64
# (Retinexformer: 40).
_MAX_HEAD_DIM = 64
# Programs per SM of the pixel passes: enough to fill the GPU, few enough partial rows to add up.
_PROGRAMS_PER_SM = 2


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# DOT16: 16-bit inputs; the dots with A and P round them to the inputs' dtype (tensor cores).
# EMULATE: under Triton's CPU interpreter 16-bit dots multiply raw bits and its float32 -> bfloat16
# conversion truncates, so 16-bit operands are rounded to nearest-even by hand and multiplied as float32
# (the same products; the GPU accumulates them in float32 inside the MMA).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round16(x, in_ty: tl.constexpr, EMULATE: tl.constexpr):
    """float32 x rounded to the 16-bit dtype in_ty (nearest even); as float32 under EMULATE (dot
    operands for the interpreter), else in in_ty."""
    if EMULATE:
        if in_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            r = bits.to(tl.float32, bitcast=True)
        else:
            r = x.to(in_ty).to(tl.float32)
    else:
        r = x.to(in_ty)
    return r


@triton.jit
def _operand(x, EMULATE: tl.constexpr):
    """A loaded tile as a dot operand: 16-bit tiles go to float32 under EMULATE (exact)."""
    if EMULATE:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_tile(ptr, rows, cols, s_n, s_c, mask):
    return tl.load(ptr + rows[:, None].to(tl.int64) * s_n + cols[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _illuminated(v, illum, acc_ty: tl.constexpr, in_ty: tl.constexpr, DOT16: tl.constexpr,
                 EMULATE: tl.constexpr):
    """V' = V . I in the inputs' dtype, as the reference computes it (a dot operand)."""
    prod = v.to(acc_ty) * illum.to(acc_ty)
    if DOT16:
        prod = _round16(prod, in_ty, EMULATE)
    return prod


@triton.jit(do_not_specialize=["H", "N", "blocks_per_program"])
def _gram_kernel(
    Q, K, PART,
    sqb, sqn, sqc, skb, skn, skc,
    H, N, blocks_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Program (s, b*H + h): over pixel blocks s*blocks_per_program ..., the partial K Q^T (d x d) and
    squared row norms of Q and K, into partial row [(b*H + h) * splits + s]: [G (BD*BD) | |q|^2 (BD) |
    |k|^2 (BD)] (padding included: zeros)."""
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    acc_ty = PART.dtype.element_ty
    Q += b * sqb + h * HEAD_DIM * sqc
    K += b * skb + h * HEAD_DIM * skc
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    offs = tl.arange(0, BLOCK_N)
    gram = tl.zeros([BLOCK_D, BLOCK_D], dtype=acc_ty)
    sq_q = tl.zeros([BLOCK_D], dtype=acc_ty)
    sq_k = tl.zeros([BLOCK_D], dtype=acc_ty)
    first = split * blocks_per_program
    for i in range(blocks_per_program):
        rows = (first + i) * BLOCK_N + offs
        mask = (rows < N)[:, None] & d_ok[None, :]
        q = _operand(_load_tile(Q, rows, d, sqn, sqc, mask), EMULATE)
        # K loaded as a (d, pixels) tile: the dot's first operand without a transposition in registers
        k_t = _operand(tl.load(K + d[:, None] * skc + rows[None, :].to(tl.int64) * skn, mask=tl.trans(mask),
                               other=0.0), EMULATE)
        gram = tl.dot(k_t, q, gram, input_precision=DOT_PREC, out_dtype=acc_ty)
        qa = q.to(acc_ty)
        ka = k_t.to(acc_ty)
        sq_q += tl.sum(qa * qa, axis=0)
        sq_k += tl.sum(ka * ka, axis=1)
    row = PART + (bh.to(tl.int64) * splits + split) * (BLOCK_D * BLOCK_D + 2 * BLOCK_D)
    tl.store(row + d[:, None] * BLOCK_D + d[None, :], gram)
    tl.store(row + BLOCK_D * BLOCK_D + d, sq_q)
    tl.store(row + BLOCK_D * BLOCK_D + BLOCK_D + d, sq_k)


@triton.jit(do_not_specialize=["H", "splits"])
def _attention_kernel(
    PART, RESCALE, ATTN, COS, NORMS,
    H, splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr, IS_FP64: tl.constexpr,
):
    """Program b*H + h: the partial rows added up in order, then M = Kn Qn^T (COS), the clamped norms
    [nq | nk] (NORMS) and A = softmax(r_h M) (ATTN), each (d x d) / (2, d) per (b, h), unpadded."""
    bh = tl.program_id(0)
    h = bh % H
    acc_ty = PART.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    width = BLOCK_D * BLOCK_D + 2 * BLOCK_D
    row = PART + bh.to(tl.int64) * splits * width
    gram = tl.zeros([BLOCK_D, BLOCK_D], dtype=acc_ty)
    sq_q = tl.zeros([BLOCK_D], dtype=acc_ty)
    sq_k = tl.zeros([BLOCK_D], dtype=acc_ty)
    for _ in range(splits):
        gram += tl.load(row + d[:, None] * BLOCK_D + d[None, :])
        sq_q += tl.load(row + BLOCK_D * BLOCK_D + d)
        sq_k += tl.load(row + BLOCK_D * BLOCK_D + BLOCK_D + d)
        row += width
    # F.normalize: x / max(|x|, eps)
    nq = tl.maximum(tl.sqrt(sq_q), EPS)
    nk = tl.maximum(tl.sqrt(sq_k), EPS)
    if IS_FP64:
        cos = gram / nk[:, None] / nq[None, :]
    else:
        cos = tl.math.div_rn(tl.math.div_rn(gram, nk[:, None]), nq[None, :])
    r = tl.load(RESCALE + h).to(acc_ty)
    # Padded rows have M = 0 on real columns: finite; padded columns take no weight.
    s = tl.where(d_ok[None, :], cos * r, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    if IS_FP64:
        attn = e / tl.sum(e, axis=1)[:, None]
    else:
        attn = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])
    dd = bh.to(tl.int64) * HEAD_DIM * HEAD_DIM + d[:, None] * HEAD_DIM + d[None, :]
    dd_ok = d_ok[:, None] & d_ok[None, :]
    tl.store(ATTN + dd, attn, mask=dd_ok)
    tl.store(COS + dd, cos, mask=dd_ok)
    tl.store(NORMS + bh.to(tl.int64) * 2 * HEAD_DIM + d, nq, mask=d_ok)
    tl.store(NORMS + bh.to(tl.int64) * 2 * HEAD_DIM + HEAD_DIM + d, nk, mask=d_ok)


@triton.jit
def _load_dd(ptr, bh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (b, h) d x d matrix of a (B*H, d, d) buffer, zero-padded to (BLOCK_D, BLOCK_D)."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    return tl.load(ptr + bh.to(tl.int64) * HEAD_DIM * HEAD_DIM + d[:, None] * HEAD_DIM + d[None, :],
                   mask=d_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit(do_not_specialize=["H", "N", "blocks_per_program"])
def _apply_kernel(
    V, ILLUM, ATTN, OUT,
    svb, svn, svc, sib, sin, sic, sob, son, soc,
    H, N, blocks_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT16: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Program (s, b*H + h): out = A V' over its pixel blocks; as (pixels, d) tiles, out = V' A^T."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    acc_ty = ATTN.dtype.element_ty
    in_ty = OUT.dtype.element_ty
    V += b * svb + h * HEAD_DIM * svc
    ILLUM += b * sib + h * HEAD_DIM * sic
    OUT += b * sob + h * HEAD_DIM * soc
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    offs = tl.arange(0, BLOCK_N)
    attn_t = tl.trans(_load_dd(ATTN, bh, HEAD_DIM, BLOCK_D))
    if DOT16:
        attn_t = _round16(attn_t, in_ty, EMULATE)
    first = split * blocks_per_program
    for i in range(blocks_per_program):
        rows = (first + i) * BLOCK_N + offs
        mask = (rows < N)[:, None] & d_ok[None, :]
        v = _load_tile(V, rows, d, svn, svc, mask)
        illum = _load_tile(ILLUM, rows, d, sin, sic, mask)
        vi = _illuminated(v, illum, acc_ty, in_ty, DOT16, EMULATE)
        out = tl.dot(vi, attn_t, input_precision=DOT_PREC, out_dtype=acc_ty)
        tl.store(OUT + rows[:, None].to(tl.int64) * son + d[None, :] * soc, out.to(in_ty), mask=mask)


@triton.jit(do_not_specialize=["H", "N", "blocks_per_program"])
def _grad_attention_kernel(
    DOUT, V, ILLUM, PART,
    sdb, sdn, sdc, svb, svn, svc, sib, sin, sic,
    H, N, blocks_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT16: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Program (s, b*H + h): the partial dA = dO V'^T (d x d) of its pixel blocks, into partial row
    [(b*H + h) * splits + s] (BD*BD, padding included)."""
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    acc_ty = PART.dtype.element_ty
    in_ty = V.dtype.element_ty
    DOUT += b * sdb + h * HEAD_DIM * sdc
    V += b * svb + h * HEAD_DIM * svc
    ILLUM += b * sib + h * HEAD_DIM * sic
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    offs = tl.arange(0, BLOCK_N)
    grad_attn = tl.zeros([BLOCK_D, BLOCK_D], dtype=acc_ty)
    first = split * blocks_per_program
    for i in range(blocks_per_program):
        rows = (first + i) * BLOCK_N + offs
        mask = (rows < N)[:, None] & d_ok[None, :]
        # dO loaded as a (d, pixels) tile: the dot's first operand without a transposition in registers
        dout_t = _operand(tl.load(DOUT + d[:, None] * sdc + rows[None, :].to(tl.int64) * sdn,
                                  mask=tl.trans(mask), other=0.0), EMULATE)
        vi = _illuminated(_load_tile(V, rows, d, svn, svc, mask), _load_tile(ILLUM, rows, d, sin, sic, mask),
                          acc_ty, in_ty, DOT16, EMULATE)
        grad_attn = tl.dot(dout_t, vi, grad_attn, input_precision=DOT_PREC, out_dtype=acc_ty)
    row = PART + (bh.to(tl.int64) * splits + split) * (BLOCK_D * BLOCK_D)
    tl.store(row + d[:, None] * BLOCK_D + d[None, :], grad_attn)


@triton.jit(do_not_specialize=["H", "splits"])
def _grad_stats_kernel(
    PART, ATTN, COS, NORMS, RESCALE, PMAT, BETA, DRESCALE,
    H, splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr, IS_FP64: tl.constexpr,
):
    """Program b*H + h: dA (the partial rows added up in order), then P = diag(1/nk) dM diag(1/nq) (PMAT),
    the diagonal terms [beta_q | beta_k] (BETA: dQ = P^T K + beta_q . Q, dK = P Q + beta_k . K) and the
    (b, h) part of rescale's gradient (DRESCALE). See the module docstring."""
    bh = tl.program_id(0)
    h = bh % H
    acc_ty = PART.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = PART + bh.to(tl.int64) * splits * (BLOCK_D * BLOCK_D)
    grad_attn = tl.zeros([BLOCK_D, BLOCK_D], dtype=acc_ty)
    for _ in range(splits):
        grad_attn += tl.load(row + d[:, None] * BLOCK_D + d[None, :])
        row += BLOCK_D * BLOCK_D
    attn = _load_dd(ATTN, bh, HEAD_DIM, BLOCK_D)  # zero in the padding: so are dS, dM and P
    cos = _load_dd(COS, bh, HEAD_DIM, BLOCK_D)
    # Padded norms load as 1: finite, and multiplied by zeros only.
    nq = tl.load(NORMS + bh.to(tl.int64) * 2 * HEAD_DIM + d, mask=d_ok, other=1.0)
    nk = tl.load(NORMS + bh.to(tl.int64) * 2 * HEAD_DIM + HEAD_DIM + d, mask=d_ok, other=1.0)
    r = tl.load(RESCALE + h).to(acc_ty)
    grad_s = attn * (grad_attn - tl.sum(grad_attn * attn, axis=1)[:, None])
    tl.store(DRESCALE + bh, tl.sum(tl.sum(grad_s * cos, axis=1), axis=0))
    grad_cos = grad_s * r
    gc = grad_cos * cos
    dot_k = tl.sum(gc, axis=1)  # <dKn_i, Kn_i>
    dot_q = tl.sum(gc, axis=0)  # <dQn_j, Qn_j>
    # A clamped norm (|x| <= eps) is a constant: no projection term.
    if IS_FP64:
        pmat = grad_cos / nk[:, None] / nq[None, :]
        beta_q = tl.where(nq > EPS, -dot_q / nq / nq, 0.0)
        beta_k = tl.where(nk > EPS, -dot_k / nk / nk, 0.0)
    else:
        pmat = tl.math.div_rn(tl.math.div_rn(grad_cos, nk[:, None]), nq[None, :])
        beta_q = tl.where(nq > EPS, -tl.math.div_rn(tl.math.div_rn(dot_q, nq), nq), 0.0)
        beta_k = tl.where(nk > EPS, -tl.math.div_rn(tl.math.div_rn(dot_k, nk), nk), 0.0)
    dd = bh.to(tl.int64) * HEAD_DIM * HEAD_DIM + d[:, None] * HEAD_DIM + d[None, :]
    tl.store(PMAT + dd, pmat, mask=d_ok[:, None] & d_ok[None, :])
    tl.store(BETA + bh.to(tl.int64) * 2 * HEAD_DIM + d, beta_q, mask=d_ok)
    tl.store(BETA + bh.to(tl.int64) * 2 * HEAD_DIM + HEAD_DIM + d, beta_k, mask=d_ok)


@triton.jit(do_not_specialize=["H", "N", "blocks_per_program"])
def _grad_apply_kernel(
    DOUT, Q, K, V, ILLUM, ATTN, PMAT, BETA, DQ, DK, DV, DI,
    sdb, sdn, sdc, sqb, sqn, sqc, skb, skn, skc, svb, svn, svc, sib, sin, sic,
    H, N, blocks_per_program, C,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT16: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Program (s, b*H + h), over its pixel blocks as (pixels, d) tiles: dV' = dO A, dV = dV' . I,
    dI = dV' . V, dQ = K P + Q . beta_q, dK = Q P^T + K . beta_k. The grads are contiguous (B, N, C)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    acc_ty = ATTN.dtype.element_ty
    in_ty = Q.dtype.element_ty
    DOUT += b * sdb + h * HEAD_DIM * sdc
    Q += b * sqb + h * HEAD_DIM * sqc
    K += b * skb + h * HEAD_DIM * skc
    V += b * svb + h * HEAD_DIM * svc
    ILLUM += b * sib + h * HEAD_DIM * sic
    grad_offset = b * N * C + h * HEAD_DIM
    DQ += grad_offset
    DK += grad_offset
    DV += grad_offset
    DI += grad_offset
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    offs = tl.arange(0, BLOCK_N)
    attn = _load_dd(ATTN, bh, HEAD_DIM, BLOCK_D)
    pmat = _load_dd(PMAT, bh, HEAD_DIM, BLOCK_D)
    pmat_t = tl.trans(pmat)
    if DOT16:
        attn = _round16(attn, in_ty, EMULATE)
        pmat = _round16(pmat, in_ty, EMULATE)
        pmat_t = _round16(pmat_t, in_ty, EMULATE)
    beta_q = tl.load(BETA + bh.to(tl.int64) * 2 * HEAD_DIM + d, mask=d_ok, other=0.0)
    beta_k = tl.load(BETA + bh.to(tl.int64) * 2 * HEAD_DIM + HEAD_DIM + d, mask=d_ok, other=0.0)
    first = split * blocks_per_program
    for i in range(blocks_per_program):
        rows = (first + i) * BLOCK_N + offs
        mask = (rows < N)[:, None] & d_ok[None, :]
        grad_at = rows[:, None].to(tl.int64) * C + d[None, :]
        dout = _operand(_load_tile(DOUT, rows, d, sdn, sdc, mask), EMULATE)
        grad_vi = tl.dot(dout, attn, input_precision=DOT_PREC, out_dtype=acc_ty)
        v = _load_tile(V, rows, d, svn, svc, mask).to(acc_ty)
        illum = _load_tile(ILLUM, rows, d, sin, sic, mask).to(acc_ty)
        tl.store(DV + grad_at, (grad_vi * illum).to(in_ty), mask=mask)
        tl.store(DI + grad_at, (grad_vi * v).to(in_ty), mask=mask)
        q = _operand(_load_tile(Q, rows, d, sqn, sqc, mask), EMULATE)
        k = _operand(_load_tile(K, rows, d, skn, skc, mask), EMULATE)
        grad_q = tl.dot(k, pmat, input_precision=DOT_PREC, out_dtype=acc_ty) + q.to(acc_ty) * beta_q[None, :]
        grad_k = tl.dot(q, pmat_t, input_precision=DOT_PREC, out_dtype=acc_ty) + k.to(acc_ty) * beta_k[None, :]
        tl.store(DQ + grad_at, grad_q.to(in_ty), mask=mask)
        tl.store(DK + grad_at, grad_k.to(in_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(head_dim))


# Pixels per block, warps and pipeline stages of each pixel pass, per input dtype: chosen with the compile
# gate (registers, spills, shared memory on sm_90 and sm_80 with Triton 3.6 and 3.9), not yet by timings.
_CONFIGS = {
    # pass:          gram        apply       bwd_reduce  bwd_apply
    torch.float64: dict(gram=(32, 4, 2), apply=(32, 4, 2), bwd_reduce=(32, 8, 1), bwd_apply=(16, 4, 1)),
    torch.float32: dict(gram=(32, 8, 1), apply=(32, 8, 2), bwd_reduce=(32, 8, 1), bwd_apply=(32, 8, 2)),
    torch.bfloat16: dict(gram=(64, 8, 3), apply=(64, 8, 3), bwd_reduce=(64, 8, 3), bwd_apply=(32, 8, 2)),
}


def _config(dtype: torch.dtype, target: Target, pass_name: str) -> tuple[int, int, int]:
    """(pixels per block, num_warps, num_stages) of one pixel pass ("gram", "apply", "bwd_reduce",
    "bwd_apply") for inputs of `dtype` (float16 as bfloat16)."""
    return _CONFIGS[torch.bfloat16 if dtype == torch.float16 else dtype][pass_name]


def _splits(n: int, block_n: int, rows: int, target: Target) -> tuple[int, int]:
    """(programs per (b, h), pixel blocks per program) of a pixel pass over `rows` = B*heads rows."""
    blocks = triton.cdiv(n, block_n)
    wanted = max(1, triton.cdiv(_PROGRAMS_PER_SM * target.sm_count, rows))
    per_program = triton.cdiv(blocks, min(blocks, wanted))
    return triton.cdiv(blocks, per_program), per_program


def _dots(dtype: torch.dtype, target: Target) -> dict:
    """DOT16, DOT_PREC and EMULATE of the kernels for inputs of `dtype`."""
    dot16 = dtype in (torch.float16, torch.bfloat16)
    emulate = dot16 and target.interpreter
    # "ieee": float32 must not drop to TF32 (torch.matmul's default is full float32). 16-bit operands take
    # the default ("tf32", which they ignore); under EMULATE they are float32 copies: "ieee".
    return dict(DOT16=dot16, DOT_PREC="tf32" if dot16 and not emulate else "ieee", EMULATE=emulate)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, illumination: torch.Tensor,
                  rescale: torch.Tensor, heads: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"ig_msa expects (B, N, C) q, k, v and illumination; got q {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("illumination", illumination)):
        if t.shape != q.shape:
            raise ValueError(f"ig_msa: {name} {tuple(t.shape)} does not match q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype == illumination.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"ig_msa: q, k, v and illumination must share one of {_SUPPORTED_DTYPES}; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}, {illumination.dtype}")
    if q.shape[1] == 0:
        raise ValueError(f"ig_msa: q {tuple(q.shape)} has no pixels (N = 0)")
    channels = q.shape[2]
    if heads < 1 or channels % heads:
        raise ValueError(f"ig_msa: {channels} channels do not split into {heads} heads")
    if channels // heads > _MAX_HEAD_DIM:
        raise ValueError(f"ig_msa: head dim {channels // heads} > {_MAX_HEAD_DIM} is not supported")
    if rescale.numel() != heads:
        raise ValueError(f"ig_msa: rescale has {rescale.numel()} values; expected one per head ({heads})")
    if not (q.device == k.device == v.device == illumination.device == rescale.device):
        raise ValueError("ig_msa: q, k, v, illumination and rescale must be on one device")


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@triton_op("lfpv::ig_msa_fwd", mutates_args=())
def ig_msa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, illumination: torch.Tensor, rescale: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, N, C) in q's dtype; A, M (B, heads, d, d) and the clamped norms [nq | nk] (B, heads, 2, d)
    in the accumulator dtype, for the backward)."""
    _check_inputs(q, k, v, illumination, rescale, heads)
    batch, n, channels = q.shape
    d = channels // heads
    rows = batch * heads
    acc = accumulator_dtype(q.dtype)
    device = q.device
    target = target_for(device)
    block_d = _block_d(d)
    dots = _dots(q.dtype, target)
    rescale = rescale.reshape(heads)

    block_n, warps, stages = _config(q.dtype, target, "gram")
    splits, per_program = _splits(n, block_n, rows, target)
    partials = new_output((rows * splits, block_d * block_d + 2 * block_d), acc, device)
    launch("ig_msa_gram", _gram_kernel, (splits, rows),
           q, k, partials, *q.stride(), *k.stride(), heads, n, per_program,
           HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n, DOT_PREC=dots["DOT_PREC"], EMULATE=dots["EMULATE"],
           num_warps=warps, num_stages=stages)

    attn = new_output((batch, heads, d, d), acc, device)
    cos = new_output((batch, heads, d, d), acc, device)
    norms = new_output((batch, heads, 2, d), acc, device)
    launch("ig_msa_attention", _attention_kernel, (rows,),
           partials, rescale, attn, cos, norms, heads, splits,
           HEAD_DIM=d, BLOCK_D=block_d, EPS=NORM_EPS, IS_FP64=q.dtype == torch.float64, num_warps=4)

    out = new_output((batch, n, channels), q.dtype, device)
    block_n, warps, stages = _config(q.dtype, target, "apply")
    splits, per_program = _splits(n, block_n, rows, target)
    launch("ig_msa_apply", _apply_kernel, (splits, rows),
           v, illumination, attn, out, *v.stride(), *illumination.stride(), *out.stride(), heads, n, per_program,
           HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n, **dots, num_warps=warps, num_stages=stages)
    return out, attn, cos, norms


@triton_op("lfpv::ig_msa_bwd", mutates_args=())
def ig_msa_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, illumination: torch.Tensor,
    rescale: torch.Tensor, attn: torch.Tensor, cos: torch.Tensor, norms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dillumination, drescale) of ig_msa given the forward's A, M and norms."""
    batch, n, channels = q.shape
    heads, d = attn.shape[1], attn.shape[2]
    rows = batch * heads
    acc = accumulator_dtype(q.dtype)
    device = q.device
    target = target_for(device)
    block_d = _block_d(d)
    dots = _dots(q.dtype, target)
    is_fp64 = q.dtype == torch.float64
    grad_out = grad_out.to(q.dtype)

    block_n, warps, stages = _config(q.dtype, target, "bwd_reduce")
    splits, per_program = _splits(n, block_n, rows, target)
    partials = new_output((rows * splits, block_d * block_d), acc, device)
    launch("ig_msa_bwd_reduce", _grad_attention_kernel, (splits, rows),
           grad_out, v, illumination, partials, *grad_out.stride(), *v.stride(), *illumination.stride(),
           heads, n, per_program,
           HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n, **dots, num_warps=warps, num_stages=stages)

    pmat = new_output((batch, heads, d, d), acc, device)
    beta = new_output((batch, heads, 2, d), acc, device)
    grad_rescale_rows = new_output((batch, heads), acc, device)
    launch("ig_msa_bwd_stats", _grad_stats_kernel, (rows,),
           partials, attn, cos, norms, rescale.reshape(heads), pmat, beta, grad_rescale_rows, heads, splits,
           HEAD_DIM=d, BLOCK_D=block_d, EPS=NORM_EPS, IS_FP64=is_fp64, num_warps=4)

    grads = [new_output((batch, n, channels), t.dtype, device) for t in (q, k, v, illumination)]
    block_n, warps, stages = _config(q.dtype, target, "bwd_apply")
    splits, per_program = _splits(n, block_n, rows, target)
    launch("ig_msa_bwd_apply", _grad_apply_kernel, (splits, rows),
           grad_out, q, k, v, illumination, attn, pmat, beta, *grads,
           *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(), *illumination.stride(),
           heads, n, per_program, channels,
           HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n, **dots, num_warps=warps, num_stages=stages)
    grad_rescale = grad_rescale_rows.sum(dim=0).to(rescale.dtype).reshape(rescale.shape)
    return (*grads, grad_rescale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, illumination, rescale, _heads = inputs
    _out, attn, cos, norms = output
    ctx.save_for_backward(q, k, v, illumination, rescale, attn, cos, norms)


def _backward(ctx, grad_out, grad_attn, grad_cos, grad_norms):
    # Only out is a result of the public function: the other outputs' grads are None/zero and ignored.
    dq, dk, dv, dillum, drescale = ig_msa_bwd(grad_out, *ctx.saved_tensors)
    return dq, dk, dv, dillum, drescale, None


ig_msa_fwd.register_autograd(_backward, setup_context=_setup_context)


def ig_msa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, illumination: torch.Tensor,
           rescale: torch.Tensor, heads: int) -> torch.Tensor:
    """Retinexformer's IG-MSA core; same signature and semantics as `lfpv_fast.ops.reference.ig_msa`.

    q, k, v, illumination (B, N, C) of one float dtype (any strides), C = heads * d (d <= 64); rescale
    holds `heads` values (any shape, e.g. the published (heads, 1, 1)). Under autocast the four are cast
    to its dtype first, as the reference's matmuls are (the result has that dtype). Differentiable in
    q, k, v, illumination and rescale (rescale's gradient has its dtype and shape).
    """
    device = q.device.type
    if torch.is_autocast_enabled(device) and q.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
        q, k, v, illumination = (t.to(dtype) for t in (q, k, v, illumination))
    return ig_msa_fwd(q, k, v, illumination, rescale, heads)[0]


__all__ = ["ig_msa", "ig_msa_bwd", "ig_msa_fwd"]


# ----------------------------------------------------------------------------------------------
# The compile gate's launches (python -m lfpv_fast.kernels.compile_gate --models ig_msa)
# ----------------------------------------------------------------------------------------------
