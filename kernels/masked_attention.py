"""Flash-style masked multi-head attention: softmax(q k^T / sqrt(D), masked keys at -1e9) v.

Same semantics as `lfpv_fast.ops.reference.masked_attention`:

* keys with key_keep False score -1e9 (not -inf). In a batch row that keeps at least one key they get
  exactly zero weight (exp(-1e9 - m) underflows to 0 in every float type); in a batch row that keeps
  no key, every score is -1e9, so every key gets weight 1/L (the mean of v). The kernels handle that
  row with a per-batch-row flag "any key kept": when it is False every real key scores 0 instead of
  -1e9 (identical softmax, since all scores are equal), which keeps the stored logsumexp small
  (log L) rather than -1e9 + log L, which float32 cannot represent (its ulp at 1e9 is 64) and which
  would make the backward's exp(s - lse) wrong.
* the masked_fill blocks gradients at masked keys: dS is zeroed there, so an all-masked row sends no
  gradient to q or k, only to v (uniform weights).
* keys beyond L in the last tile are padding and score -inf.
* q is scaled as the reference does, q / D ** 0.5 in q's dtype, before the q k^T product.

Forward (one launch): online softmax over key tiles, never materialising L x L; stores the base-2
logsumexp per query row. Backward (two launches): delta = rowsum(dO * O), then one kernel whose
programs each compute dk, dv for one key block (looping over query blocks) and dq for one query block
(looping over key blocks): the FlashAttention-2 scheme without atomics.

Accumulation is float32 for float32/bf16/fp16 inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lfpv_fast.kernels._common import Target, accumulator_dtype, div_ieee, launch, new_output, target_for
from lfpv_fast.kernels.conventions import MASKED_SCORE

_LOG2E = 1.4426950408889634  # the kernels use exp2/log2: base-2 scores s * log2(e)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Globals read inside @triton.jit functions must be constexpr.
MASKED_SCORE_C = tl.constexpr(MASKED_SCORE)
LOG2E_C = tl.constexpr(_LOG2E)


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# Under TRITON_INTERPRET every call of a @triton.jit helper re-patches triton.language (milliseconds
# each), so the loops below inline their arithmetic instead of calling helpers.
#
# DOT_PREC: "ieee" for float32/float64 (float32 must not silently drop to TF32: torch.matmul's
# default is full float32), "tf32" (the default; ignored for 16-bit operands) otherwise.
# UPCAST: Triton's CPU interpreter multiplies bfloat16 dot operands as raw integers; since bf16 ->
# float32 is exact, the interpreter runs bf16 dots on float32 copies of the (bf16-rounded) operands,
# which is the same product with float32 accumulation.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _any_key_kept(KEEP, s_keep_b, s_keep_l, b, LK, BLOCK: tl.constexpr):
    """1 if batch row b keeps at least one key (a scan of L bytes: negligible next to the K/V tiles)."""
    offs = tl.arange(0, BLOCK)
    found = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, LK, BLOCK):
        cols = start + offs
        keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_l, mask=cols < LK, other=0)
        found = tl.maximum(found, (keep != 0).to(tl.int32))
    return tl.max(found, axis=0)


@triton.jit(do_not_specialize=["H", "LQ", "LK"])
def _attn_fwd_kernel(
    Q, K, V, KEEP, OUT, LSE,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    s_keep_b, s_keep_l,
    sob, soh, sol, sod,
    H, LQ, LK,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    OUT += b * sob + h * soh
    LSE += bh.to(tl.int64) * LQ
    in_ty = Q.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # Score of a masked (real) key: -1e9 as published, or 0 when the row keeps no key (module doc).
    any_kept = _any_key_kept(KEEP, s_keep_b, s_keep_l, b, LK, BLOCK_N)
    masked_score = tl.where(any_kept != 0, MASKED_SCORE_C, 0.0)

    # q / sqrt(D) in q's dtype, as the reference computes it; the dots then run on it
    q = tl.load(Q + rows[:, None] * sql + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = div_ieee(q.to(tl.float64) if IS_FP64 else q.to(tl.float32), SCALE, IS_FP64).to(in_ty)
    if IS_FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float64)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if UPCAST:
        q = q.to(tl.float32)

    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < LK
        kt = tl.load(K + cols[None, :] * skl + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * svl + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_l, mask=n_ok, other=0) != 0
        s = tl.where(keep[None, :], qk, masked_score) * LOG2E_C
        s = tl.where(n_ok[None, :], s, float("-inf"))  # padding keys: no weight at all
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(in_ty).to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC, out_dtype=acc.dtype)
        m_i = m_new

    out = div_ieee(acc, l_i[:, None], IS_FP64)
    tl.store(OUT + rows[:, None] * sol + offs_d[None, :] * sod, out.to(in_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["H", "LQ"])
def _attn_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    sob, soh, sol, sod,
    sdob, sdoh, sdol, sdod,
    H, LQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_FP64: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the row term of dS = P * (dP - delta)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < LQ) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(OUT + b * sob + h * soh + rows[:, None] * sol + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdol + offs_d[None, :] * sdod, mask=mask, other=0.0)
    if IS_FP64:
        delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), axis=1)
    else:
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * LQ + rows, delta, mask=rows < LQ)


@triton.jit(do_not_specialize=["H", "LQ", "LK"])
def _attn_bwd_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DQ, DK, DV,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    s_keep_b, s_keep_l,
    sdob, sdoh, sdol, sdod,
    H, LQ, LK,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i, b*H + h): dk, dv of key block i (looping over query blocks) and dq of query block i
    (looping over key blocks). dq, dk, dv are contiguous (B, H, L, D). Scores are recomputed in base 2
    exactly as the forward computes them, so exp2(s - lse) is the forward's softmax."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    LSE += bh.to(tl.int64) * LQ
    DELTA += bh.to(tl.int64) * LQ
    DQ += bh.to(tl.int64) * LQ * HEAD_DIM
    DK += bh.to(tl.int64) * LK * HEAD_DIM
    DV += bh.to(tl.int64) * LK * HEAD_DIM
    in_ty = Q.dtype.element_ty

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    any_kept = _any_key_kept(KEEP, s_keep_b, s_keep_l, b, LK, BLOCK_N1)
    masked_score = tl.where(any_kept != 0, MASKED_SCORE_C, 0.0)

    # ---- dk, dv of keys [start_n, start_n + BLOCK_N1), on transposed scores S^T (keys x queries)
    start_n = pid * BLOCK_N1
    if start_n < LK:
        cols = start_n + tl.arange(0, BLOCK_N1)
        n_ok = cols < LK
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_l, mask=n_ok, other=0) != 0
        if IS_FP64:
            dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float64)
            dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float64)
        else:
            dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, LQ, BLOCK_M1):
            rows = start_m + tl.arange(0, BLOCK_M1)
            m_ok = rows < LQ
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + rows[:, None] * sql + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
            do = tl.load(DO + rows[:, None] * sdol + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
            if IS_FP64:
                q = q / SCALE
            else:
                q = tl.math.div_rn(q.to(tl.float32), SCALE).to(in_ty)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            st = tl.where(keep[:, None], tl.dot(k, tl.trans(q), input_precision=DOT_PREC), masked_score) * LOG2E_C
            lse = tl.load(LSE + rows, mask=m_ok, other=0.0)
            # padding query rows must contribute nothing (their dO is 0, but make it explicit)
            pt = tl.where(m_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
            dv = tl.dot(pt.to(in_ty).to(do.dtype), do, dv, input_precision=DOT_PREC, out_dtype=dv.dtype)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
            # masked_fill passes no gradient to masked scores: zero dS there (matters for all-masked rows)
            dst = tl.where(keep[:, None], pt * (dpt - delta[None, :]), 0.0)
            dk = tl.dot(dst.to(in_ty).to(q.dtype), q, dk, input_precision=DOT_PREC, out_dtype=dk.dtype)
        tl.store(DK + cols[:, None] * HEAD_DIM + offs_d[None, :], dk.to(in_ty), mask=kv_mask)
        tl.store(DV + cols[:, None] * HEAD_DIM + offs_d[None, :], dv.to(in_ty), mask=kv_mask)

    # ---- dq of queries [start_m, start_m + BLOCK_M2)
    start_m = pid * BLOCK_M2
    if start_m < LQ:
        rows = start_m + tl.arange(0, BLOCK_M2)
        m_ok = rows < LQ
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * sql + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
        q = div_ieee(q.to(tl.float64) if IS_FP64 else q.to(tl.float32), SCALE, IS_FP64).to(in_ty)
        do = tl.load(DO + rows[:, None] * sdol + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + rows, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
        if IS_FP64:
            dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float64)
        else:
            dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
        for start_n2 in range(0, LK, BLOCK_N2):
            cols = start_n2 + tl.arange(0, BLOCK_N2)
            n_ok = cols < LK
            kt_mask = n_ok[None, :] & d_ok[:, None]
            kt = tl.load(K + cols[None, :] * skl + offs_d[:, None] * skd, mask=kt_mask, other=0.0)
            vt = tl.load(V + cols[None, :] * svl + offs_d[:, None] * svd, mask=kt_mask, other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_l, mask=n_ok, other=0) != 0
            s = tl.where(keep[None, :], tl.dot(q, kt, input_precision=DOT_PREC), masked_score) * LOG2E_C
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, vt, input_precision=DOT_PREC)
            # zero for masked keys (no gradient through masked_fill) and padding keys (not real keys)
            ds = tl.where(keep[None, :] & n_ok[None, :], p * (dp - delta[:, None]), 0.0)
            dq = tl.dot(ds.to(in_ty).to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC, out_dtype=dq.dtype)
        # d(q / sqrt(D))/dq = 1 / sqrt(D), applied as the reference's division backward does
        dq = div_ieee(dq, SCALE, IS_FP64)
        tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], dq.to(in_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; head dims that are not a power of two are padded and masked.
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype, target: Target) -> str:
    # bf16 training: q, k, v (and dO) are bf16 already, so every dot of the forward and the backward runs
    # on bf16 tensor cores with float32 accumulation; P and dS are rounded to bf16 for their dots, as
    # FlashAttention does. Stated tolerance (tests/kernels/test_kernel_masked_attention.py): 5 x 2^-8 of the
    # output's scale, twice that for the gradients. float32 keeps exact "ieee" dots (torch.matmul's
    # default is full float32); "tf32" is ignored for 16-bit operands.
    return "ieee" if dtype in (torch.float32, torch.float64) or _upcast_dots(dtype, target) else "tf32"


def _upcast_dots(dtype: torch.dtype, target: Target) -> bool:
    """bf16 dots run on float32 copies under the interpreter only (see UPCAST above the kernels): the one
    place where the interpreter does not run the GPU's arithmetic (the products are the same; the GPU
    accumulates bf16 products in float32 inside the MMA, the interpreter in float32 after upcasting)."""
    return target.interpreter and dtype == torch.bfloat16


# Configurations chosen with the compile gate (bench/compile_gate.py): zero spills on
# sm_90 and sm_80 at the model's head dim 64 (but sm_80's 16-bit backward) and at the demo's 32 (but its
# fp32 forward on sm_80 with Triton 3.9: 4 B), with Triton 3.6 and 3.9, shared memory well under both
# cards. The interpreter runs them too (sm_90's unless LFPV_TRITON_TARGET says otherwise), so the
# CPU tests cover the GPU's tiles, loops and tails. Head dims above 64 (padded to 128) take the
# smaller-tile rows, which the gate does not build (the model's head dim is 64).


def _fwd_config(dtype: torch.dtype, block_d: int, target: Target) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel."""
    if dtype == torch.float64:  # no tensor-core path worth tuning: small tiles, low register pressure
        return 32, 32, 4, 1
    if dtype == torch.float32:  # full-precision (ieee) dots: smaller tiles than the 16-bit path
        return (64, 32, 8, 2) if block_d <= 64 else (32, 32, 8, 2)
    # bf16 / fp16: 128 queries x 64 keys per step, K/V tiles multi-buffered.
    return (128, 64, 8, 3) if block_d <= 64 else (128, 64, 8, 2)


