"""Masked attention and SNR-map kernels vs the eager reference and torch's strongest peer.

    python bench/bench_attention_snr.py [--quick] [--dtype bf16|fp16|fp32] [--out FILE]

Rows:
  masked_attention  train (B=12, 8 heads, L=16x16=256, D=64) and infer (B=1, 8 heads, L=32x60=1920,
                    D=64), forward and forward+backward, for
                      triton     lfpv_fast.kernels.masked_attention (flash-style, -1e9 semantics)
                      reference  lfpv_fast.reference.masked_attention (eager, materialises L x L)
                      sdpa       torch.nn.functional.scaled_dot_product_attention with the boolean mask
                                 (the strongest peer; it gives NaN for rows that keep no key, so the
                                 benchmark masks keep at least one key per row)
                    FLOPs: forward 4*B*H*L^2*D, forward+backward 14*B*H*L^2*D (FlashAttention's
                    count: the backward's five matmuls, including recomputing S), reported as TFLOP/s
                    and as a share of the device's dense matmul rate in the same dtype, measured here.
  snr_mask          B=12 at 256x256 and B=1 at 512x960, forward, triton vs reference; GB/s counts the
                    minimal traffic (read 3 channels, write 1) vs the device's copy bandwidth, measured here.

On a machine without CUDA only the reference and SDPA rows run (Triton rows print "skipped"), in
float32. Prints a table and writes JSON (default bench/results/<date>-<device>-attention_snr.json).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lfpv_fast import reference

ATTN_SHAPES = {"train": (12, 8, 256, 64), "infer": (1, 8, 1920, 64)}
SNR_SHAPES = {"train": (12, 256, 256), "infer": (1, 512, 960)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def timeit(fn: Callable[[], object], reps: int, warmup: int, stat: Callable = statistics.median) -> float:
    """Milliseconds of fn(), median over reps by default (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return stat(times)


def matmul_tflops(device: str, dtype: torch.dtype, quick: bool) -> float:
    """Dense square matmul rate (TFLOP/s) in `dtype`: the ceiling the attention rows are compared to."""
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    # the fastest repetition: a ceiling, not a typical time
    ms = timeit(lambda: a @ b, reps=20 if device == "cuda" else 5, warmup=3 if device == "cuda" else 1, stat=min)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(device: str, quick: bool) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write bytes): the ceiling of the SNR rows."""
    numel = (256 if device == "cuda" else (16 if quick else 64)) * 2**20 // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), reps=20 if device == "cuda" else 5, warmup=3, stat=min)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def attention_inputs(shape: tuple[int, int, int, int], device: str, dtype: torch.dtype):
    b, h, length, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    keep = torch.rand(b, length, device=device, generator=gen) > 0.5
    keep[:, 0] = True  # SDPA gives NaN for rows with no kept key; the published -1e9 does not
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
            return torch.autograd.grad(fn(q, k, v, keep), (q, k, v), grad)
    return run


def add_speedups(rows: list[dict], times: dict[str, float]) -> None:
    for row in rows:
        for peer in ("reference", "sdpa"):
            if "ms" in row and peer in times:
                row[f"speedup_vs_{peer}"] = times[peer] / row["ms"]


def bench_attention(impls: dict, device: str, dtype: torch.dtype, peak_tflops: float, quick: bool) -> list[dict]:
    rows = []
    reps, warmup = (20, 5) if device == "cuda" else ((2, 1) if quick else (5, 1))
    for shape_name, shape in ATTN_SHAPES.items():
        b, h, length, d = shape
        inputs = attention_inputs(shape, device, dtype)
        for pass_name, flops in (("fwd", 4 * b * h * length**2 * d), ("fwd+bwd", 14 * b * h * length**2 * d)):
            times, group = {}, []
            for impl, fn in impls.items():
                row = {"op": "masked_attention", "shape": shape_name, "dims": list(shape), "pass": pass_name,
                       "impl": impl}
                if fn is None:
                    group.append({**row, "status": "skipped (no CUDA)"})
                    continue
                ms = timeit(attention_runner(fn, pass_name, *inputs), reps, warmup)
                times[impl] = ms
                tflops = flops / (ms * 1e-3) / 1e12
                group.append({**row, "status": "ok", "ms": ms, "tflops": tflops,
                              "pct_of_matmul": 100 * tflops / peak_tflops})
            add_speedups(group, times)
            rows += group
    return rows


def bench_snr(impls: dict, device: str, dtype: torch.dtype, peak_gbps: float, quick: bool) -> list[dict]:
    rows = []
    reps, warmup = (20, 5) if device == "cuda" else ((2, 1) if quick else (5, 1))
    for shape_name, (b, h, w) in SNR_SHAPES.items():
        x = torch.rand(b, 3, h, w, device=device, dtype=dtype)
        moved = (3 + 1) * b * h * w * x.element_size()  # read x once, write the map once
        times, group = {}, []
        for impl, fn in impls.items():
            row = {"op": "snr_mask", "shape": shape_name, "dims": [b, 3, h, w], "pass": "fwd", "impl": impl}
            if fn is None:
                group.append({**row, "status": "skipped (no CUDA)"})
                continue
            ms = timeit(functools.partial(fn, x), reps, warmup)
            times[impl] = ms
            gbps = moved / (ms * 1e-3) / 1e9
            group.append({**row, "status": "ok", "ms": ms, "gbps": gbps, "pct_of_copy": 100 * gbps / peak_gbps})
        add_speedups(group, times)
        rows += group
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'op':<17}{'shape':<7}{'pass':<9}{'impl':<11}{'ms':>10}{'TFLOP/s':>9}{'%mm':>6}{'GB/s':>8}" \
             f"{'%copy':>7}{'x ref':>8}{'x sdpa':>8}"
    print(header)
    print("-" * len(header))

    def fmt(value, spec):
        return format(value, spec) if value is not None else ""

    for r in rows:
        if r["status"] != "ok":
            print(f"{r['op']:<17}{r['shape']:<7}{r['pass']:<9}{r['impl']:<11}{r['status']:>10}")
            continue
        print(f"{r['op']:<17}{r['shape']:<7}{r['pass']:<9}{r['impl']:<11}{r['ms']:>10.3f}"
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

    rows = bench_attention({"triton": triton_attn, "reference": reference.masked_attention, "sdpa": sdpa},
                           device, dtype, peak_tflops, args.quick)
    rows += bench_snr({"triton": triton_snr, "reference": reference.snr_mask}, device, dtype, peak_gbps, args.quick)
    print_table(rows)

    today = datetime.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"{today}-{device_name()}-attention_snr.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": today, "device": device_name(), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "triton": triton_version(),
            "python": platform.python_version(), "quick": args.quick,
            "matmul_tflops": peak_tflops, "copy_gbps": peak_gbps}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
