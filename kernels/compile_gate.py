"""The compile gate: every Triton launch of a training step and of an eval frame, compiled ahead of time
for GPUs that need not be here, checked against their shared memory, with registers and spills.

    python -m lfpv_fast.kernels.compile_gate                    # sm_90 and sm_80, all precisions
    python -m lfpv_fast.kernels.compile_gate --targets local    # the CUDA card of this machine
    python -m lfpv_fast.kernels.compile_gate --json out.json --markdown out.md

How: the model runs once per scenario on fake tensors (torch's FakeTensorMode: shapes and dtypes, no
memory, no GPU) with `lfpv_fast.kernels._common.record_launches`, which configures every launch for
the target and records it instead of running it. Each distinct launch (kernel, constexprs, argument
dtypes and the integer/alignment specializations Triton makes) is then compiled by Triton's own
compiler (`ASTSource` + `triton.compile(target=GPUTarget("cuda", arch, 32))`, bound by the same binder
and options `JITFunction.run` uses), and ptxas -v, the one shipped with Triton, reports registers and
spills. A launch fails the gate when it does not compile, needs more shared memory than the card
gives one program, or has a grid beyond CUDA's limits.

Must run without TRITON_INTERPRET (the interpreter replaces the JIT functions): the test runs it in a
subprocess. Compiled kernels are cached by Triton (~/.triton/cache or TRITON_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

from lfpv_fast.kernels._common import TARGETS, LaunchRecord, Target, TensorSpec, record_launches

# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65535.
_GRID_LIMITS = (2**31 - 1, 65535, 65535)

# Training shapes (batch, crop) and eval frames (height, width) that the gate records. Shapes enter the
# kernels as runtime integers, so these corners cover every specialization Triton makes (1, multiples
# of 16, others) and the extremes of every grid.
TRAIN_SHAPES = [(1, 128), (1, 512), (12, 256), (32, 128), (32, 512)]
EVAL_FRAMES = [(512, 960), (1024, 1920)]
# "mix" is bf16 autocast over a float32 model: bf16 features, q/k/v and updater outputs, float32 banks
# and norms (CPU autocast rules, which agree with CUDA's on the dtypes the kernels see, except that
# CUDA autocast runs LayerNorm in float32: the Triton wrappers follow the device's rule).
PRECISIONS = ("fp32", "bf16", "fp16", "mix")
# float64 runs in the tests (golden parity on a GPU); recorded at the golden case's shape only.
FP64_TRAIN_SHAPES = [(2, 64)]


@dataclasses.dataclass
class CompileResult:
    target: str
    precision: str
    name: str  # the launch's name (e.g. "query_fusion_bwd")
    kernel: str  # the @triton.jit function
    signature: str  # argument dtypes and constexprs, as compiled
    grid: list[int]
    shared: int | None = None  # bytes
    registers: int | None = None
    spill_stores: int | None = None  # bytes per thread
    spill_loads: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------------------------
# Recording


def _model_config():
    from lfpv_fast.model import ModelConfig

    return ModelConfig()  # the published SMID model: the shapes the kernels are built for


def _draws(feature_hw: tuple[int, int]):
    from lfpv_fast.model import BankDraws

    cfg = _model_config()
    return BankDraws.sample(feature_hw, cfg.bank_size, cfg.patch_size, torch.Generator().manual_seed(0))


def _model_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "mix": torch.float32,
            "fp64": torch.float64}[precision]


def record_scenario(target: Target, precision: str, train_shapes: Iterable[tuple[int, int]],
                    eval_frames: Iterable[tuple[int, int]]) -> list[LaunchRecord]:
    """The launches of one training step (forward + backward) per (batch, crop) and one eval forward per
    (height, width) frame, in `precision`, configured for `target`."""
    from lfpv_fast.model import LFPVNet

    dtype = _model_dtype(precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "mix")
    with FakeTensorMode(allow_non_fake_inputs=True), record_launches(target) as records:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the dtype: fake parameters cannot be converted by .to()
        try:
            net = LFPVNet(_model_config(), backend="triton")
        finally:
            torch.set_default_dtype(default)
        for batch, crop in train_shapes:
            net.train()
            x = torch.rand(batch, 3, crop, crop, dtype=dtype)
            with autocast:
                mask = net.snr_mask(x)  # the trainer computes it from the input batch, no gradient
                out, without_lfpv = net(x, mask, _draws((crop // 4, crop // 4)))
                (out.float().sum() + without_lfpv.float().sum()).backward()
        net.eval()
        with torch.no_grad():
            for h, w in eval_frames:
                x = torch.rand(1, 3, h, w, dtype=dtype)
                with autocast:
                    net(x, net.snr_mask(x))
    return records


def _signature(record: LaunchRecord) -> str:
    parts = []
    for a in record.args:
        if isinstance(a, TensorSpec):
            parts.append(str(a.dtype).replace("torch.", "*") + ("" if a.aligned else "(unaligned)"))
        elif isinstance(a, int):
            parts.append("1" if a == 1 else "i%16" if a % 16 == 0 else "i")
        else:
            parts.append(type(a).__name__)
    consts = ",".join(f"{k}={v}" for k, v in sorted(record.kwargs.items()))
    return f"({', '.join(parts)}) {consts}"


def distinct_launches(records: Iterable[LaunchRecord]) -> list[tuple[LaunchRecord, list[int]]]:
    """One record per distinct compile, with the largest grid seen for it (per dimension)."""
    found: dict[tuple[str, str], tuple[LaunchRecord, list[int]]] = {}
    for r in records:
        key = (r.kernel.fn.__qualname__, _signature(r))
        grid = list(r.grid) + [1] * (3 - len(r.grid))
        if key in found:
            found[key] = (found[key][0], [max(a, b) for a, b in zip(found[key][1], grid, strict=True)])
        else:
            found[key] = (r, grid)
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Compiling


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`, with the flags Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp, "k.o"))],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0,
            int(spill.group(2)) if spill else 0)


def compile_launch(record: LaunchRecord, target: Target) -> triton.compiler.CompiledKernel:
    """Compile one recorded launch for `target` exactly as `JITFunction.run` would on that GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    gpu = GPUTarget("cuda", target.arch, 32)
    backend = make_backend(gpu)
    kernel = record.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*record.args, **record.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, record.kwargs, bound_args, specialization,
                                                              options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def _picklable(record: LaunchRecord) -> LaunchRecord:
    # A JIT function pickles as its undecorated Python function: send its module and name instead.
    return dataclasses.replace(record, kernel=(record.kernel.fn.__module__, record.kernel.fn.__name__))