def _bwd_config(dtype: torch.dtype, block_d: int, target: Target) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages) of the backward kernel."""
    if dtype == torch.float64:
        return 16, 32, 32, 16, 8, 1
    if dtype == torch.float32:
        return 32, 32, 32, 32, 8, 2
    # The Triton fused-attention tutorial's split: narrow query steps for dk/dv, narrow key steps for dq.
    if target.arch < 90:  # sm_80 spills with 64- and 128-wide blocks
        return 32, 32, 32, 32, 4, 2
    return (32, 128, 128, 32, 8, 3) if block_d <= 64 else (32, 64, 64, 32, 8, 2)


def _keep_flags(key_keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """key_keep as the kernels read it: the bool bytes as uint8 0/1 (no i1 pointers); for float64, int32.
    (Triton 3.6 sizes a dot operand's register layout by the narrowest type its values derive from:
    uint8 flags gave the float64 P @ V dot a layout its fp64 MMA lowering does not support.)"""
    return key_keep.to(torch.int32) if dtype == torch.float64 else key_keep.view(torch.uint8)


# Rows per program of the backward's delta = rowsum(dO * O).
_PREPROCESS_ROWS = 64


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"masked_attention expects (B, heads, L, D) q, k, v; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one of {_SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_keep.dtype != torch.bool or tuple(key_keep.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_keep must be a (B, L) = {(k.shape[0], k.shape[2])} bool tensor, got "
                         f"{key_keep.dtype} {tuple(key_keep.shape)}")
    if q.shape[3] > 128:  # the GPU tile configurations are sized for head dims up to 128
        raise ValueError(f"head dim {q.shape[3]} > 128 is not supported")
    if not (q.device == k.device == v.device == key_keep.device):
        raise ValueError("q, k, v and key_keep must be on one device")


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.triton_op("lfpv::masked_attention_fwd", mutates_args=())
def masked_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,Lq,D) in q's dtype, base-2 logsumexp (B,H,Lq) in the accumulator dtype)."""
    _check_inputs(q, k, v, key_keep)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    acc = accumulator_dtype(q.dtype)
    out = new_output((b, h, lq, d), q.dtype, q.device)
    lse = new_output((b, h, lq), acc, q.device)
    block_d = _block_d(d)
    target = target_for(q.device)
    block_m, block_n, warps, stages = _fwd_config(q.dtype, block_d, target)
    keep = _keep_flags(key_keep, q.dtype)
    launch(
        "masked_attention_fwd", _attn_fwd_kernel, (triton.cdiv(lq, block_m), b * h),
        q, k, v, keep, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *keep.stride(), *out.stride(),
        h, lq, lk,
        SCALE=d ** 0.5, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        IS_FP64=q.dtype == torch.float64, DOT_PREC=_dot_precision(q.dtype, target),
        UPCAST=_upcast_dots(q.dtype, target), num_warps=warps, num_stages=stages,
    )
    return out, lse


