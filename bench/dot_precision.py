"""Which input precision the query-and-fusion dots can use in bf16 training: a CPU error model.

The Triton kernel (kernels/query_fusion.py) runs every matrix product as a `tl.dot`. With float32
operands and input_precision="ieee" those run on the CUDA cores (FMA); tensor cores take tf32 (10-bit
mantissa) or bf16 (7-bit) operands with float32 accumulation. This script models, without a GPU:

1. the work of each dot per feature pixel (FLOPs, and the bytes each kernel moves), and
2. the error each choice adds, measured on the CPU: the op's forward and backward written out dot by
   dot exactly as the kernels compute them, in float64, with the operands of chosen dots rounded as a
   tensor core would see them (bf16: round to nearest even, as `.to(tl.bfloat16)` does; tf32: the low 13
   bits dropped, the worst case of an MMA reading float32 registers), against the float64 reference
   (`lfpv_fast.ops.reference.query_fusion` and its autograd). Errors are in bf16 units of the tensor's
   largest value (2^-7 * max|truth|), the measure of tests/kernels/test_kernel_autocast.py.

    python bench/dot_precision.py            # table on stdout, JSON in bench/results/

bf16 training inputs: bf16 features and output grads (a bf16 conv's output and its grad), float32 banks
and LayerNorm parameters (CUDA autocast's dtypes), the output rounded to bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lfpv_fast import reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BF16_ULP = 2.0**-7
# The dots of the op, by role (the kernels compute each role the same way wherever it recurs).
ROLES = ("scores", "values", "dprobs", "bank_grads", "dq")
NAMES = ["output", "features", "bank_vectors", "bank_patches", "pixel_w", "pixel_b", "vkey_w", "vkey_b",
         "patch_w", "patch_b", "pkey_w", "pkey_b"]


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().view(torch.int32) & ~0x1FFF  # keep sign, exponent and the top 10 mantissa bits
    return bits.view(torch.float32).double()


def round_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float().double()


ROUNDING = {"ieee": round_fp32, "tf32": round_tf32, "bf16": round_bf16, "exact": lambda x: x}


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    return xhat * w + b, xhat, rstd


def _layer_norm_backward(dy, xhat, rstd, w):
    dxhat = dy * w
    return (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd


def _branch(x, dout, bank, norm, key_norm, eps, r):
    """One branch (rows x: pixels (M, C) or patches (M, D)) forward and backward, dot by dot as the
    kernels compute it; r[role] rounds that role's operands."""
    q, xhat, rstd = _layer_norm(x, *norm, eps)
    keys, khat, krstd = _layer_norm(bank, *key_norm, eps)
    s = r["scores"](q) @ r["scores"](keys).T
    p = torch.softmax(s, -1)
    update = r["values"](p) @ r["values"](bank)
    dp = r["dprobs"](dout) @ r["dprobs"](bank).T
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    g_value = r["bank_grads"](p).T @ r["bank_grads"](dout)
    g_keys = r["bank_grads"](ds).T @ r["bank_grads"](q)
    dq = r["dq"](ds) @ r["dq"](keys)
    g_w, g_b = (dq * xhat).sum(0), dq.sum(0)
    dx = _layer_norm_backward(dq, xhat, rstd, norm[0])
    g_bank = g_value + _layer_norm_backward(g_keys, khat, krstd, key_norm[0])
    return update, dx, g_bank, g_w, g_b, (g_keys * khat).sum(0), g_keys.sum(0)


