"""Masked attention and SNR-map kernels vs the eager reference and torch's strongest peer.

    python bench/bench_attention_snr.py [--quick] [--dtype bf16|fp16|fp32] [--out FILE]

Rows:
  masked_attention  train (B=12, 8 heads, L=16x16=256, D=64) and infer (B=1, 8 heads, L=32x60=1920,
                    D=64), forward and forward+backward, for
                      triton     lfpv_fast.kernels.masked_attention (flash-style, -1e9 semantics)
                      reference  lfpv_fast.ops.reference.masked_attention (eager, materialises L x L)
                      cpu_ops    lfpv_fast.ops.cpu_ops.masked_attention, backend "auto" on the CPU (SDPA over
                                 the kept keys; the mean of v where every key is masked)
                      sdpa       torch.nn.functional.scaled_dot_product_attention with the boolean mask
                                 (the strongest peer; it gives NaN for rows that keep no key, so the
                                 benchmark masks keep at least one key per row)
                    Half of the keys are kept (random); "infer, all masked" is the common case of a dark
                    photo, where no key is kept (cpu_ops and reference only: SDPA gives NaN there).
                    FLOPs: forward 4*B*H*L^2*D, forward+backward 14*B*H*L^2*D (FlashAttention's
                    count: the backward's five matmuls, including recomputing S), reported as TFLOP/s
                    and as a share of the fastest of the dense matmuls timed interleaved with each group of rows.
  snr_mask          B=12 at 256x256 and B=1 at 512x960, forward, triton vs reference; GB/s counts the
                    minimal traffic (read 3 channels, write 1) vs the device's copy bandwidth, measured here.

On a machine without CUDA only the reference, cpu_ops and SDPA rows run (Triton rows print "skipped"),
in float32. Every time is the median of >= 5 repetitions after warm-up, implementations interleaved
(min and max in the JSON). Prints a table and writes JSON
(default bench/results/<date>-<device>-attention_snr.json).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from lfpv_fast.ops import cpu_ops, reference

ATTN_SHAPES = {"train": (12, 8, 256, 64), "infer": (1, 8, 1920, 64)}
SNR_SHAPES = {"train": (12, 256, 256), "infer": (1, 512, 960)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name() -> str:
    return common.device_slug()


def matmul_tflops(device: str, dtype: torch.dtype, quick: bool) -> float:
    """Dense square matmul rate (TFLOP/s) in `dtype`: the ceiling the attention rows are compared to."""
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    # the fastest repetition: a ceiling, not a typical time
    ms = common.time_fn(lambda: a @ b, 20 if device == "cuda" else 5, 3 if device == "cuda" else 1, device).min * 1e3
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(device: str, quick: bool) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write bytes): the ceiling of the SNR rows."""
    numel = (256 if device == "cuda" else (16 if quick else 64)) * 2**20 // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = common.time_fn(lambda: dst.copy_(src), 20 if device == "cuda" else 5, 3, device).min * 1e3
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def attention_inputs(shape: tuple[int, int, int, int], device: str, dtype: torch.dtype, all_masked: bool = False):
    b, h, length, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    keep = torch.rand(b, length, device=device, generator=gen) > 0.5
    keep[:, 0] = True  # SDPA gives NaN for rows with no kept key; the published -1e9 does not
    if all_masked:
        keep[:] = False
    grad = torch.randn(b, h, length, d, device=device, dtype=dtype, generator=gen)
    return q, k, v, keep, grad


def sdpa(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def attention_runner(fn: Callable, pass_name: str, q, k, v, keep, grad) -> Callable[[], object]:
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, keep)
    else:
        def run():
            # allow_unused: with every key masked, the output depends on v only (zero gradient for q, k)
            return torch.autograd.grad(fn(q, k, v, keep), (q, k, v), grad, allow_unused=True, materialize_grads=True)
    return run


def add_speedups(rows: list[dict], times: dict[str, float]) -> None:
    for row in rows:
        for peer in ("reference", "sdpa"):
            if "ms" in row and peer in times:
                row[f"speedup_vs_{peer}"] = times[peer] / row["ms"]