@torch.library.triton_op("lfpv::masked_attention_bwd", mutates_args=())
def masked_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of masked_attention given the forward's out and logsumexp."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    acc = accumulator_dtype(q.dtype)
    is_fp64 = q.dtype == torch.float64
    block_d = _block_d(d)
    grad_out = grad_out.to(q.dtype)
    keep = _keep_flags(key_keep, q.dtype)

    target = target_for(q.device)
    delta = torch.empty((b, h, lq), dtype=acc, device=q.device)  # scratch, fully written
    launch(
        "masked_attention_bwd_preprocess", _attn_bwd_preprocess_kernel,
        (triton.cdiv(lq, _PREPROCESS_ROWS), b * h),
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, lq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_ROWS, IS_FP64=is_fp64,
    )

    dq = new_output((b, h, lq, d), q.dtype, q.device)
    dk = new_output((b, h, lk, d), k.dtype, k.device)
    dv = new_output((b, h, lk, d), v.dtype, v.device)
    bm1, bn1, bm2, bn2, warps, stages = _bwd_config(q.dtype, block_d, target)
    grid = (max(triton.cdiv(lk, bn1), triton.cdiv(lq, bm2)), b * h)
    launch(
        "masked_attention_bwd", _attn_bwd_kernel, grid,
        q, k, v, keep, grad_out, lse, delta, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *keep.stride(), *grad_out.stride(),
        h, lq, lk,
        SCALE=d ** 0.5, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2, IS_FP64=is_fp64,
        DOT_PREC=_dot_precision(q.dtype, target), UPCAST=_upcast_dots(q.dtype, target),
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_keep = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_keep, out, lse)


def _backward(ctx, grad_out, grad_lse):
    # grad_lse is ignored: the logsumexp is an internal output that the public function never returns.
    q, k, v, key_keep, out, lse = ctx.saved_tensors
    dq, dk, dv = masked_attention_bwd(grad_out, q, k, v, key_keep, out, lse)
    return dq, dk, dv, None


masked_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), keys where not key_keep set to -1e9) v; same as reference.masked_attention.

    q, k, v (B, heads, L, D) of one float dtype (any strides); key_keep (B, L) bool. Under autocast
    q, k, v are cast to its dtype first, as the reference's matmuls are (the result has that dtype).
    """
    device = q.device.type
    if torch.is_autocast_enabled(device) and q.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return masked_attention_fwd(q, k, v, key_keep)[0]