def modeled(leaves, dout, rounding: dict[str, str], eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """Output and every gradient of query_fusion with each dot role's operands rounded per `rounding`."""
    f, bv, bp, pw, pb, vw, vb, qw, qb, kw, kb = [t.double() for t in leaves]
    r = {role: ROUNDING[rounding[role]] for role in ROLES}
    b, c, h, w = f.shape
    n, p = bp.shape[0], bp.shape[-1]
    d = c * p * p
    rows = f.permute(0, 2, 3, 1).reshape(-1, c)
    drows = dout.double().permute(0, 2, 3, 1).reshape(-1, c)
    vec = _branch(rows, drows, bv, (pw, pb), (vw, vb), eps, r)
    patches = F.pixel_unshuffle(f, p).permute(0, 2, 3, 1).reshape(-1, d)
    dpatches = F.pixel_unshuffle(dout.double(), p).permute(0, 2, 3, 1).reshape(-1, d)
    pat = _branch(patches, dpatches, bp.reshape(n, d), (qw, qb), (kw, kb), eps, r)

    def image(x):
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def patch_image(x):
        return F.pixel_shuffle(x.reshape(b, h // p, w // p, d).permute(0, 3, 1, 2), p)

    out = f + (image(vec[0]) + patch_image(pat[0]))
    return dict(output=round_bf16(out), features=round_bf16(dout.double() + (image(vec[1]) + patch_image(pat[1]))),
                bank_vectors=round_fp32(vec[2]), bank_patches=round_fp32(pat[2].reshape(bp.shape)),
                pixel_w=vec[3], pixel_b=vec[4], vkey_w=vec[5], vkey_b=vec[6],
                patch_w=pat[3], patch_b=pat[4], pkey_w=pat[5], pkey_b=pat[6])


def truth(leaves, dout) -> dict[str, torch.Tensor]:
    """The float64 reference op and its autograd gradients."""
    leaves = [t.double().detach().requires_grad_(True) for t in leaves]
    f, bv, bp, *norms = leaves
    out = reference.query_fusion(f, bv, bp, *zip(norms[::2], norms[1::2], strict=True))
    grads = torch.autograd.grad((out * dout.double()).sum(), leaves)
    return dict(zip(NAMES, [out.detach(), *grads], strict=True))


def reference_autocast(leaves, dout) -> dict[str, torch.Tensor]:
    """The reference op under CPU bf16 autocast (every matmul's inputs and output in bf16): the
    published model's own bf16 training arithmetic, as a yardstick."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    f, bv, bp, *norms = leaves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference.query_fusion(f, bv, bp, *zip(norms[::2], norms[1::2], strict=True))
    grads = torch.autograd.grad((out.double() * dout.double()).sum(), leaves)
    return dict(zip(NAMES, [out.detach(), *grads], strict=True))


def errors_in_ulps(actual: dict, exact: dict) -> dict[str, float]:
    """max |actual - truth| in bf16 units of max |truth|; the key LayerNorms' biases (true gradient 0:
    they shift every score of a query alike) in units of their weights' gradients."""
    scale_of = {"vkey_b": "vkey_w", "pkey_b": "pkey_w"}
    out = {}
    for name in NAMES:
        scale = exact[scale_of.get(name, name)].abs().max().item()
        out[name] = (actual[name].double() - exact[name]).abs().max().item() / (BF16_ULP * scale)
    return out


def make_leaves(c: int, n: int, p: int, batch: int, side: int, scores: str, seed: int = 0):
    """bf16 features, float32 banks and LayerNorm parameters. scores="O(1)": LayerNorm weights scaled by
    dim**-0.25 (as the kernel tests draw them: softmaxes neither saturate nor flatten); "init": the
    model's initial LayerNorms (weight 1, bias 0): scores of size sqrt(dim), nearly one-hot softmaxes."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    d = c * p * p
    leaves = [rand(batch, c, side, side).bfloat16(), rand(n, c).float(), rand(n, c, p, p).float()]
    for dim in (c, c, d, d):
        if scores == "init":
            leaves += [torch.ones(dim), torch.zeros(dim)]
        else:
            leaves += [((1 + 0.1 * rand(dim)) * dim**-0.25).float(), (0.1 * rand(dim)).float()]
    dout = rand(batch, c, side, side).bfloat16()
    return leaves, dout


# The variants compared: the rounding of each dot role.
VARIANTS = {
    "ieee (fp32 FMA; before)": dict.fromkeys(ROLES, "ieee"),
    "tf32 everywhere": dict.fromkeys(ROLES, "tf32"),
    "bf16 everywhere": dict.fromkeys(ROLES, "bf16"),
    "bf16, scores tf32": {**dict.fromkeys(ROLES, "bf16"), "scores": "tf32"},
    "bf16, scores ieee": {**dict.fromkeys(ROLES, "bf16"), "scores": "ieee"},
}


def work_model(c: int, n: int, p: int) -> list[dict]:
    """FLOPs of each dot per feature pixel (K of the dot; N bank entries), per kernel, and the bytes each
    kernel moves per pixel from DRAM with bf16 features (re-reads of a tile hit L1/L2)."""
    per = 2 * c * n  # one (pixel or its share of a patch) x bank product, per pixel
    return [
        dict(kernel="forward", dots="scores: pixel (K=C) + patch (K=C*p*p); values: pixel + patch (K=N)",
             flops=4 * per, bytes=2 * c + 2 * c),
        dict(kernel="backward, pixel branch", dots="scores, dprobs, bank grad, key grad, dq",
             flops=5 * per, bytes=2 * c + 2 * c + 4 * c),
        dict(kernel="backward, patch branch", dots="scores, dprobs, dq (twice: two passes)",
             flops=4 * per, bytes=2 * c + 2 * c + 4 * c + 2 * c),
        dict(kernel="backward, patch parameters", dots="bank grad, key grad, dq", flops=3 * per, bytes=2 * c + 2 * c),
    ]


# Peak rates of an H100 SXM (dense): CUDA-core float32 (an FMA is 2 FLOPs), tensor-core tf32 and bf16
# with float32 accumulation, HBM3 bandwidth.
H100 = dict(fp32_fma=67e12, tf32=495e12, bf16=989e12, hbm=3.35e12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/DATE-cpu-dot-precision.json)")
    args = parser.parse_args(argv)
    cases = [("smid C=64", 64, 16, 4, 2, 32), ("demo C=16", 16, 16, 4, 2, 32)]
    rows = []
    for label, c, n, p, batch, side in cases:
        for scores in ("O(1)", "init"):
            leaves, dout = make_leaves(c, n, p, batch, side, scores)
            exact = truth(leaves, dout)
            check = modeled(leaves, dout, dict.fromkeys(ROLES, "exact"))
            # The model is the reference's arithmetic (the output roundings aside).
            assert max(errors_in_ulps(check, exact)[name] for name in NAMES[2:]) < 1e-4
            results = {v: errors_in_ulps(modeled(leaves, dout, r), exact) for v, r in VARIANTS.items()}
            results["reference op under CPU bf16 autocast"] = errors_in_ulps(reference_autocast(leaves, dout), exact)
            for variant, errs in results.items():
                rows.append(dict(case=label, scores=scores, variant=variant, errors_ulps=errs,
                                 worst=max(errs.values()), worst_of=max(errs, key=errs.get)))
    print("Error of query_fusion in bf16 training, in bf16 units of each tensor's largest value "
          "(max over output and the 11 gradients)\n")
    print("| shapes | scores | dot operands | output | d features | d banks (worst) | d LayerNorm params (worst) "
          "| worst (of) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        e = r["errors_ulps"]
        print(f"| {r['case']} | {r['scores']} | {r['variant']} | {e['output']:.2f} | {e['features']:.2f} | "
              f"{max(e['bank_vectors'], e['bank_patches']):.2f} | {max(e[k] for k in NAMES[4:]):.2f} | "
              f"{r['worst']:.2f} ({r['worst_of']}) |")
    work = work_model(64, 16, 4)
    print("\nWork per feature pixel, published model (C=64, N=16, p=4), bf16 features; time bounds on an H100 SXM:\n")
    print("| kernel | dots | FLOPs | DRAM bytes | FLOP/byte | ieee dots (ps) | tf32 (ps) | bf16 (ps) | memory (ps) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for w in work:
        w.update(fp32_ps=w["flops"] / H100["fp32_fma"] * 1e12, tf32_ps=w["flops"] / H100["tf32"] * 1e12,
                 bf16_ps=w["flops"] / H100["bf16"] * 1e12, memory_ps=w["bytes"] / H100["hbm"] * 1e12)
        print(f"| {w['kernel']} | {w['dots']} | {w['flops']} | {w['bytes']} | {w['flops'] / w['bytes']:.0f} | "
              f"{w['fp32_ps']:.0f} | {w['tf32_ps']:.0f} | {w['bf16_ps']:.0f} | {w['memory_ps']:.0f} |")
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or RESULTS / f"{now:%Y-%m-%d}-cpu-dot-precision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(date=now.isoformat(timespec="seconds"), machine=platform.node() or "cpu",
                                   torch=torch.__version__, command="python bench/dot_precision.py",
                                   h100_peaks=H100, errors=rows, work_per_pixel=work), indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