def _compile_one(job: tuple[LaunchRecord, list[int], Target, str]) -> CompileResult:
    record, grid, target, precision = job
    if isinstance(record.kernel, tuple):
        module, name = record.kernel
        record = dataclasses.replace(record, kernel=getattr(importlib.import_module(module), name))
    result = CompileResult(target.name, precision, record.name, record.kernel.fn.__name__, _signature(record), grid)
    start = time.perf_counter()
    try:
        compiled = compile_launch(record, target)
        result.shared = int(compiled.metadata.shared)
        result.registers, result.spill_stores, result.spill_loads = _ptxas_stats(compiled.asm["ptx"], target.arch)
    except Exception as exc:  # noqa: BLE001 - every failure is a finding of the gate, reported per launch
        result.error = f"does not compile: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    result.seconds = time.perf_counter() - start
    if result.error is None and result.shared > target.shared_memory:
        result.error = f"needs {result.shared} B of shared memory; {target.name} gives {target.shared_memory} B"
    for dim, (size, limit) in enumerate(zip(grid, _GRID_LIMITS, strict=True)):
        if size > limit:
            result.error = f"grid dimension {dim} is {size}, over CUDA's limit {limit}"
    return result


def run_gate(targets: list[Target], precisions: Iterable[str] = PRECISIONS, workers: int | None = None,
             train_shapes=TRAIN_SHAPES, eval_frames=EVAL_FRAMES, fp64: bool = True,
             log=print) -> list[CompileResult]:
    jobs = []
    for target in targets:
        scenarios = [(p, train_shapes, eval_frames) for p in precisions]
        if fp64:
            scenarios.append(("fp64", FP64_TRAIN_SHAPES, [(64, 64)]))
        for precision, shapes, frames in scenarios:
            launches = distinct_launches(record_scenario(target, precision, shapes, frames))
            jobs += [(record, grid, target, precision) for record, grid in launches]
    # The same compile is often needed by several precisions (float32 banks in "mix" and "fp32"):
    # compile each distinct (target, kernel, signature) once.
    unique: dict[tuple[str, str, str], tuple] = {}
    for job in jobs:
        unique.setdefault((job[2].name, job[0].kernel.fn.__qualname__, _signature(job[0])), job)
    log(f"compile gate: {len(jobs)} launches, {len(unique)} distinct compiles for "
        f"{', '.join(t.name for t in targets)}")
    workers = workers or min(len(unique), os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        jobs_out = [(_picklable(r), g, t, p) for r, g, t, p in unique.values()]
        compiled = dict(zip(unique, pool.map(_compile_one, jobs_out), strict=True))
    results = []
    for record, grid, target, precision in jobs:
        done = compiled[(target.name, record.kernel.fn.__qualname__, _signature(record))]
        results.append(dataclasses.replace(done, precision=precision, grid=grid))
    return results


# ---------------------------------------------------------------------------------------------
# Report


def markdown_table(results: list[CompileResult]) -> str:
    """One row per (target, kernel, precision): the worst shared memory, registers and spills over the
    launch's distinct compiles."""
    rows: dict[tuple[str, str, str], dict] = {}
    for r in results:
        row = rows.setdefault((r.target, r.kernel, r.precision), dict(shared=0, registers=0, spills=0, loads=0,
                                                                      compiles=set(), errors=[]))
        row["compiles"].add(r.signature)
        if r.ok:
            row["shared"] = max(row["shared"], r.shared)
            row["registers"] = max(row["registers"], r.registers)
            row["spills"] = max(row["spills"], r.spill_stores)
            row["loads"] = max(row["loads"], r.spill_loads)
        else:
            row["errors"].append(r.error)
    lines = ["| target | kernel | precision | compiles | shared memory (B) | registers | spill stores (B) "
             "| spill loads (B) | status |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (target, kernel, precision), row in sorted(rows.items()):
        status = "; ".join(sorted(set(row["errors"]))) or "ok"
        lines.append(f"| {target} | {kernel} | {precision} | {len(row['compiles'])} | {row['shared']} | "
                     f"{row['registers']} | {row['spills']} | {row['loads']} | {status} |")
    return "\n".join(lines) + "\n"


def _local_target() -> Target:
    if not torch.cuda.is_available():
        raise SystemExit("error: --targets local needs a CUDA device")
    from lfpv_fast.kernels._common import target_for

    return target_for(torch.device("cuda"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfpv_fast.kernels.compile_gate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm_90,sm_80",
                        help=f"comma-separated: {', '.join(TARGETS)} or 'local' (this machine's GPU)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--no-fp64", action="store_true", help="skip the float64 (test-only) launches")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--json", type=Path, help="write every compile result here")
    parser.add_argument("--markdown", type=Path, help="write the per-kernel table here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter replaces the kernels' JIT functions")
    targets = []
    for name in args.targets.split(","):
        if name == "local":
            targets.append(_local_target())
        elif name in TARGETS:
            targets.append(TARGETS[name])
        else:
            parser.error(f"--targets: unknown target {name!r}; expected {', '.join(TARGETS)} or 'local'")
    precisions = args.precisions.split(",")
    for p in precisions:
        if p not in PRECISIONS:
            parser.error(f"--precisions: unknown precision {p!r}; expected {', '.join(PRECISIONS)}")
    start = time.perf_counter()
    results = run_gate(targets, precisions, args.workers, fp64=not args.no_fp64)
    table = markdown_table(results)
    print(table)
    failed = [r for r in results if not r.ok]
    meta = dict(triton=triton.__version__, torch=torch.__version__, seconds=round(time.perf_counter() - start, 1),
                targets=[dataclasses.asdict(t) for t in targets], train_shapes=TRAIN_SHAPES, eval_frames=EVAL_FRAMES)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=[dataclasses.asdict(r) for r in results]), indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"# Compile gate, Triton {triton.__version__}\n\n"
                                 f"`python -m lfpv_fast.kernels.compile_gate`: every launch of a training step "
                                 f"(batch, crop) in {TRAIN_SHAPES} and of eval frames {EVAL_FRAMES}, compiled "
                                 f"ahead of time. Worst case per kernel over its distinct compiles.\n\n{table}")
    print(f"{len(results)} launches, {len(failed)} failed, {meta['seconds']} s")
    for r in failed:
        print(f"FAILED {r.target} {r.precision} {r.name}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
