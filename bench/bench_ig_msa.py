"""Retinexformer's IG-MSA (channel attention): the fused Triton kernels against the reference twin.

    python bench/bench_ig_msa.py [--quick] [--shapes train,frame] [--dtype fp32|bf16] [--device cpu|cuda] [--out FILE]

Rows, at Retinexformer's three levels (stride 1, 2, 4 of the image: C = 40, 80, 160 channels in 1, 2, 4
heads of 40) for a training batch of 128x128 crops (B=8, N = 128*128 / stride^2) and a 1024x1920 frame
(B=1, N = 1024*1920 / stride^2), forward and forward+backward:
  reference  lfpv_fast.ops.reference.ig_msa: F.normalize of q and k, (d x N) @ (N x d), softmax, A @ (v * I)
  torch_gram the kernels' formulation in eager torch: the raw Gram K Q^T and the squared row norms,
             normalised afterwards on the d x d matrix (no normalised copies of q and k), the same
             softmax and A @ (v * I); torch's autograd for the backward. The cheaper CPU formulation.
  triton     lfpv_fast.kernels.ig_msa (3 launches forward, 3 backward): only where a CUDA device exists.
             The Triton CPU interpreter is for tests; its speed means nothing, so on a CPU the triton rows
             print "skipped".
Every time is the median (min-max) of >= 5 repetitions after warm-up, the implementations interleaved
round by round; "vs reference" is the reference's time over the row's, per round (median, min-max over
rounds). GB/s counts the least traffic the op needs: forward reads q, k, v, I and writes out (5 tensors);
forward+backward adds reading dO, q, k, v, I and writing four gradients (14 tensors in all). The fused
kernels move exactly the forward's 5; their backward reads dO, v and I twice (17 tensors in all).
Writes JSON (default bench/results/<date>-<device>-ig_msa.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import torch

from lfpv_fast.ops import reference

# Retinexformer's levels: (stride, channels, heads), head dim 40.
LEVELS = ((1, 40, 1), (2, 80, 2), (4, 160, 4))
SHAPES = {"train": (8, 128, 128), "frame": (1, 1024, 1920)}  # (batch, height, width)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def torch_gram_ig_msa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, illumination: torch.Tensor,
                      rescale: torch.Tensor, heads: int) -> torch.Tensor:
    """reference.ig_msa in the fused kernels' formulation, in eager torch (the same values up to rounding):
    Kn Qn^T = diag(1/max(|k|, eps)) K Q^T diag(1/max(|q|, eps)), so q and k are read for the Gram and the
    norms only, never normalised pixel by pixel."""
    batch, tokens, channels = q.shape
    d = channels // heads
    qh = q.reshape(batch, tokens, heads, d).transpose(1, 2)  # (B, heads, N, d): views, no copies
    kh = k.reshape(batch, tokens, heads, d).transpose(1, 2)
    gram = kh.transpose(-2, -1) @ qh  # (B, heads, d, d)
    inv_q = 1 / qh.pow(2).sum(dim=-2).sqrt().clamp_min(1e-12)  # (B, heads, d)
    inv_k = 1 / kh.pow(2).sum(dim=-2).sqrt().clamp_min(1e-12)
    cos = gram * inv_k.unsqueeze(-1) * inv_q.unsqueeze(-2)
    attn = (cos * rescale.reshape(1, heads, 1, 1)).softmax(dim=-1)
    vi = (v * illumination).reshape(batch, tokens, heads, d).transpose(1, 2)
    out = vi @ attn.transpose(-2, -1)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


def make_inputs(batch: int, tokens: int, channels: int, heads: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v = rand(batch, tokens, channels), rand(batch, tokens, channels), rand(batch, tokens, channels)
    illumination = rand(batch, tokens, channels).abs() + 0.25
    rescale = torch.ones(heads, 1, 1, device=device)
    grad = rand(batch, tokens, channels)
    return [q, k, v, illumination, rescale], grad


def runner(fn, inputs: list[torch.Tensor], grad: torch.Tensor, heads: int, backward: bool):
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    if not backward:
        def forward():
            with torch.no_grad():
                return fn(*leaves, heads)
        return forward

    def forward_backward():
        torch.autograd.grad(fn(*leaves, heads), leaves, grad)
    return forward_backward


def triton_or_reason(device: torch.device):
    if device.type != "cuda":
        return None, "skipped: no CUDA device (the Triton CPU interpreter is for tests, not timings)"
    try:
        from lfpv_fast.kernels.ig_msa import ig_msa
    except ImportError as exc:
        return None, f"skipped: {exc}"
    return ig_msa, ""


def ratios(base: common.Timing, row: common.Timing) -> dict:
    """base / row per round (rounds are interleaved): median, min, max."""
    per_round = common.Timing([b / r for b, r in zip(base.seconds, row.seconds, strict=True)])
    return per_round.summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions on a GPU (still >= 5)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/<date>-<device>-ig_msa.json)")
    args = parser.parse_args(argv)
    for name in args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"--shapes: unknown shape {name!r}; expected {', '.join(SHAPES)}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    repeats = (10 if args.quick else 30) if on_gpu else common.MIN_REPS
    warmup = 3 if on_gpu else 1
    env = common.environment(device)
    triton_fn, skip_reason = triton_or_reason(device)
    impls = {"reference": reference.ig_msa, "torch_gram": torch_gram_ig_msa}
    if triton_fn is not None:
        impls["triton"] = triton_fn

    print(f"device: {env['device']}  dtype: {args.dtype}  load average {env['loadavg_start'][0]:.1f}"
          + ("" if triton_fn is not None else f"  (triton rows {skip_reason})"))
    header = (f"{'shape':6} {'B':>2} {'N':>8} {'C':>4} {'pass':8} {'impl':11} {'ms: median (min-max)':>28} "
              f"{'GB/s':>8} {'vs reference':>22}")
    print(header)
    print("-" * len(header))
    rows = []
    for shape_name in args.shapes.split(","):
        batch, height, width = SHAPES[shape_name]
        for stride, channels, heads in LEVELS:
            tokens = (height // stride) * (width // stride)
            inputs, grad = make_inputs(batch, tokens, channels, heads, dtype, device)
            tensor_bytes = inputs[0].numel() * inputs[0].element_size()
            for backward in (False, True):
                pass_name = "fwd+bwd" if backward else "fwd"
                moved = tensor_bytes * (14 if backward else 5)
                steps = {name: runner(fn, inputs, grad, heads, backward) for name, fn in impls.items()}
                timings = common.time_rows(steps, repeats, warmup, device)
                for impl in ("reference", "torch_gram", "triton"):
                    row = {"shape": shape_name, "batch": batch, "tokens": tokens, "channels": channels,
                           "heads": heads, "pass": pass_name, "impl": impl, "dtype": args.dtype, "bytes": moved,
                           "status": "ok" if impl in timings else skip_reason}
                    if impl not in timings:
                        print(f"{shape_name:6} {batch:>2} {tokens:>8} {channels:>4} {pass_name:8} {impl:11} "
                              f"{'skipped':>28}")
                    else:
                        t = timings[impl]
                        row.update(time_ms=t.summary(1e3), GBps=moved / t.median / 1e9,
                                   speedup=ratios(timings["reference"], t))
                        print(f"{shape_name:6} {batch:>2} {tokens:>8} {channels:>4} {pass_name:8} {impl:11} "
                              f"{common.fmt_spread(row['time_ms'], '.2f'):>28} {row['GBps']:8.2f} "
                              f"{common.fmt_spread(row['speedup'], '.2f'):>22}")
                    rows.append(row)
                del steps, timings
            del inputs, grad

    common.finish({"environment": env, "dtype": args.dtype, "quick": args.quick, "repeats": repeats,
                   "levels": [list(level) for level in LEVELS], "shapes": {k: list(v) for k, v in SHAPES.items()},
                   "triton": "ok" if triton_fn is not None else skip_reason, "rows": rows}, "ig_msa", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
