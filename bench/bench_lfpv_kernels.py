"""Benchmark of the LFPV Triton ops against their reference twins.

For each op (query_fusion, gather_samples, sample_updater_inputs, mutual_updater_inputs,
batch_mean_layer_norm on vectors and patches), at the training shape (B=12, C=64, 64x64 features) and
the inference shape (B=1, C=64, 128x240), forward and forward+backward: the time (min / median / max
of >= 5 repetitions after warm-up), the achieved bandwidth at the median as GB/s, as a fraction of
a plain copy of the same number of bytes (timed interleaved with the op, so that the cache level
and the machine's load are the same for both: "of copy"), and the speedup. The device's copy
bandwidth (the fastest of >= 5 large copies) is printed too. Bandwidth counts only bytes an op must
move (`traffic`): every input read and every output written once; backward reads the output grads,
writes the input grads, and reads the inputs again where the gradient needs them. gather_samples reads
only the sampled vector and patch, not the feature map it indexes; its backward writes the whole
(dense) feature-map gradient.

It also counts the launches of the LFPV part of one training step (sample and mutual update, then
query-and-fusion, forward and backward) with torch.profiler: CUDA kernels on a GPU; on a CPU, the
reference path's leaf aten ops that would each be a kernel on a GPU.

Without CUDA only the reference rows run (Triton rows are marked skipped), in well under a minute.

    python bench/bench_lfpv_kernels.py [--quick] [--shapes train,infer] [--dtype float32|bfloat16|float16] [--out PATH]
"""

from __future__ import annotations

import argparse
import platform
import re
from pathlib import Path
from types import SimpleNamespace

import common
import torch

from lfpv_fast.ops import reference

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


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """GB/s of the fastest of `repeats` large device-to-device copies (bytes read + bytes written): a ceiling."""
    n = (256 if device.type == "cuda" else 64) * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = common.time_fn(lambda: dst.copy_(src), repeats, warmup=2, device=device).min
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


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def traffic(op_name: str, inputs: list[torch.Tensor], outputs: tuple[torch.Tensor, ...], backward: bool) -> int:
    """Bytes the op must move at least: the only bandwidth that an achieved GB/s may count.

    Forward reads every input and writes every output once. Backward reads the output grads and writes
    the input grads, and reads the inputs again only where the gradient depends on them (the norms
    and softmaxes of query_fusion and batch_mean_layer_norm; the updater-input ops only move data).
    gather_samples reads only what it gathers (as many bytes as it writes), not the feature map; its
    backward reads the output grads and writes the dense feature-map gradient.
    """
    out_bytes = nbytes(outputs)
    if op_name == "gather_samples":
        forward = 2 * out_bytes  # read the samples, write them
        return forward + out_bytes + nbytes(inputs) if backward else forward
    in_bytes = nbytes(inputs)
    if not backward:
        return in_bytes + out_bytes
    rereads = in_bytes if op_name in ("query_fusion",) or op_name.startswith("batch_mean_layer_norm") else 0
    return (in_bytes + out_bytes) + (out_bytes + in_bytes) + rereads


def runner(fn, ops, inputs: list[torch.Tensor], backward: bool, op_name: str = ""):
    """A closure running the op (and its backward), and the bytes it moves at minimum."""
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    outs = as_tuple(fn(ops, *leaves))
    moved = traffic(op_name, leaves, outs, backward)
    grads = [torch.randn_like(o) for o in outs]
    if not backward:
        return (lambda: fn(ops, *leaves)), moved

    def step():
        torch.autograd.grad(as_tuple(fn(ops, *leaves)), leaves, grads)

    return step, moved


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
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/<date>-<device>-lfpv_kernels.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    repeats = (10 if args.quick else 50) if on_gpu else common.MIN_REPS
    warmup = 3 if on_gpu else 1
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    env = common.environment(device)
    triton_ops, skip_reason = triton_ops_or_reason(device)
    name = device_name(device)

    bandwidth = copy_bandwidth(device, max(repeats, common.MIN_REPS))
    print(f"device: {name}  dtype: {args.dtype}  copy bandwidth: {bandwidth:.1f} GB/s")
    header = (f"{'op':31} {'shape':6} {'pass':8} {'impl':9} {'ms: median (min-max)':>26} {'GB/s':>9} {'of copy':>8} "
              f"{'speedup':>8}")
    print(header)
    print("-" * len(header))

    rows = []
    with torch.inference_mode(False):
        for shape_name, shape in shapes.items():
            for op_name, (fn, inputs) in make_cases(shape, dtype, device).items():
                for backward in (False, True):
                    pass_name = "fwd+bwd" if backward else "fwd"
                    step, moved = runner(fn, reference, inputs, backward, op_name)
                    steps = {"reference": step}
                    if triton_ops is not None:
                        steps["triton"], _ = runner(fn, triton_ops, inputs, backward, op_name)
                    copy_src = torch.empty(max(1, moved // 8), device=device)  # moved/2 bytes read, moved/2 written
                    copy_dst = torch.empty_like(copy_src)
                    steps["copy"] = lambda src=copy_src, dst=copy_dst: dst.copy_(src)
                    timings = common.time_rows(steps, repeats, warmup, device)
                    copy_gbps = moved / timings["copy"].median / 1e9
                    ref_s = timings["reference"].median
                    for impl in ("reference", "triton"):
                        row = {"op": op_name, "shape": shape_name, "dims": list(shape), "pass": pass_name,
                               "impl": impl, "dtype": args.dtype, "bytes": moved,
                               "status": "ok" if impl in timings else skip_reason}
                        if impl not in timings:
                            print(f"{op_name:31} {shape_name:6} {pass_name:8} {impl:9} {'skipped':>26}")
                        else:
                            seconds = timings[impl].median
                            gbps = moved / seconds / 1e9
                            row.update(time_ms=timings[impl].summary(1e3), GBps=gbps, copy_same_bytes_GBps=copy_gbps,
                                       fraction_of_copy=gbps / copy_gbps, speedup=ref_s / seconds)
                            print(f"{op_name:31} {shape_name:6} {pass_name:8} {impl:9} "
                                  f"{common.fmt_spread(row['time_ms'], '.3f'):>26} "
                                  f"{gbps:9.2f} {gbps / copy_gbps:8.1%} {ref_s / seconds:8.2f}x")
                        rows.append(row)

    launches = count_launches(device, triton_ops)
    print("\nLaunches of one LFPV training step (sample + mutual update, query-and-fusion; forward + backward):")
    for path, info in launches.items():
        print(f"  {path:9} {info['launches'] if info['launches'] is not None else 'skipped':>6}  ({info['unit']})")

    common.finish({
        "environment": env, "dtype": args.dtype, "quick": args.quick, "repeats": repeats,
        "copy_bandwidth_GBps": bandwidth, "bank_size": BANK, "patch_size": PATCH,
        "shapes": {k: list(v) for k, v in shapes.items()}, "rows": rows, "lfpv_step_launches": launches,
    }, "lfpv_kernels", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
