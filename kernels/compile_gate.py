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
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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
# and norms. The model runs under CPU autocast (fake tensors live on the CPU), whose rules differ from
# CUDA's in one place that reaches the kernels: CUDA autocast runs LayerNorm in float32, so on a GPU the
# updated banks are float32 where CPU autocast leaves them bf16. The ops that then see other dtypes
# (query-and-fusion with bf16 features and float32 banks, forward and backward; the sample-updater's
# LayerNorm with a float32 result) are recorded once more with CUDA's dtypes.
PRECISIONS = ("fp32", "bf16", "fp16", "mix")
# float64 runs in the tests (golden parity on a GPU); recorded at the golden case's shape only.
FP64_TRAIN_SHAPES = [(2, 64)]
# The hot kernels (query-and-fusion, attention) are built in every precision. The rest (bank-update
# glue, the keys' LayerNorms, row sums, the SNR map: small copies and reductions, a few KB of shared
# memory at most) only in fp32, mix and fp64: their bf16 and fp16 builds differ only in loads and stores.
HOT_LAUNCHES = ("query_fusion_fwd", "query_fusion_bwd", "masked_attention", "ig_msa")
ALL_DTYPES_PRECISIONS = ("fp32", "mix", "fp64")
# The models whose shapes are built: the published SMID model (ModelConfig's defaults: C=64, head dim 64)
# in every precision, and the built-in demo (configs/demo.yaml: C=16, head dim 32) as it trains, in fp32
# and in bf16 autocast (train.bf16 on a GPU), at its crops and its held-out frames. "ig_msa": Retinexformer's
# channel attention at its three levels (lfpv_fast.kernels.ig_msa.ig_msa_launches: its own shapes and
# precisions).
MODELS = ("smid", "demo", "ig_msa")
DEMO_PRECISIONS = ("fp32", "mix")
DEMO_TRAIN_SHAPES = [(1, 128), (4, 128)]
DEMO_EVAL_FRAMES = [(192, 256), (512, 960)]


@dataclasses.dataclass
class CompileResult:
    target: str
    precision: str
    model: str  # whose shapes: "smid" (the published model) or "demo" (configs/demo.yaml)
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


def _model_config(model: str = "smid"):
    """The architecture whose shapes are built: "smid", the published model (ModelConfig's defaults), or
    "demo", the built-in demo's (configs/demo.yaml)."""
    from lfpv_fast.model import ModelConfig

    if model == "demo":
        from lfpv_fast.config import load_config

        return load_config("demo").model
    return ModelConfig()


def _draws(feature_hw: tuple[int, int], cfg):
    from lfpv_fast.model import BankDraws

    return BankDraws.sample(feature_hw, cfg.bank_size, cfg.patch_size, torch.Generator().manual_seed(0))


def _model_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "mix": torch.float32,
            "fp64": torch.float64}[precision]


