"""Benchmark of the LFPV Triton ops against their reference twins.

For each op (query_fusion, gather_samples, sample_updater_inputs, mutual_updater_inputs,
batch_mean_layer_norm on vectors and patches), at the training shape (B=12, C=64, 64x64 features) and
the inference shape (B=1, C=64, 128x240), forward and forward+backward: the time, the achieved
bandwidth (a minimum-traffic model: every input read and every output written once; backward reads
the output grads and the inputs again and writes the input grads) as GB/s and as a fraction of the
device's copy bandwidth (measured in the same run with a large tensor copy), and the speedup.

It also counts the launches of the LFPV part of one training step (sample and mutual update, then
query-and-fusion, forward and backward) with torch.profiler: CUDA kernels on a GPU; on a CPU, the
reference path's leaf aten ops that would each be a kernel on a GPU.

Without CUDA only the reference rows run (Triton rows are marked skipped), in well under a minute.

    python bench/bench_lfpv_kernels.py [--quick] [--dtype float32|bfloat16|float16] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from lfpv_fast import reference

BANK, PATCH = 16, 4
SHAPES = {"train": (12, 64, 64, 64), "infer": (1, 64, 128, 240)}
# aten ops that only allocate or re-view memory: no kernel on a GPU.
NO_KERNEL = re.compile(r"aten::(empty|empty_like|empty_strided|view|_unsafe_view|reshape|as_strided|expand|permute|"
                       r"transpose|t|select|slice|unsqueeze|squeeze|detach|alias|lift_fresh|_reshape_alias|"
                       r"resolve_conj|resolve_neg|result_type|size|stride|is_same_size|split|chunk|unbind|"
                       r"flatten|contiguous|numpy_T|to|_to_copy_noop|set_|zeros_like_noop)$")


def device_name(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    n = (256 if device.type == "cuda" else 32) * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def make_cases(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
    """name -> (function of the ops module, tensor inputs as a list, grad-requiring indices)."""
    b, c, h, w = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale: float = 1.0):
        return (scale * torch.randn(*size, generator=gen)).to(device=device, dtype=dtype)

    d = c * PATCH * PATCH
    features = rand(b, c, h, w)
    bank_v, bank_p, emb = rand(BANK, c), rand(BANK, c, PATCH, PATCH), rand(BANK, c)
    norms = [rand(k, scale=0.1) + 1 for k in (c, c, d, d)]
    biases = [rand(k, scale=0.1) for k in (c, c, d, d)]
    vpos = torch.tensor([h // 3, w // 2], device=device)
    ppos = torch.tensor([h // 4, w // 5], device=device)
    partners = torch.randint(0, BANK, (BANK,), generator=gen).to(device)
    samples_v, samples_p = rand(b, c), rand(b, c, PATCH, PATCH)
    upd_v, upd_p = rand(BANK * b, c), rand(BANK * b, c, PATCH, PATCH)

    return {
        "query_fusion": (
            lambda ops, f, bv, bp, *n: ops.query_fusion(f, bv, bp, (n[0], n[1]), (n[2], n[3]), (n[4], n[5]),
                                                        (n[6], n[7])),
            [features, bank_v, bank_p, norms[0], biases[0], norms[1], biases[1], norms[2], biases[2], norms[3],
             biases[3]]),
        "gather_samples": (lambda ops, f: ops.gather_samples(f, vpos, ppos, PATCH), [features]),
        "sample_updater_inputs": (lambda ops, *t: ops.sample_updater_inputs(*t),
                                  [bank_v, bank_p, samples_v, samples_p, emb]),
        "mutual_updater_inputs": (lambda ops, bv, bp, e: ops.mutual_updater_inputs(bv, bp, partners, partners, e),
                                  [bank_v, bank_p, emb]),
        "batch_mean_layer_norm[vector]": (lambda ops, u, wt, bs: ops.batch_mean_layer_norm(u, b, (wt, bs)),
                                          [upd_v, norms[0], biases[0]]),
        "batch_mean_layer_norm[patch]": (lambda ops, u, wt, bs: ops.batch_mean_layer_norm(u, b, (wt, bs)),
                                         [upd_p, norms[2].view(c, PATCH, PATCH), biases[2].view(c, PATCH, PATCH)]),
    }


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def runner(fn, ops, inputs: list[torch.Tensor], backward: bool):
    """A closure running the op (and its backward), and the bytes it moves at minimum."""
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    outs = as_tuple(fn(ops, *leaves))
    in_bytes = sum(t.numel() * t.element_size() for t in leaves)
    out_bytes = sum(o.numel() * o.element_size() for o in outs)
    grads = [torch.randn_like(o) for o in outs]
    if not backward:
        return (lambda: fn(ops, *leaves)), in_bytes + out_bytes

    def step():
        torch.autograd.grad(as_tuple(fn(ops, *leaves)), leaves, grads)

    # forward (in + out) + backward (output grads + inputs again + input grads)
    return step, 3 * in_bytes + 2 * out_bytes


def triton_ops_or_reason(device: torch.device):
    """The LFPV Triton ops (straight from their modules: this benchmark needs no other kernel)."""
    if device.type != "cuda":
        return None, "skipped: no CUDA device (the CPU interpreter is for tests, not timings)"
    try:
        from lfpv_fast.kernels import bank_update
        from lfpv_fast.kernels.query_fusion import query_fusion
    except ImportError as exc:
        return None, f"skipped: {exc}"
    return SimpleNamespace(gather_samples=bank_update.gather_samples,
                           sample_updater_inputs=bank_update.sample_updater_inputs,
                           mutual_updater_inputs=bank_update.mutual_updater_inputs,
                           batch_mean_layer_norm=bank_update.batch_mean_layer_norm, query_fusion=query_fusion), ""


def count_launches(device: torch.device, triton_ops) -> dict:
    """Launches of one LFPV training step (update_banks + fuse, forward and backward) per path."""
    from torch.profiler import ProfilerActivity, profile

    from lfpv_fast.model import BankDraws, LFPVModule, ModelConfig

    cfg = ModelConfig(bank_size=BANK, patch_size=PATCH)
    module = LFPVModule(cfg).to(device)
    b, c, h, w = 2, cfg.nf, 16, 16  # launch counts do not depend on the size
    features = torch.randn(b, c, h, w, device=device, requires_grad=True)
    banks = torch.randn(BANK, c, device=device), torch.randn(BANK, c, PATCH, PATCH, device=device)
    draws = BankDraws.sample((h, w), BANK, PATCH, torch.Generator().manual_seed(0)).to(device)

    def step(ops):
        vectors, patches = module.update_banks(features, *banks, draws, ops)
        module.fuse(features, vectors, patches, ops).sum().backward()

    result = {}
    paths = {"reference": reference}
    if triton_ops is not None:
        paths["triton"] = triton_ops
    for name, ops in paths.items():
        step(ops)  # warm-up (Triton compiles here)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(ops)
            sync(device)
        events = prof.events()
        if device.type == "cuda":
            count = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            unit = "CUDA kernels"
        else:
            # Leaf aten ops that are not pure allocations or views: one GPU kernel each.
            count = sum(1 for e in events if e.name.startswith("aten::") and not NO_KERNEL.match(e.name)
                        and not any(ch.name.startswith("aten::") for ch in e.cpu_children))
            unit = "leaf aten ops (CPU stand-in for kernels)"
        result[name] = {"launches": count, "unit": unit}
    if triton_ops is None:
        result["triton"] = {"launches": None, "unit": "skipped: no CUDA device"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/<date>-<device>-lfpv_kernels.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    repeats = (10 if args.quick else 50) if on_gpu else (2 if args.quick else 3)
    warmup = 3 if on_gpu else 1
    triton_ops, skip_reason = triton_ops_or_reason(device)
    name = device_name(device)
    out_path = args.out or Path(__file__).parent / "results" / f"{dt.date.today():%Y-%m-%d}-{name}-lfpv_kernels.json"

    bandwidth = copy_bandwidth(device, max(repeats, 5))
    print(f"device: {name}  dtype: {args.dtype}  copy bandwidth: {bandwidth:.1f} GB/s")
    header = f"{'op':31} {'shape':6} {'pass':8} {'impl':9} {'time ms':>10} {'GB/s':>9} {'of copy':>8} {'speedup':>8}"
    print(header)
    print("-" * len(header))

    rows = []
    with torch.inference_mode(False):
        for shape_name, shape in SHAPES.items():
            for op_name, (fn, inputs) in make_cases(shape, dtype, device).items():
                for backward in (False, True):
                    pass_name = "fwd+bwd" if backward else "fwd"
                    step, nbytes = runner(fn, reference, inputs, backward)
                    ref_s = timed(step, device, repeats, warmup)
                    impls = [("reference", ref_s, "")]
                    if triton_ops is not None:
                        step, _ = runner(fn, triton_ops, inputs, backward)
                        impls.append(("triton", timed(step, device, repeats, warmup), ""))
                    else:
                        impls.append(("triton", None, skip_reason))
                    for impl, seconds, status in impls:
                        row = {"op": op_name, "shape": shape_name, "dims": list(shape), "pass": pass_name,
                               "impl": impl, "dtype": args.dtype, "bytes": nbytes, "status": status or "ok"}
                        if seconds is None:
                            print(f"{op_name:31} {shape_name:6} {pass_name:8} {impl:9} {'skipped':>10}")
                        else:
                            gbps = nbytes / seconds / 1e9
                            row.update(time_ms=seconds * 1e3, GBps=gbps, fraction_of_copy=gbps / bandwidth,
                                       speedup=ref_s / seconds)
                            print(f"{op_name:31} {shape_name:6} {pass_name:8} {impl:9} {seconds * 1e3:10.3f} "
                                  f"{gbps:9.2f} {gbps / bandwidth:8.1%} {ref_s / seconds:8.2f}x")
                        rows.append(row)

    launches = count_launches(device, triton_ops)
    print("\nLaunches of one LFPV training step (sample + mutual update, query-and-fusion; forward + backward):")
    for path, info in launches.items():
        print(f"  {path:9} {info['launches'] if info['launches'] is not None else 'skipped':>6}  ({info['unit']})")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "date": dt.datetime.now().isoformat(timespec="seconds"), "device": name, "dtype": args.dtype,
        "torch": torch.__version__, "python": sys.version.split()[0], "quick": args.quick, "repeats": repeats,
        "copy_bandwidth_GBps": bandwidth, "bank_size": BANK, "patch_size": PATCH,
        "shapes": {k: list(v) for k, v in SHAPES.items()}, "rows": rows, "lfpv_step_launches": launches,
    }, indent=2))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