def bench_attention(impls: dict, device: str, dtype: torch.dtype, peak_tflops: float, quick: bool) -> list[dict]:
    rows = []
    reps, warmup = (20, 5) if device == "cuda" else (common.MIN_REPS, 1)
    size = 4096 if device == "cuda" else 1024
    matmul_probe = (torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device,
                                                                                   dtype=dtype))
    cases = [(name, shape, False) for name, shape in ATTN_SHAPES.items()] + [
        ("infer, all masked", ATTN_SHAPES["infer"], True)]
    for shape_name, shape, all_masked in cases:
        b, h, length, d = shape
        inputs = attention_inputs(shape, device, dtype, all_masked)
        for pass_name, flops in (("fwd", 4 * b * h * length**2 * d), ("fwd+bwd", 14 * b * h * length**2 * d)):
            runnable = {impl: attention_runner(fn, pass_name, *inputs) for impl, fn in impls.items()
                        if fn is not None and not (all_masked and impl == "sdpa")}
            # The matmul ceiling, timed interleaved with the rows: the same load for both.
            runnable["matmul"] = functools.partial(torch.matmul, *matmul_probe)
            timings = common.time_rows(runnable, reps, warmup, device)
            n = matmul_probe[0].shape[0]
            group_peak = 2 * n**3 / timings.pop("matmul").min / 1e12
            times, group = {impl: t.median * 1e3 for impl, t in timings.items()}, []
            for impl in impls:
                row = {"op": "masked_attention", "shape": shape_name, "dims": list(shape), "pass": pass_name,
                       "impl": impl}
                if impl not in timings:
                    why = "skipped (NaN when no key is kept)" if impls[impl] is not None else "skipped (no CUDA)"
                    group.append({**row, "status": why})
                    continue
                ms = times[impl]
                # cpu_ops computes over the kept keys only: count those FLOPs. With every key masked the
                # output is a mean: the dense attention's FLOP count does not apply.
                done = flops * float(inputs[3].float().mean()) if impl == "cpu_ops" else flops
                tflops = None if all_masked else done / (ms * 1e-3) / 1e12
                group.append({**row, "status": "ok", "ms": ms, "ms_spread": timings[impl].summary(1e3),
                              "tflops": tflops, "matmul_tflops": group_peak,
                              "pct_of_matmul": None if all_masked else 100 * tflops / group_peak})
            add_speedups(group, times)
            rows += group
    return rows


def bench_snr(impls: dict, device: str, dtype: torch.dtype, peak_gbps: float, quick: bool) -> list[dict]:
    rows = []
    reps, warmup = (20, 5) if device == "cuda" else (common.MIN_REPS, 1)
    for shape_name, (b, h, w) in SNR_SHAPES.items():
        x = torch.rand(b, 3, h, w, device=device, dtype=dtype)
        moved = (3 + 1) * b * h * w * x.element_size()  # read x once, write the map once
        timings = common.time_rows({impl: functools.partial(fn, x) for impl, fn in impls.items() if fn is not None},
                                   reps, warmup, device)
        times, group = {impl: t.median * 1e3 for impl, t in timings.items()}, []
        for impl in impls:
            row = {"op": "snr_mask", "shape": shape_name, "dims": [b, 3, h, w], "pass": "fwd", "impl": impl}
            if impl not in timings:
                group.append({**row, "status": "skipped (no CUDA)"})
                continue
            ms = times[impl]
            gbps = moved / (ms * 1e-3) / 1e9
            group.append({**row, "status": "ok", "ms": ms, "ms_spread": timings[impl].summary(1e3), "gbps": gbps,
                          "pct_of_copy": 100 * gbps / peak_gbps})
        add_speedups(group, times)
        rows += group
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'op':<17}{'shape':<19}{'pass':<9}{'impl':<11}{'ms':>10}{'TFLOP/s':>9}{'%mm':>6}{'GB/s':>8}" \
             f"{'%copy':>7}{'x ref':>8}{'x sdpa':>8}"
    print(header)
    print("-" * len(header))

    def fmt(value, spec):
        return format(value, spec) if value is not None else ""

    for r in rows:
        if r["status"] != "ok":
            print(f"{r['op']:<17}{r['shape']:<19}{r['pass']:<9}{r['impl']:<11}{r['status']:>10}")
            continue
        print(f"{r['op']:<17}{r['shape']:<19}{r['pass']:<9}{r['impl']:<11}{r['ms']:>10.3f}"
              f"{fmt(r.get('tflops'), '>9.2f'):>9}{fmt(r.get('pct_of_matmul'), '>6.1f'):>6}"
              f"{fmt(r.get('gbps'), '>8.1f'):>8}{fmt(r.get('pct_of_copy'), '>7.1f'):>7}"
              f"{fmt(r.get('speedup_vs_reference'), '>8.2f'):>8}{fmt(r.get('speedup_vs_sdpa'), '>8.2f'):>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller ceiling probes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="input dtype (default bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    triton_attn = triton_snr = None
    if device == "cuda":
        from lfpv_fast.kernels.masked_attention import masked_attention
        from lfpv_fast.kernels.snr_mask import snr_mask
        triton_attn, triton_snr = masked_attention, snr_mask

    torch.manual_seed(0)
    peak_tflops = matmul_tflops(device, dtype, args.quick)
    peak_gbps = copy_gbps(device, args.quick)
    print(f"device {device_name()}  dtype {dtype}  matmul {peak_tflops:.2f} TFLOP/s  copy {peak_gbps:.1f} GB/s")

    env = common.environment(device)
    rows = bench_attention({"triton": triton_attn, "reference": reference.masked_attention,
                            "cpu_ops": cpu_ops.masked_attention if device == "cpu" else None, "sdpa": sdpa},
                           device, dtype, peak_tflops, args.quick)
    rows += bench_snr({"triton": triton_snr, "reference": reference.snr_mask}, device, dtype, peak_gbps, args.quick)
    print_table(rows)

    meta = {"dtype": str(dtype).removeprefix("torch."), "quick": args.quick,
            "matmul_tflops": peak_tflops, "copy_gbps": peak_gbps}
    common.finish({"environment": env, "meta": meta, "rows": rows}, "attention_snr", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