def record_scenario(target: Target, precision: str, train_shapes: Iterable[tuple[int, int]],
                    eval_frames: Iterable[tuple[int, int]], model: str = "smid") -> list[LaunchRecord]:
    """The launches of one training step (forward + backward) per (batch, crop) and one eval forward per
    (height, width) frame of `model`'s architecture, in `precision`, configured for `target`."""
    if model == "ig_msa":
        from lfpv_fast.kernels.ig_msa import ig_msa_launches

        return ig_msa_launches(target, precision)
    from lfpv_fast.model import LFPVNet

    config = _model_config(model)
    dtype = _model_dtype(precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "mix")
    with FakeTensorMode(allow_non_fake_inputs=True), record_launches(target) as records:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the dtype: fake parameters cannot be converted by .to()
        try:
            net = LFPVNet(config, backend="triton")
        finally:
            torch.set_default_dtype(default)
        for batch, crop in train_shapes:
            net.train()
            x = torch.rand(batch, 3, crop, crop, dtype=dtype)
            with autocast:
                mask = net.snr_mask(x)  # the trainer computes it from the input batch, no gradient
                out, without_lfpv = net(x, mask, _draws((crop // 4, crop // 4), config))
                (out.float().sum() + without_lfpv.float().sum()).backward()
        net.eval()
        with torch.no_grad():
            for h, w in eval_frames:
                x = torch.rand(1, 3, h, w, dtype=dtype)
                with autocast:
                    net(x, net.snr_mask(x))
        if precision == "mix":
            for batch, crop in train_shapes:
                _record_cuda_autocast_ops(net, batch, crop // 4)
        if precision == "fp32":
            # The SNR map's backward: never needed in training (the map is computed from the input),
            # so built in float32 only.
            for batch, crop in train_shapes:
                x = torch.rand(batch, 3, crop, crop, requires_grad=True)
                net.snr_mask(x).sum().backward()
    return records


def _record_cuda_autocast_ops(net, batch: int, side: int) -> None:
    """The launches whose dtypes differ under CUDA's bf16 autocast from CPU's (see "mix" above)."""
    from lfpv_fast.kernels import bank_update, query_fusion

    lfpv = net.lfpv
    features = torch.rand(batch, net.config.nf, side, side, dtype=torch.bfloat16, requires_grad=True)
    out = query_fusion.query_fusion(features, net.bank_vectors.requires_grad_(True),
                                    net.bank_patches.requires_grad_(True), *(
                                        (norm.weight, norm.bias) for norm in (lfpv.pixel_query_norm,
                                                                              lfpv.vector_key_norm,
                                                                              lfpv.patch_query_norm,
                                                                              lfpv.patch_key_norm)))
    out.float().sum().backward()
    updates = torch.rand(net.config.bank_size * batch, net.config.nf, dtype=torch.bfloat16, requires_grad=True)
    norm = lfpv.sample_vector_norm
    mean = bank_update._batch_mean_layer_norm_op(updates, batch, norm.weight, norm.bias, norm.eps, torch.float32)
    mean.sum().backward()


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


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Capture what this process writes to file descriptor 2 (the compiler's C++ back end prints its
    assertion failures there, and raises only "PassManager::run failed"); yields a reader of it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lambda: (capture.seek(0), capture.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def compile_error(exc: BaseException, stderr: str = "") -> str:
    """One line that says why a compile failed: the innermost error and where in the kernel source.

    Triton's CompilationError shows the failing source line above a "^" line and chains the error of a
    called @triton.jit function as its cause, down to the real error (e.g. an AssertionError of `tl.dot`),
    so its own last line is often just "^". Back-end failures print their cause (an MLIR error, an
    assertion) to stderr and raise "PassManager::run failed": the first such line of `stderr` is added."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    places, root = [], None
    for e in chain:
        lines = str(e).strip().splitlines()
        if type(e).__name__ != "CompilationError":
            root = f"{type(e).__name__}: {lines[-1] if lines else ''}"
            continue
        carets = [i for i, line in enumerate(lines) if line.strip() == "^"]
        if carets and carets[-1] > 0:
            where = lines[0].removeprefix("at ").rstrip(":")
            places.append(f"{where} `{lines[carets[-1] - 1].strip()}`")
            if carets[-1] + 1 < len(lines):  # the innermost CompilationError carries the message itself
                root = f"CompilationError: {' '.join(lines[carets[-1] + 1:])}"
    if root is None:
        root = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    causes = [line.strip() for line in stderr.splitlines()
              if "Assertion" in line or "error:" in line or "LLVM ERROR" in line]
    text = root
    if causes:
        text += f" [{causes[0]}]"
    if places:
        text += " at " + " <- ".join(reversed(places))  # innermost first
    return text[:600]


def _compile_one(job: tuple[LaunchRecord, list[int], Target, str, str]) -> CompileResult:
    record, grid, target, precision, model = job
    if isinstance(record.kernel, tuple):
        module, name = record.kernel
        record = dataclasses.replace(record, kernel=getattr(importlib.import_module(module), name))
    result = CompileResult(target.name, precision, model, record.name, record.kernel.fn.__name__,
                           _signature(record), grid)
    start = time.perf_counter()
    with _stderr_captured() as stderr:
        try:
            compiled = compile_launch(record, target)
            result.shared = int(compiled.metadata.shared)
            result.registers, result.spill_stores, result.spill_loads = _ptxas_stats(compiled.asm["ptx"],
                                                                                     target.arch)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding of the gate, reported per launch
            result.error = f"does not compile: {compile_error(exc, stderr())}"
    result.seconds = time.perf_counter() - start
    if result.error is None and result.shared > target.shared_memory:
        # (Still "compiled": the row shows how much it asks for.)
        result.error = f"needs {result.shared} B of shared memory; {target.name} gives {target.shared_memory} B"
    for dim, (size, limit) in enumerate(zip(grid, _GRID_LIMITS, strict=True)):
        if size > limit:
            result.error = f"grid dimension {dim} is {size}, over CUDA's limit {limit}"
    return result


def _compile_all(jobs: list[tuple], workers: int) -> list[CompileResult]:
    """_compile_one of every job in worker processes. A compile that kills its worker (a back-end abort)
    breaks the pool and every compile in flight with it: those are retried one at a time, each in a
    fresh worker, and the one that kills its worker again is reported as a crash."""
    results: list[CompileResult | None] = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_compile_one, job) for job in jobs]
        for i, future in enumerate(futures):
            try:
                results[i] = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                pass
    for i, job in enumerate(jobs):
        if results[i] is None:
            try:
                with concurrent.futures.ProcessPoolExecutor(1) as pool:
                    results[i] = pool.submit(_compile_one, job).result()
            except concurrent.futures.process.BrokenProcessPool:
                record, grid, target, precision, model = job
                results[i] = CompileResult(target.name, precision, model, record.name, record.kernel[1],
                                           _signature(record), grid,
                                           error="does not compile: the compiler crashed (its process died)")
    return results


def scenarios(precisions: Iterable[str] = PRECISIONS, fp64: bool = True,
              models: Iterable[str] = MODELS) -> list[tuple[str, str, list, list]]:
    """(model, precision, training shapes, eval frames) of every recording the gate makes."""
    out = []
    for model in models:
        if model == "smid":
            out += [("smid", p, TRAIN_SHAPES, EVAL_FRAMES) for p in precisions]
            if fp64:
                out.append(("smid", "fp64", FP64_TRAIN_SHAPES, [(64, 64)]))
        elif model == "ig_msa":
            from lfpv_fast.kernels.ig_msa import GATE_EVAL_FRAMES, GATE_PRECISIONS, GATE_TRAIN_CROPS

            wanted = [*precisions, *(("fp64",) if fp64 else ())]
            out += [("ig_msa", p, GATE_TRAIN_CROPS, GATE_EVAL_FRAMES) for p in GATE_PRECISIONS if p in wanted]
        else:
            out += [("demo", p, DEMO_TRAIN_SHAPES, DEMO_EVAL_FRAMES) for p in precisions if p in DEMO_PRECISIONS]
    return out


def run_gate(targets: list[Target], precisions: Iterable[str] = PRECISIONS, workers: int | None = None,
             fp64: bool = True, models: Iterable[str] = MODELS, log=print) -> list[CompileResult]:
    jobs = []
    for target in targets:
        for model, precision, shapes, frames in scenarios(precisions, fp64, models):
            records = record_scenario(target, precision, shapes, frames, model)
            if precision not in ALL_DTYPES_PRECISIONS:
                records = [r for r in records if r.name.startswith(HOT_LAUNCHES)]
            launches = distinct_launches(records)
            jobs += [(record, grid, target, precision, model) for record, grid in launches]
    # The same compile is often needed by several precisions (float32 banks in "mix" and "fp32"):
    # compile each distinct (target, kernel, signature) once.
    unique: dict[tuple[str, str, str], tuple] = {}
    for job in jobs:
        unique.setdefault((job[2].name, job[0].kernel.fn.__qualname__, _signature(job[0])), job)
    log(f"compile gate: {len(jobs)} launches, {len(unique)} distinct compiles for "
        f"{', '.join(t.name for t in targets)}")
    workers = workers or min(len(unique), os.cpu_count() or 1)
    compiled = dict(zip(unique, _compile_all([(_picklable(r), g, t, p, m) for r, g, t, p, m in unique.values()],
                                             workers), strict=True))
    results = []
    for record, grid, target, precision, model in jobs:
        done = compiled[(target.name, record.kernel.fn.__qualname__, _signature(record))]
        results.append(dataclasses.replace(done, precision=precision, model=model, grid=grid))
    return results


# ---------------------------------------------------------------------------------------------
# Report


def summarize(results: list[CompileResult]) -> dict:
    """The gate's verdict in numbers: launches, failures by kind, and every launch that spills (worst
    compile per target, model, precision and kernel)."""
    failed = [r for r in results if not r.ok]
    spills: dict[tuple[str, str, str, str], dict] = {}
    for r in results:
        if r.spill_stores or r.spill_loads:
            key = (r.target, r.model, r.precision, r.kernel)
            worst = spills.get(key)
            if worst is None or (r.spill_stores, r.spill_loads) > (worst["spill_stores"], worst["spill_loads"]):
                spills[key] = dict(target=r.target, model=r.model, precision=r.precision, kernel=r.kernel,
                                   spill_stores=r.spill_stores, spill_loads=r.spill_loads, registers=r.registers)
    return dict(launches=len(results), distinct_compiles=len({(r.target, r.kernel, r.signature) for r in results}),
                failed=len(failed),
                does_not_compile=sum(r.error.startswith("does not compile") for r in failed),
                over_shared_memory=sum(r.error.startswith("needs") for r in failed),
                over_grid_limits=sum(r.error.startswith("grid") for r in failed),
                launches_with_spills=sum(bool(r.spill_stores or r.spill_loads) for r in results),
                spills=[spills[k] for k in sorted(spills)])


def markdown_table(results: list[CompileResult]) -> str:
    """One row per (target, model, kernel, precision): the worst shared memory, registers and spills over
    the launch's distinct compiles."""
    rows: dict[tuple[str, str, str, str], dict] = {}
    for r in results:
        row = rows.setdefault((r.target, r.model, r.kernel, r.precision),
                              dict(shared=0, registers=0, spills=0, loads=0, compiles=set(), errors=[]))
        row["compiles"].add(r.signature)
        if r.shared is not None:  # compiled (it may still have failed the gate: over shared memory)
            row["shared"] = max(row["shared"], r.shared)
            row["registers"] = max(row["registers"], r.registers)
            row["spills"] = max(row["spills"], r.spill_stores)
            row["loads"] = max(row["loads"], r.spill_loads)
        if not r.ok:
            row["errors"].append(r.error)
    lines = ["| target | model | kernel | precision | compiles | shared memory (B) | registers | spill stores (B) "
             "| spill loads (B) | status |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (target, model, kernel, precision), row in sorted(rows.items()):
        status = "; ".join(sorted(set(row["errors"]))) or "ok"
        lines.append(f"| {target} | {model} | {kernel} | {precision} | {len(row['compiles'])} | {row['shared']} | "
                     f"{row['registers']} | {row['spills']} | {row['loads']} | {status} |")
    return "\n".join(lines) + "\n"


def markdown_report(results: list[CompileResult], meta: dict) -> str:
    """The per-version report: the verdict, the spills, the shapes built, then the per-kernel table."""
    s = meta["summary"]
    spill_lines = ["none"] if not s["spills"] else [
        "| target | model | precision | kernel | spill stores (B) | spill loads (B) | registers |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
        *(f"| {x['target']} | {x['model']} | {x['precision']} | {x['kernel']} | {x['spill_stores']} | "
          f"{x['spill_loads']} | {x['registers']} |" for x in s["spills"])]
    shapes = "\n".join(f"- {m}, {p}: training (batch, crop) {list(map(tuple, t))}, eval frames {list(map(tuple, e))}"
                       for m, p, t, e in meta["scenarios"])
    return (f"# Compile gate, Triton {meta['triton']}\n\n"
            f"{meta['date']}, torch {meta['torch']}, {meta['machine']}; "
            f"`python -m lfpv_fast.kernels.compile_gate` took {meta['seconds']} s.\n\n"
            f"**{s['launches']} launches ({s['distinct_compiles']} distinct compiles) for "
            f"{', '.join(t['name'] for t in meta['targets'])}: {s['failed']} failed "
            f"({s['does_not_compile']} do not compile, {s['over_shared_memory']} over shared memory, "
            f"{s['over_grid_limits']} over CUDA's grid limits); {s['launches_with_spills']} launches spill "
            f"registers.** Expected exclusions: none (every launch of every precision, float64 included, "
            f"is built).\n\n"
            f"## Spills (worst compile per kernel)\n\n" + "\n".join(spill_lines) + "\n\n"
            f"## Shapes recorded\n\n{shapes}\n\n"
            f"## Every kernel (worst case over its distinct compiles)\n\n{markdown_table(results)}")


def _local_target() -> Target:
    if not torch.cuda.is_available():
        raise SystemExit("error: --targets local needs a CUDA device")
    from lfpv_fast.kernels._common import target_for

    return target_for(torch.device("cuda"))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfpv_fast.kernels.compile_gate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm_90,sm_80",
                        help=f"comma-separated: {', '.join(TARGETS)} or 'local' (this machine's GPU)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--models", default=",".join(MODELS),
                        help="whose shapes: smid (the published model), demo (configs/demo.yaml)")
    parser.add_argument("--no-fp64", action="store_true", help="skip the float64 (test-only) launches")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--json", type=Path, help="write every compile result and the summary here")
    parser.add_argument("--markdown", type=Path, help="write the report (summary, spills, per-kernel table) here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter replaces the kernels' JIT functions")
    # Triton 3.9 warns that its default (fused multiply-adds allowed) changes in 3.10: build with the
    # default the kernels run with today, and say so explicitly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
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
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; expected {', '.join(MODELS)}")
    start = time.perf_counter()
    results = run_gate(targets, precisions, args.workers, fp64=not args.no_fp64, models=models)
    meta = dict(triton=triton.__version__, torch=torch.__version__, seconds=round(time.perf_counter() - start, 1),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=_machine(),
                targets=[dataclasses.asdict(t) for t in targets],
                scenarios=scenarios(precisions, not args.no_fp64, models), summary=summarize(results))
    report = markdown_report(results, meta)
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=[dataclasses.asdict(r) for r in results]), indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    s = meta["summary"]
    print(f"Triton {triton.__version__}: {s['launches']} launches, {s['failed']} failed, "
          f"{s['over_shared_memory']} over shared memory, {s['launches_with_spills']} spill, {meta['seconds']} s")
    for r in results:
        if not r.ok:
            print(f"FAILED {r.target} {r.model} {r.precision} {r.name}: {r.error}", file=sys.stderr)
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
