"""The bank-update glue of LFPV in Triton: sampling, the updaters' inputs, the batch-mean LayerNorm.

Ops (registered under the `lfpv` namespace, each with a Triton backward), with the signatures of
their twins in `lfpv_fast.ops.reference`:

- gather_samples: the sampled C-vector and p x p window of every image, one launch for both. The
  positions are device tensors read in-kernel (no host sync). Out-of-range positions read zeros
  (the reference raises; the model validates host-side draws before calling).
- sample_updater_inputs: rows n*B + b = [bank entry n, sample b, embedding n] for both branches,
  one launch. `sample_updater_inputs_from_features` fuses gather_samples into the same launch.
- mutual_updater_inputs: [entry i, partner, embedding i, partner's embedding] for both branches, one
  launch, keeping the published quirk (the patch branch uses the VECTOR partner's embedding).
- batch_mean_layer_norm: mean over the batch and LayerNorm in one launch; with `all_reduce_mean`,
  a mean launch, the caller's all-reduce, then a LayerNorm launch.

No matrix products (the updaters' MLPs are torch Linear layers, cuBLAS under autocast), so no dot
precision to choose: in bf16 training each result is accumulated in float32 and rounded once.
These are memory-bound copies and small reductions: every program owns whole output rows, so each
output element is written exactly once and backward sums run in a fixed order (no atomics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lfpv_fast.kernels._common import launch, new_output
from lfpv_fast.kernels.query_fusion import sum_rows

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _sample_offsets(vpos_ptr, ppos_ptr, b, H, W, C: tl.constexpr, P: tl.constexpr,
                    BC: tl.constexpr, BPP: tl.constexpr):
    """Offsets into features (B,C,H,W) of image b's sampled vector (BC,) and window (BC, BPP), and masks."""
    vh = tl.load(vpos_ptr)
    vw = tl.load(vpos_ptr + 1)
    ph = tl.load(ppos_ptr)
    pw = tl.load(ppos_ptr + 1)
    c = tl.arange(0, BC)
    pp = tl.arange(0, BPP)
    image = b.to(tl.int64) * C * H * W + c.to(tl.int64) * H * W
    # Bounds-checked: a position outside the map reads zeros instead of faulting. (Compared as
    # vectors: a scalar bool `&` a tensor mask comes out int32 under the interpreter.)
    vhs = tl.zeros((BC,), tl.int64) + vh
    vws = tl.zeros((BC,), tl.int64) + vw
    v_mask = (c < C) & (vhs >= 0) & (vhs < H) & (vws >= 0) & (vws < W)
    v_offs = image + vh * W + vw
    rows = ph + pp // P
    cols = pw + pp % P
    p_in = (pp < P * P) & (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    p_mask = (c < C)[:, None] & p_in[None, :]
    p_offs = image[:, None] + rows[None, :] * W + cols[None, :]
    return v_offs, v_mask, p_offs, p_mask


@triton.jit
def _gather_kernel(x_ptr, vpos_ptr, ppos_ptr, vec_ptr, patch_ptr, H, W,
                   C: tl.constexpr, P: tl.constexpr, BC: tl.constexpr, BPP: tl.constexpr):
    b = tl.program_id(0)
    v_offs, v_mask, p_offs, p_mask = _sample_offsets(vpos_ptr, ppos_ptr, b, H, W, C, P, BC, BPP)
    c = tl.arange(0, BC)
    pp = tl.arange(0, BPP)
    out_ok = (c[:, None] < C) & (pp[None, :] < P * P)
    tl.store(vec_ptr + b * C + c, tl.load(x_ptr + v_offs, mask=v_mask, other=0.0), mask=c < C)
    tl.store(patch_ptr + b * C * P * P + c[:, None] * P * P + pp[None, :],
             tl.load(x_ptr + p_offs, mask=p_mask, other=0.0), mask=out_ok)


@triton.jit
def _gather_bwd_kernel(gvec_ptr, gpatch_ptr, vpos_ptr, ppos_ptr, dx_ptr, H, W,
                       C: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    """Dense d features: the vector grad at the sampled pixel plus the window grad inside the window,
    zero elsewhere. Every element of (B,C,H,W) is written once (no memset + scatter)."""
    bc = tl.program_id(0)  # b * C + c
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = hw < H * W
    h = hw // W
    w = hw % W
    vh = tl.load(vpos_ptr)
    vw = tl.load(vpos_ptr + 1)
    ph = tl.load(ppos_ptr)
    pw = tl.load(ppos_ptr + 1)
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    gv = tl.load(gvec_ptr + bc).to(acc_ty)
    at_vector = (h == vh) & (w == vw)
    in_window = (h >= ph) & (h < ph + P) & (w >= pw) & (w < pw + P) & ok
    gp = tl.load(gpatch_ptr + bc * P * P + (h - ph) * P + (w - pw), mask=in_window, other=0.0).to(acc_ty)
    dx = tl.where(at_vector, gv, 0.0) + gp
    tl.store(dx_ptr + bc.to(tl.int64) * H * W + hw, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["B"])
def _sample_inputs_kernel(bv_ptr, bp_ptr, sv_ptr, sp_ptr, emb_ptr, x_ptr, vpos_ptr, ppos_ptr, vin_ptr, pin_ptr,
                          B, H, W, C: tl.constexpr, P: tl.constexpr, BC: tl.constexpr, BPP: tl.constexpr,
                          FROM_FEATURES: tl.constexpr):
    """Row n*B + b of both updaters' inputs; FROM_FEATURES gathers image b's samples from x itself."""
    row = tl.program_id(0)
    n = row // B
    b = row % B
    PP: tl.constexpr = P * P
    c = tl.arange(0, BC)
    pp = tl.arange(0, BPP)
    c_ok = c < C
    cp_ok = c_ok[:, None] & (pp[None, :] < PP)
    cp = c[:, None] * PP + pp[None, :]
    if FROM_FEATURES:
        v_offs, v_mask, p_offs, p_mask = _sample_offsets(vpos_ptr, ppos_ptr, b, H, W, C, P, BC, BPP)
        sv = tl.load(x_ptr + v_offs, mask=v_mask, other=0.0)
        sp = tl.load(x_ptr + p_offs, mask=p_mask, other=0.0)
    else:
        sv = tl.load(sv_ptr + b * C + c, mask=c_ok, other=0.0)
        sp = tl.load(sp_ptr + b * C * PP + cp, mask=cp_ok, other=0.0)
    e = tl.load(emb_ptr + n * C + c, mask=c_ok, other=0.0)

    vin = vin_ptr + row.to(tl.int64) * 3 * C
    vty = vin_ptr.dtype.element_ty
    tl.store(vin + c, tl.load(bv_ptr + n * C + c, mask=c_ok).to(vty), mask=c_ok)
    tl.store(vin + C + c, sv.to(vty), mask=c_ok)
    tl.store(vin + 2 * C + c, e.to(vty), mask=c_ok)

    pin = pin_ptr + row.to(tl.int64) * 3 * C * PP
    pty = pin_ptr.dtype.element_ty
    tl.store(pin + cp, tl.load(bp_ptr + n * C * PP + cp, mask=cp_ok).to(pty), mask=cp_ok)
    tl.store(pin + C * PP + cp, sp.to(pty), mask=cp_ok)
    tl.store(pin + 2 * C * PP + cp, (e[:, None] + tl.zeros((BC, BPP), e.dtype)).to(pty), mask=cp_ok)


@triton.jit(do_not_specialize=["N", "B"])
def _sample_inputs_bwd_kernel(dvin_ptr, dpin_ptr, dbv_ptr, dbp_ptr, demb_ptr, dsv_ptr, dsp_ptr, N, B,
                              C: tl.constexpr, P: tl.constexpr, BC: tl.constexpr, BPP: tl.constexpr,
                              ACC_FP64: tl.constexpr):
    """Programs 0..N-1: sums over the batch (bank entry n, embedding n); N..N+B-1: over the bank (sample b)."""
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    PP: tl.constexpr = P * P
    c = tl.arange(0, BC)
    pp = tl.arange(0, BPP)
    c_ok = c < C
    cp_ok = c_ok[:, None] & (pp[None, :] < PP)
    cp = c[:, None] * PP + pp[None, :]
    if pid < N:
        n = pid
        g_bv = tl.zeros((BC,), acc_ty)
        g_ev = tl.zeros((BC,), acc_ty)
        g_bp = tl.zeros((BC, BPP), acc_ty)
        g_ep = tl.zeros((BC, BPP), acc_ty)
        for b in range(B):
            row = n * B + b
            vin = dvin_ptr + row.to(tl.int64) * 3 * C
            pin = dpin_ptr + row.to(tl.int64) * 3 * C * PP
            g_bv += tl.load(vin + c, mask=c_ok, other=0.0).to(acc_ty)
            g_ev += tl.load(vin + 2 * C + c, mask=c_ok, other=0.0).to(acc_ty)
            g_bp += tl.load(pin + cp, mask=cp_ok, other=0.0).to(acc_ty)
            g_ep += tl.load(pin + 2 * C * PP + cp, mask=cp_ok, other=0.0).to(acc_ty)
        tl.store(dbv_ptr + n * C + c, g_bv.to(dbv_ptr.dtype.element_ty), mask=c_ok)
        tl.store(dbp_ptr + n * C * PP + cp, g_bp.to(dbp_ptr.dtype.element_ty), mask=cp_ok)
        tl.store(demb_ptr + n * C + c, (g_ev + tl.sum(g_ep, axis=1)).to(demb_ptr.dtype.element_ty), mask=c_ok)
    else:
        b = pid - N
        g_sv = tl.zeros((BC,), acc_ty)
        g_sp = tl.zeros((BC, BPP), acc_ty)
        for n in range(N):
            row = n * B + b
            g_sv += tl.load(dvin_ptr + row.to(tl.int64) * 3 * C + C + c, mask=c_ok, other=0.0).to(acc_ty)
            g_sp += tl.load(dpin_ptr + row.to(tl.int64) * 3 * C * PP + C * PP + cp, mask=cp_ok,
                            other=0.0).to(acc_ty)
        tl.store(dsv_ptr + b * C + c, g_sv.to(dsv_ptr.dtype.element_ty), mask=c_ok)
        tl.store(dsp_ptr + b * C * PP + cp, g_sp.to(dsp_ptr.dtype.element_ty), mask=cp_ok)


@triton.jit
def _mutual_inputs_kernel(bv_ptr, bp_ptr, vpart_ptr, ppart_ptr, emb_ptr, vin_ptr, pin_ptr,
                          C: tl.constexpr, P: tl.constexpr, BC: tl.constexpr, BPP: tl.constexpr):
    i = tl.program_id(0)
    PP: tl.constexpr = P * P
    vj = tl.load(vpart_ptr + i)
    pj = tl.load(ppart_ptr + i)
    c = tl.arange(0, BC)
    pp = tl.arange(0, BPP)
    c_ok = c < C
    cp_ok = c_ok[:, None] & (pp[None, :] < PP)
    cp = c[:, None] * PP + pp[None, :]
    e_self = tl.load(emb_ptr + i * C + c, mask=c_ok)
    e_partner = tl.load(emb_ptr + vj * C + c, mask=c_ok)  # the vector partner's, for both branches

    vin = vin_ptr + i.to(tl.int64) * 4 * C
    vty = vin_ptr.dtype.element_ty
    tl.store(vin + c, tl.load(bv_ptr + i * C + c, mask=c_ok).to(vty), mask=c_ok)
    tl.store(vin + C + c, tl.load(bv_ptr + vj * C + c, mask=c_ok).to(vty), mask=c_ok)
    tl.store(vin + 2 * C + c, e_self.to(vty), mask=c_ok)
    tl.store(vin + 3 * C + c, e_partner.to(vty), mask=c_ok)

    pin = pin_ptr + i.to(tl.int64) * 4 * C * PP
    pty = pin_ptr.dtype.element_ty
    zeros = tl.zeros((BC, BPP), e_self.dtype)
    tl.store(pin + cp, tl.load(bp_ptr + i * C * PP + cp, mask=cp_ok).to(pty), mask=cp_ok)
    tl.store(pin + C * PP + cp, tl.load(bp_ptr + pj * C * PP + cp, mask=cp_ok).to(pty), mask=cp_ok)
    tl.store(pin + 2 * C * PP + cp, (e_self[:, None] + zeros).to(pty), mask=cp_ok)
    tl.store(pin + 3 * C * PP + cp, (e_partner[:, None] + zeros).to(pty), mask=cp_ok)


@triton.jit
def _mutual_inputs_bwd_kernel(dvin_ptr, dpin_ptr, vpart_ptr, ppart_ptr, dbv_ptr, dbp_ptr, demb_ptr, N,
                              C: tl.constexpr, P: tl.constexpr, BC: tl.constexpr, BPP: tl.constexpr,
                              ACC_FP64: tl.constexpr):
    """Program j gathers every gradient that flows to entry j: its own slots, plus the partner slots of
    every row i whose partner is j (a fixed-order loop over i instead of atomics)."""
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    j = tl.program_id(0)
    PP: tl.constexpr = P * P
    c = tl.arange(0, BC)
    pp = tl.arange(0, BPP)
    c_ok = c < C
    cp_ok = c_ok[:, None] & (pp[None, :] < PP)
    cp = c[:, None] * PP + pp[None, :]
    vin_j = dvin_ptr + j.to(tl.int64) * 4 * C
    pin_j = dpin_ptr + j.to(tl.int64) * 4 * C * PP
    g_bv = tl.load(vin_j + c, mask=c_ok, other=0.0).to(acc_ty)
    g_e = tl.load(vin_j + 2 * C + c, mask=c_ok, other=0.0).to(acc_ty)
    g_bp = tl.load(pin_j + cp, mask=cp_ok, other=0.0).to(acc_ty)
    g_ep = tl.load(pin_j + 2 * C * PP + cp, mask=cp_ok, other=0.0).to(acc_ty)
    for i in range(N):
        vi = tl.load(vpart_ptr + i)
        pi = tl.load(ppart_ptr + i)
        # Masked loads: rows whose partner is not j cost no memory traffic.
        v_take = c_ok & (tl.zeros((BC,), tl.int64) + vi == j)
        vp_take = cp_ok & (tl.zeros((BC, BPP), tl.int64) + vi == j)
        p_take = cp_ok & (tl.zeros((BC, BPP), tl.int64) + pi == j)
        vin_i = dvin_ptr + i * 4 * C
        pin_i = dpin_ptr + i * 4 * C * PP
        g_bv += tl.load(vin_i + C + c, mask=v_take, other=0.0).to(acc_ty)
        g_e += tl.load(vin_i + 3 * C + c, mask=v_take, other=0.0).to(acc_ty)
        g_ep += tl.load(pin_i + 3 * C * PP + cp, mask=vp_take, other=0.0).to(acc_ty)
        g_bp += tl.load(pin_i + C * PP + cp, mask=p_take, other=0.0).to(acc_ty)
    tl.store(dbv_ptr + j * C + c, g_bv.to(dbv_ptr.dtype.element_ty), mask=c_ok)
    tl.store(dbp_ptr + j * C * PP + cp, g_bp.to(dbp_ptr.dtype.element_ty), mask=cp_ok)
    tl.store(demb_ptr + j * C + c, (g_e + tl.sum(g_ep, axis=1)).to(demb_ptr.dtype.element_ty), mask=c_ok)


@triton.jit(do_not_specialize=["B"])
def _mean_norm_fwd_kernel(u_ptr, w_ptr, b_ptr, out_ptr, B, S, BS: tl.constexpr, EPS: tl.constexpr,
                          MEAN: tl.constexpr, NORM: tl.constexpr, ACC_FP64: tl.constexpr):
    """Row n of out: mean over b of u[n*B + b] (MEAN), then LayerNorm over its S values (NORM)."""
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    n = tl.program_id(0)
    s = tl.arange(0, BS)
    ok = s < S
    if MEAN:
        x = tl.zeros((BS,), acc_ty)
        for b in range(B):
            x += tl.load(u_ptr + (n * B + b).to(tl.int64) * S + s, mask=ok, other=0.0).to(acc_ty)
        x = x / B
    else:
        x = tl.load(u_ptr + n.to(tl.int64) * S + s, mask=ok, other=0.0).to(acc_ty)
    if NORM:
        mean = tl.sum(x, axis=0) / S
        diff = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / S + tl.full([], EPS, acc_ty))
        w = tl.load(w_ptr + s, mask=ok, other=0.0).to(acc_ty)
        bias = tl.load(b_ptr + s, mask=ok, other=0.0).to(acc_ty)
        x = diff * rstd * w + bias
    tl.store(out_ptr + n.to(tl.int64) * S + s, x.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["B"])
def _mean_norm_bwd_kernel(dy_ptr, u_ptr, w_ptr, du_ptr, part_ptr, B, S, BS: tl.constexpr, EPS: tl.constexpr,
                          MEAN: tl.constexpr, NORM: tl.constexpr, ACC_FP64: tl.constexpr):
    """Backward of _mean_norm_fwd_kernel for row n: d u rows, and (NORM) the row's partial dw | db."""
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    n = tl.program_id(0)
    s = tl.arange(0, BS)
    ok = s < S
    dx = tl.load(dy_ptr + n.to(tl.int64) * S + s, mask=ok, other=0.0).to(acc_ty)
    if NORM:
        dy = dx
        if MEAN:  # recompute the mean (cheaper than storing it)
            x = tl.zeros((BS,), acc_ty)
            for b in range(B):
                x += tl.load(u_ptr + (n * B + b).to(tl.int64) * S + s, mask=ok, other=0.0).to(acc_ty)
            x = x / B
        else:
            x = tl.load(u_ptr + n.to(tl.int64) * S + s, mask=ok, other=0.0).to(acc_ty)
        mean = tl.sum(x, axis=0) / S
        diff = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / S + tl.full([], EPS, acc_ty))
        xhat = diff * rstd
        w = tl.load(w_ptr + s, mask=ok, other=0.0).to(acc_ty)
        dxhat = dy * w
        m1 = tl.sum(dxhat, axis=0) / S
        m2 = tl.sum(dxhat * xhat, axis=0) / S
        dx = tl.where(ok, (dxhat - m1 - xhat * m2) * rstd, 0.0)
        part = part_ptr + n.to(tl.int64) * 2 * S
        tl.store(part + s, dy * xhat, mask=ok)
        tl.store(part + S + s, dy, mask=ok)
    if MEAN:
        dx = dx / B
        for b in range(B):
            tl.store(du_ptr + (n * B + b).to(tl.int64) * S + s, dx.to(du_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(du_ptr + n.to(tl.int64) * S + s, dx.to(du_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Helpers


def _blocks(c: int, p: int) -> dict:
    return dict(C=c, P=p, BC=triton.next_power_of_2(c), BPP=triton.next_power_of_2(p * p))


def _is_fp64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


def _layer_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.layer_norm returns for x here, which the reference's LayerNorm gives: CUDA autocast
    runs layer_norm in float32; CPU autocast leaves it to its input's dtype (torch's autocast op lists)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return x.dtype


def _positions(pos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(h, w) as a contiguous int64 tensor on the features' device (a no-op when it already is)."""
    return pos.to(device=device, dtype=torch.int64).contiguous()


# ---------------------------------------------------------------------------------------------
# gather_samples


@triton_op("lfpv::gather_samples", mutates_args=())
def _gather_samples_op(features: torch.Tensor, vector_pos: torch.Tensor, patch_pos: torch.Tensor,
                       patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w = features.shape
    p = patch_size
    vectors = new_output((b, c), features.dtype, features.device)
    patches = new_output((b, c, p, p), features.dtype, features.device)
    launch("gather_samples", _gather_kernel, (b,),
           features, vector_pos, patch_pos, vectors, patches, h, w, **_blocks(c, p))
    return vectors, patches


@triton_op("lfpv::gather_samples_backward", mutates_args=())
def _gather_samples_backward_op(grad_vectors: torch.Tensor, grad_patches: torch.Tensor, vector_pos: torch.Tensor,
                                patch_pos: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    c, p = grad_vectors.shape[1], grad_patches.shape[-1]
    grad = new_output((b, c, h, w), grad_vectors.dtype, grad_vectors.device)
    block = min(1024, triton.next_power_of_2(h * w))
    launch("gather_samples_bwd", _gather_bwd_kernel, (b * c, triton.cdiv(h * w, block)),
           grad_vectors, grad_patches, vector_pos, patch_pos, grad, h, w, C=c, P=p, BLOCK=block,
           ACC_FP64=_is_fp64(grad_vectors))
    return grad


def _gather_setup(ctx, inputs, output) -> None:
    features, vector_pos, patch_pos, _ = inputs
    ctx.save_for_backward(vector_pos, patch_pos)
    ctx.shape = features.shape


def _gather_backward(ctx, grad_vectors: torch.Tensor, grad_patches: torch.Tensor):
    vector_pos, patch_pos = ctx.saved_tensors
    b, _, h, w = ctx.shape
    grad = _gather_samples_backward_op(grad_vectors.contiguous(), grad_patches.contiguous(), vector_pos, patch_pos,
                                       b, h, w)
    return grad, None, None, None


_gather_samples_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_samples(
    features: torch.Tensor, vector_pos: torch.Tensor, patch_pos: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled C-vector (B,C) at vector_pos=(h,w) and the p x p window (B,C,p,p) at patch_pos."""
    device = features.device
    return _gather_samples_op(features.contiguous(), _positions(vector_pos, device), _positions(patch_pos, device),
                              int(patch_size))


# ---------------------------------------------------------------------------------------------
# sample_updater_inputs (and the fused gather + inputs)


def _sample_inputs_launch(bank_vectors: torch.Tensor, bank_patches: torch.Tensor, embedding: torch.Tensor,
                          batch: int, samples: tuple[torch.Tensor, torch.Tensor] | None,
                          source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = bank_vectors.shape
    p = bank_patches.shape[-1]
    device = bank_vectors.device
    # The dtypes torch.cat gives the reference (type promotion; autocast's "promote" rule is the same).
    sample_dtype = (samples[0] if samples is not None else source[0]).dtype
    vector_in = new_output((n * batch, 3 * c, 1, 1), _promote(bank_vectors.dtype, sample_dtype, embedding.dtype),
                           device)
    patch_in = new_output((n * batch, 3 * c, p, p), _promote(bank_patches.dtype, sample_dtype, embedding.dtype),
                          device)
    if samples is not None:
        sv, sp = samples
        x, vpos, ppos, h, w = sv, sv, sv, 1, 1  # unused by FROM_FEATURES=False
    else:
        x, vpos, ppos = source
        sv = sp = x
        h, w = x.shape[-2:]
    launch("sample_updater_inputs", _sample_inputs_kernel, (n * batch,),
           bank_vectors, bank_patches, sv, sp, embedding, x, vpos, ppos, vector_in, patch_in, batch, h, w,
           FROM_FEATURES=samples is None, **_blocks(c, p))
    return vector_in, patch_in


@triton_op("lfpv::sample_updater_inputs", mutates_args=())
def _sample_inputs_op(bank_vectors: torch.Tensor, bank_patches: torch.Tensor, sample_vectors: torch.Tensor,
                      sample_patches: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _sample_inputs_launch(bank_vectors, bank_patches, embedding, sample_vectors.shape[0],
                                 (sample_vectors, sample_patches), None)


@triton_op("lfpv::sample_updater_inputs_from_features", mutates_args=())
def _sample_inputs_from_features_op(features: torch.Tensor, vector_pos: torch.Tensor, patch_pos: torch.Tensor,
                                    bank_vectors: torch.Tensor, bank_patches: torch.Tensor,
                                    embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _sample_inputs_launch(bank_vectors, bank_patches, embedding, features.shape[0], None,
                                 (features, vector_pos, patch_pos))


@triton_op("lfpv::sample_updater_inputs_backward", mutates_args=())
def _sample_inputs_backward_op(grad_vector_in: torch.Tensor, grad_patch_in: torch.Tensor, n: int, c: int, p: int,
                               vector_dtype: torch.dtype, patch_dtype: torch.dtype, embedding_dtype: torch.dtype,
                               sample_dtype: torch.dtype, batch: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (bank_vectors, bank_patches, sample_vectors, sample_patches, embedding).

    Takes only shapes and dtypes: the inputs are copied, so their values are not needed, and not
    saving them lets the model overwrite its bank buffers in place after the forward.
    """
    device = grad_vector_in.device
    g_bv = new_output((n, c), vector_dtype, device)
    g_bp = new_output((n, c, p, p), patch_dtype, device)
    g_sv = new_output((batch, c), sample_dtype, device)
    g_sp = new_output((batch, c, p, p), sample_dtype, device)
    g_emb = new_output((n, c), embedding_dtype, device)
    launch("sample_updater_inputs_bwd", _sample_inputs_bwd_kernel, (n + batch,),
           grad_vector_in, grad_patch_in, g_bv, g_bp, g_emb, g_sv, g_sp, n, batch,
           ACC_FP64=_is_fp64(grad_vector_in, grad_patch_in), **_blocks(c, p))
    return g_bv, g_bp, g_sv, g_sp, g_emb


def _sample_inputs_setup(ctx, inputs, output) -> None:
    bank_vectors, bank_patches, sample_vectors, _, embedding = inputs
    ctx.meta = _bank_meta(bank_vectors, bank_patches, embedding)
    ctx.sample_dtype = sample_vectors.dtype
    ctx.batch = sample_vectors.shape[0]


def _bank_meta(bank_vectors: torch.Tensor, bank_patches: torch.Tensor, embedding: torch.Tensor) -> tuple:
    n, c = bank_vectors.shape
    return n, c, bank_patches.shape[-1], bank_vectors.dtype, bank_patches.dtype, embedding.dtype


def _sample_inputs_backward(ctx, grad_vector_in: torch.Tensor, grad_patch_in: torch.Tensor):
    g_bv, g_bp, g_sv, g_sp, g_emb = _sample_inputs_backward_op(
        grad_vector_in.contiguous(), grad_patch_in.contiguous(), *ctx.meta, ctx.sample_dtype, ctx.batch)
    return g_bv, g_bp, g_sv, g_sp, g_emb


_sample_inputs_op.register_autograd(_sample_inputs_backward, setup_context=_sample_inputs_setup)


def _from_features_setup(ctx, inputs, output) -> None:
    features, vector_pos, patch_pos, bank_vectors, bank_patches, embedding = inputs
    ctx.save_for_backward(vector_pos, patch_pos)
    ctx.meta = _bank_meta(bank_vectors, bank_patches, embedding)
    ctx.shape = features.shape
    ctx.dtype = features.dtype


def _from_features_backward(ctx, grad_vector_in: torch.Tensor, grad_patch_in: torch.Tensor):
    vector_pos, patch_pos = ctx.saved_tensors
    b, _, h, w = ctx.shape
    g_bv, g_bp, g_sv, g_sp, g_emb = _sample_inputs_backward_op(
        grad_vector_in.contiguous(), grad_patch_in.contiguous(), *ctx.meta, ctx.dtype, b)
    g_features = _gather_samples_backward_op(g_sv, g_sp, vector_pos, patch_pos, b, h, w)
    return g_features, None, None, g_bv, g_bp, g_emb


_sample_inputs_from_features_op.register_autograd(_from_features_backward, setup_context=_from_features_setup)


def sample_updater_inputs(
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    sample_vectors: torch.Tensor,
    sample_patches: torch.Tensor,
    embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows n*B + b = [bank entry n, sample of image b, embedding n]: (N*B,3C,1,1) and (N*B,3C,p,p)."""
    return _sample_inputs_op(bank_vectors.contiguous(), bank_patches.contiguous(), sample_vectors.contiguous(),
                             sample_patches.contiguous(), embedding.contiguous())


def sample_updater_inputs_from_features(
    features: torch.Tensor,
    vector_pos: torch.Tensor,
    patch_pos: torch.Tensor,
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_updater_inputs(banks, *gather_samples(features, vector_pos, patch_pos, p), embedding)` in
    one launch (p is the bank patches' size); the samples never touch memory."""
    device = features.device
    return _sample_inputs_from_features_op(
        features.contiguous(), _positions(vector_pos, device), _positions(patch_pos, device),
        bank_vectors.contiguous(), bank_patches.contiguous(), embedding.contiguous())


# ---------------------------------------------------------------------------------------------
# mutual_updater_inputs


@triton_op("lfpv::mutual_updater_inputs", mutates_args=())
def _mutual_inputs_op(bank_vectors: torch.Tensor, bank_patches: torch.Tensor, vector_partner: torch.Tensor,
                      patch_partner: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = bank_vectors.shape
    p = bank_patches.shape[-1]
    device = bank_vectors.device
    vector_in = new_output((n, 4 * c, 1, 1), _promote(bank_vectors.dtype, embedding.dtype), device)
    patch_in = new_output((n, 4 * c, p, p), _promote(bank_patches.dtype, embedding.dtype), device)
    launch("mutual_updater_inputs", _mutual_inputs_kernel, (n,),
           bank_vectors, bank_patches, vector_partner, patch_partner, embedding, vector_in, patch_in, **_blocks(c, p))
    return vector_in, patch_in


@triton_op("lfpv::mutual_updater_inputs_backward", mutates_args=())
def _mutual_inputs_backward_op(grad_vector_in: torch.Tensor, grad_patch_in: torch.Tensor, vector_partner: torch.Tensor,
                               patch_partner: torch.Tensor, bank_vectors: torch.Tensor, bank_patches: torch.Tensor,
                               embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (bank_vectors, bank_patches, embedding)."""
    n, c = bank_vectors.shape
    p = bank_patches.shape[-1]
    device = grad_vector_in.device
    g_bv = new_output(bank_vectors.shape, bank_vectors.dtype, device)
    g_bp = new_output(bank_patches.shape, bank_patches.dtype, device)
    g_emb = new_output(embedding.shape, embedding.dtype, device)
    launch("mutual_updater_inputs_bwd", _mutual_inputs_bwd_kernel, (n,),
           grad_vector_in, grad_patch_in, vector_partner, patch_partner, g_bv, g_bp, g_emb, n,
           ACC_FP64=_is_fp64(grad_vector_in, grad_patch_in), **_blocks(c, p))
    return g_bv, g_bp, g_emb


def _mutual_setup(ctx, inputs, output) -> None:
    bank_vectors, bank_patches, vector_partner, patch_partner, embedding = inputs
    ctx.save_for_backward(vector_partner, patch_partner, bank_vectors, bank_patches, embedding)


def _mutual_backward(ctx, grad_vector_in: torch.Tensor, grad_patch_in: torch.Tensor):
    g_bv, g_bp, g_emb = _mutual_inputs_backward_op(grad_vector_in.contiguous(), grad_patch_in.contiguous(),
                                                   *ctx.saved_tensors)
    return g_bv, g_bp, None, None, g_emb


_mutual_inputs_op.register_autograd(_mutual_backward, setup_context=_mutual_setup)


def mutual_updater_inputs(
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    vector_partner: torch.Tensor,
    patch_partner: torch.Tensor,
    embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[entry i, partner entry, embedding i, VECTOR partner's embedding]: (N,4C,1,1) and (N,4C,p,p)."""
    device = bank_vectors.device
    return _mutual_inputs_op(bank_vectors.contiguous(), bank_patches.contiguous(),
                             _positions(vector_partner, device), _positions(patch_partner, device),
                             embedding.contiguous())


# ---------------------------------------------------------------------------------------------
# batch mean and LayerNorm


def _mean_norm_forward(updates: torch.Tensor, batch: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                       mean: bool, norm: bool, shape: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    rows = updates.shape[0] // batch if mean else updates.shape[0]
    s = updates[0].numel()
    out = new_output((rows, *shape), out_dtype, updates.device)
    name = "batch_mean_layer_norm" if mean and norm else "batch_mean" if mean else "bank_layer_norm"
    launch(name, _mean_norm_fwd_kernel, (rows,),
           updates, weight, bias, out, batch, s, BS=triton.next_power_of_2(s), EPS=eps, MEAN=mean, NORM=norm,
           ACC_FP64=_is_fp64(updates))
    return out


def _mean_norm_backward(grad: torch.Tensor, updates: torch.Tensor, batch: int, weight: torch.Tensor,
                        bias: torch.Tensor, eps: float, *, mean: bool, norm: bool,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = grad.shape[0]
    s = updates[0].numel()
    device = updates.device
    acc = torch.float64 if _is_fp64(updates) else torch.float32
    g_updates = new_output(updates.shape, updates.dtype, device)
    partials = new_output((rows, 2 * s) if norm else (1, 1), acc, device)
    name = "batch_mean_layer_norm" if mean and norm else "batch_mean" if mean else "bank_layer_norm"
    launch(name + "_bwd", _mean_norm_bwd_kernel, (rows,),
           grad, updates, weight, g_updates, partials, batch, s, BS=triton.next_power_of_2(s), EPS=eps, MEAN=mean,
           NORM=norm, ACC_FP64=acc == torch.float64)
    g_w = new_output(weight.shape, weight.dtype, device)
    g_b = new_output(bias.shape, bias.dtype, device)
    if norm:
        sum_rows(partials, [g_w, g_b])
    return g_updates, g_w, g_b


@triton_op("lfpv::batch_mean_layer_norm", mutates_args=())
def _batch_mean_layer_norm_op(updates: torch.Tensor, batch: int, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return _mean_norm_forward(updates, batch, weight, bias, eps, mean=True, norm=True, shape=tuple(weight.shape),
                              out_dtype=out_dtype)


@triton_op("lfpv::batch_mean_layer_norm_backward", mutates_args=())
def _batch_mean_layer_norm_backward_op(grad: torch.Tensor, updates: torch.Tensor, batch: int, weight: torch.Tensor,
                                       bias: torch.Tensor, eps: float
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mean_norm_backward(grad, updates, batch, weight, bias, eps, mean=True, norm=True)


def _bmln_setup(ctx, inputs, output) -> None:
    updates, batch, weight, bias, eps, _ = inputs
    ctx.save_for_backward(updates, weight, bias)
    ctx.batch, ctx.eps = batch, eps


def _bmln_backward(ctx, grad: torch.Tensor):
    updates, weight, bias = ctx.saved_tensors
    g_u, g_w, g_b = _batch_mean_layer_norm_backward_op(grad.contiguous(), updates, ctx.batch, weight, bias, ctx.eps)
    return g_u, None, g_w, g_b, None, None


_batch_mean_layer_norm_op.register_autograd(_bmln_backward, setup_context=_bmln_setup)


@triton_op("lfpv::batch_mean", mutates_args=())
def _batch_mean_op(updates: torch.Tensor, batch: int) -> torch.Tensor:
    """The batch mean in the accumulator dtype: no 16-bit rounding between the mean and the LayerNorm."""
    acc = torch.float64 if _is_fp64(updates) else torch.float32
    return _mean_norm_forward(updates, batch, updates, updates, 0.0, mean=True, norm=False,
                              shape=tuple(updates.shape[1:]), out_dtype=acc)


@triton_op("lfpv::batch_mean_backward", mutates_args=())
def _batch_mean_backward_op(grad: torch.Tensor, updates: torch.Tensor, batch: int) -> torch.Tensor:
    # weight/bias are unused without NORM; any tensor of the right device fills their slots.
    dummy = updates.new_empty(0)
    g_u, _, _ = _mean_norm_backward(grad, updates, batch, dummy, dummy, 0.0, mean=True, norm=False)
    return g_u


def _mean_setup(ctx, inputs, output) -> None:
    updates, batch = inputs
    ctx.save_for_backward(updates)
    ctx.batch = batch


def _mean_backward(ctx, grad: torch.Tensor):
    (updates,) = ctx.saved_tensors
    return _batch_mean_backward_op(grad.contiguous(), updates, ctx.batch), None


_batch_mean_op.register_autograd(_mean_backward, setup_context=_mean_setup)


@triton_op("lfpv::bank_layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    return _mean_norm_forward(x, 1, weight, bias, eps, mean=False, norm=True, shape=tuple(weight.shape),
                              out_dtype=out_dtype)


@triton_op("lfpv::bank_layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mean_norm_backward(grad, x, 1, weight, bias, eps, mean=False, norm=True)


def _ln_setup(ctx, inputs, output) -> None:
    x, weight, bias, eps, _ = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _ln_backward(ctx, grad: torch.Tensor):
    x, weight, bias = ctx.saved_tensors
    g_x, g_w, g_b = _layer_norm_backward_op(grad.contiguous(), x, weight, bias, ctx.eps)
    return g_x, g_w, g_b, None, None


_layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup)


def batch_mean_layer_norm(
    updates: torch.Tensor,
    batch: int,
    norm: tuple[torch.Tensor, torch.Tensor],
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Mean over the batch of each entry's updates (rows n*B + b), then LayerNorm over `norm`'s shape.

    One launch; with `all_reduce_mean` (DDP) the mean is materialised, averaged over ranks by the
    caller's function, then normalised (two launches around the all-reduce). The mean handed to
    `all_reduce_mean` is in the accumulator dtype (float32 for 16-bit updates, where the reference
    rounds it to the updates' dtype). The result has the dtype the reference's LayerNorm gives: the
    updates' dtype, or float32 under CUDA autocast.
    """
    weight, bias = norm
    if updates.shape[0] % batch or updates[0].numel() != weight.numel():
        raise ValueError(f"batch_mean_layer_norm: updates {tuple(updates.shape)} do not split into rows of "
                         f"{batch} images normalised over {tuple(weight.shape)}")
    updates = updates.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    out_dtype = _layer_norm_dtype(updates)
    if all_reduce_mean is None:
        return _batch_mean_layer_norm_op(updates, int(batch), weight, bias, float(eps), out_dtype)
    mean = all_reduce_mean(_batch_mean_op(updates, int(batch)))
    return _layer_norm_op(mean.contiguous(), weight, bias, float(eps), out_dtype)


__all__ = [
    "batch_mean_layer_norm",
    "gather_samples",
    "mutual_updater_inputs",
    "sample_updater_inputs",
    "sample_updater_inputs_from_features",
]
