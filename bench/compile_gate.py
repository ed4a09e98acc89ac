"""The compile gate: every Triton launch of a training step and of an eval frame, compiled ahead of time
for GPUs that need not be here, checked against their shared memory, with registers and spills.

    python bench/compile_gate.py                                     # sm_90 and sm_80, the venv's Triton
    python bench/compile_gate.py --also-triton .venv/triton-3.6.0    # and another Triton, in the same run
    python bench/compile_gate.py --out bench/results                 # compile-triton-VERSION.{json,md} there
    python bench/compile_gate.py --targets local                     # the CUDA card of this machine

What it builds: the launch sets in LAUNCH_SETS, one per model or op family (see "Launch sets" below: the
published SMID model, the built-in demo, the LFPV plug-in at Retinexformer's sites, ...). Each set's
recorder runs its ops once per precision on fake tensors (torch's FakeTensorMode: shapes and dtypes, no
memory, no GPU) under `lfpv_fast.kernels._common.record_launches`, which configures every launch for
the target and records it instead of running it.

How: launches are recorded once, with the venv's Triton, and reduced to their distinct specialisations:
two launches compile to the same kernel when they share the kernel, the constexprs and launch options,
the argument dtypes and alignments and, for integer arguments Triton specialises, whether they are 1 or
a multiple of 16 (`specialization_key`, checked against Triton's own binder by the tests). Each distinct
specialisation is compiled once per target and Triton version, by Triton's own compiler (`ASTSource` +
`triton.compile(target=GPUTarget("cuda", arch, 32))`, bound by the same binder and options
`JITFunction.run` uses); the `ptxas -v` log of that compile (the ptxas shipped with that Triton) gives
registers and spills. Each
Triton version compiles in its own process (a process imports one Triton), all of them at once, the CPUs
split between them. A launch fails the gate when it does not compile, needs more shared memory than the
card gives one program, or has a grid beyond CUDA's limits.

Must run without TRITON_INTERPRET (the interpreter replaces the JIT functions): the tests run it in a
subprocess. Compiled kernels are cached by Triton (~/.triton/cache or TRITON_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import json
import os
import pickle
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
from lfpv_fast.kernels.runtime import interpreting

ROOT = Path(__file__).resolve().parents[1]

# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65535.
_GRID_LIMITS = (2**31 - 1, 65535, 65535)

# "mix" is bf16 autocast over a float32 model: bf16 features, q/k/v and updater outputs, float32 banks
# and norms (see the recorders for where CPU and CUDA autocast differ).
PRECISIONS = ("fp32", "bf16", "fp16", "mix", "fp64")
# The hot kernels (query-and-fusion, attention) are built in every precision a set asks for. The rest
# (bank-update glue, the keys' LayerNorms, row sums, the SNR map: small copies and reductions, a few KB
# of shared memory at most) only in fp32, mix and fp64: their bf16 and fp16 builds differ only in loads
# and stores.
HOT_LAUNCHES = ("query_fusion_fwd", "query_fusion_bwd", "masked_attention", "ig_msa")
ALL_DTYPES_PRECISIONS = ("fp32", "mix", "fp64")


@dataclasses.dataclass
class CompileResult:
    target: str
    precision: str
    model: str  # the launch set (LAUNCH_SETS) whose shapes these are, e.g. "smid", "retinexformer"
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
# Launch sets: how an op registers its launches.
#
# A launch set is a function that runs some ops once in a precision, on fake tensors; the gate calls it
# inside FakeTensorMode and `record_launches(target)`, once per (target, precision). Register one with
# `@launch_set(name, precisions, shapes)`: `shapes` says in words what it records (for the report).
# A new op adds its own set (e.g. its launches at the sizes of the networks that use it); nothing else
# in the gate changes.


@dataclasses.dataclass(frozen=True)
class LaunchSet:
    name: str
    precisions: tuple[str, ...]
    record: Callable[[str], None]  # record(precision): runs the ops (the launches are recorded)
    shapes: str


LAUNCH_SETS: dict[str, LaunchSet] = {}


def launch_set(name: str, precisions: Iterable[str], shapes: str) -> Callable[[Callable[[str], None]],
                                                                               Callable[[str], None]]:
    """Register `record(precision)` as the launch set `name`, built in `precisions`."""
    def register(record: Callable[[str], None]) -> Callable[[str], None]:
        if name in LAUNCH_SETS:
            raise ValueError(f"compile gate: launch set {name!r} is registered twice")
        for p in precisions:
            if p not in PRECISIONS:
                raise ValueError(f"compile gate: launch set {name!r}: unknown precision {p!r}")
        LAUNCH_SETS[name] = LaunchSet(name, tuple(precisions), record, shapes)
        return record
    return register


def _dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "mix": torch.float32,
            "fp64": torch.float64}[precision]


# --- The SMID model and the built-in demo (the whole LFPVNet: every op of a training step and a frame)

# Training shapes (batch, crop) and eval frames (height, width). Shapes enter the kernels as runtime
# integers, so these corners cover every specialization Triton makes (1, multiples of 16, others) and
# the extremes of every grid.
TRAIN_SHAPES = [(1, 128), (1, 512), (12, 256), (32, 128), (32, 512)]
EVAL_FRAMES = [(512, 960), (1024, 1920)]
# float64 runs in the tests (golden parity on a GPU); recorded at the golden case's shape only.
FP64_TRAIN_SHAPES = [(2, 64)]
FP64_EVAL_FRAMES = [(64, 64)]
# The built-in demo (configs/demo.yaml: C=16, head dim 32) as it trains, in fp32 and in bf16 autocast
# (train.bf16 on a GPU), at its crops and its held-out frames.
DEMO_TRAIN_SHAPES = [(1, 128), (4, 128)]
DEMO_EVAL_FRAMES = [(192, 256), (512, 960)]


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


def record_model(precision: str, train_shapes: Iterable[tuple[int, int]], eval_frames: Iterable[tuple[int, int]],
                 model: str = "smid") -> None:
    """The launches of one training step (forward + backward) per (batch, crop) and one eval forward per
    (height, width) frame of `model`'s architecture, in `precision` (inside FakeTensorMode and
    record_launches).

    The model runs under CPU autocast (fake tensors live on the CPU), whose rules differ from CUDA's in
    one place that reaches the kernels: CUDA autocast runs LayerNorm in float32, so on a GPU the updated
    banks are float32 where CPU autocast leaves them bf16. The ops that then see other dtypes
    (query-and-fusion with bf16 features and float32 banks, forward and backward; the sample-updater's
    LayerNorm with a float32 result) are recorded once more with CUDA's dtypes."""
    from lfpv_fast.model import LFPVNet

    config = _model_config(model)
    dtype = _dtype(precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "mix")
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


def _record_cuda_autocast_ops(net, batch: int, side: int) -> None:
    """The launches whose dtypes differ under CUDA's bf16 autocast from CPU's (see record_model)."""
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


@launch_set("smid", PRECISIONS,
            f"the published model (ModelConfig's defaults: C=64, head dim 64): training (batch, crop) "
            f"{TRAIN_SHAPES}, eval frames {EVAL_FRAMES}; fp64 at {FP64_TRAIN_SHAPES}, {FP64_EVAL_FRAMES}")
def _smid(precision: str) -> None:
    if precision == "fp64":
        record_model(precision, FP64_TRAIN_SHAPES, FP64_EVAL_FRAMES, "smid")
    else:
        record_model(precision, TRAIN_SHAPES, EVAL_FRAMES, "smid")


@launch_set("demo", ("fp32", "mix"),
            f"configs/demo.yaml (C=16, head dim 32): training (batch, crop) {DEMO_TRAIN_SHAPES}, "
            f"eval frames {DEMO_EVAL_FRAMES}")
def _demo(precision: str) -> None:
    record_model(precision, DEMO_TRAIN_SHAPES, DEMO_EVAL_FRAMES, "demo")


# --- The LFPV plug-in at another network's sites (query-and-fusion and the bank updates, op by op)


@dataclasses.dataclass(frozen=True)
class PluginSite:
    """Where LFPVs attach: a (B, C, H/stride, W/stride) feature map of a backbone."""

    channels: int
    stride: int
    bank_size: int = 16
    patch_size: int = 4


def record_lfpv_site(precision: str, site: PluginSite, train: Iterable[int], frames: Iterable[tuple[int, int]],
                     batches: Iterable[int], all_reduce: bool = False) -> None:
    """The plug-in's launches at `site`: per training crop (side) and batch, the sample-updater's inputs
    (gathered from the features), the batch-mean LayerNorms of the updaters' outputs (and, with
    `all_reduce`, the DDP variant: mean, all-reduce, LayerNorm), the mutual-updater's inputs and
    query-and-fusion, each forward and backward; per eval frame (height, width), padded to whole patches
    at the site as the backbone pads its input, query-and-fusion forward with the stored banks.

    dtypes as on a GPU: "fp32" all float32; "mix" (CUDA bf16 autocast) bf16 features and updater outputs
    (conv outputs), float32 parameters, embeddings and banks (CUDA autocast runs LayerNorm in float32, so
    the updated banks are float32 too)."""
    from lfpv_fast.kernels import bank_update, ops

    c, n, p = site.channels, site.bank_size, site.patch_size
    feature_dtype = torch.bfloat16 if precision == "mix" else _dtype(precision)
    param = torch.float32 if precision == "mix" else feature_dtype

    def leaf(*shape, dtype=param):
        return torch.rand(*shape, dtype=dtype, requires_grad=True)

    def norm(*shape):
        return leaf(*shape), leaf(*shape)

    positions = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    partners = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for side in train:
        h = w = side // site.stride
        for batch in batches:
            features = leaf(batch, c, h, w, dtype=feature_dtype)
            banks = leaf(n, c), leaf(n, c, p, p)
            embedding = leaf(n, c)
            vector_in, patch_in = ops.sample_updater_inputs_from_features(features, *positions, *banks, embedding)
            (vector_in.float().sum() + patch_in.float().sum()).backward()
            for shape in [(c,), (c, p, p)]:
                updates = leaf(n * batch, *shape, dtype=feature_dtype)
                new = bank_update._batch_mean_layer_norm_op(updates, batch, *norm(*shape), 1e-5, param)
                new.float().sum().backward()
                if all_reduce:
                    ops.batch_mean_layer_norm(updates, batch, norm(*shape), lambda mean: mean).float().sum().backward()
            vector_in, patch_in = ops.mutual_updater_inputs(*banks, *partners, embedding)
            (vector_in.float().sum() + patch_in.float().sum()).backward()
            ops.query_fusion(features, *banks, norm(c), norm(c), norm(c * p * p), norm(c * p * p)).float().sum() \
                .backward()
    with torch.no_grad():
        banks = torch.rand(n, c, dtype=param), torch.rand(n, c, p, p, dtype=param)
        norms = [(torch.rand(d, dtype=param), torch.rand(d, dtype=param)) for d in (c, c, c * p * p, c * p * p)]
        align = site.stride * p  # the backbone pads its input to this (whole patches at the site)
        for height, width in frames:
            features = torch.rand(1, c, -(-height // align) * align // site.stride,
                                  -(-width // align) * align // site.stride, dtype=feature_dtype)
            ops.query_fusion(features, *banks, *norms)


# Retinexformer (n_feat=40, the published presets): LFPVs at its bottleneck (160 channels, 1/4 scale; the
# default site) or at its other levels (80 at 1/2, 40 at full scale), at a 128x128 training crop (batch 1,
# and 8 as its presets train) and a 1024x1920 eval frame. The bottleneck also at LOL's 400x600 frames
# (padded to 400x608; at 1/4 scale 100x152, no multiple of 16) and with the DDP all-reduce variant.
RETINEXFORMER_SITES = [PluginSite(160, 4), PluginSite(80, 2), PluginSite(40, 1)]
RETINEXFORMER_TRAIN = [128]
RETINEXFORMER_BATCHES = [1, 8]
RETINEXFORMER_FRAMES = [(1024, 1920)]
RETINEXFORMER_BOTTLENECK_FRAMES = [(1024, 1920), (400, 600)]
# The demo Retinexformer (configs/demo_retinexformer.yaml, n_feat 16): its bottleneck, 4 * n_feat = 64 channels at
# 1/4 scale, and half that width (a smaller demo), at the demo's crop and frames.
RETINEXFORMER_DEMO_SITES = [PluginSite(64, 4)]  # configs/demo_retinexformer.yaml: n_feat 16, bottleneck 4 x 16
RETINEXFORMER_DEMO_TRAIN = [128]
RETINEXFORMER_DEMO_BATCHES = [4]


def _sites(sites: list[PluginSite]) -> str:
    return ", ".join(f"C={s.channels} stride {s.stride}" for s in sites)


@launch_set("retinexformer", ("fp32", "mix"),
            f"the LFPV plug-in at Retinexformer's sites ({_sites(RETINEXFORMER_SITES)}; banks of 16, patches of "
            f"4): training crops {RETINEXFORMER_TRAIN} at batches {RETINEXFORMER_BATCHES}, eval frames "
            f"{RETINEXFORMER_FRAMES}; the bottleneck also at {RETINEXFORMER_BOTTLENECK_FRAMES[1:]} and with DDP's "
            f"all-reduce")
def _retinexformer(precision: str) -> None:
    for site in RETINEXFORMER_SITES:
        bottleneck = site == RETINEXFORMER_SITES[0]
        record_lfpv_site(precision, site, RETINEXFORMER_TRAIN,
                         RETINEXFORMER_BOTTLENECK_FRAMES if bottleneck else RETINEXFORMER_FRAMES,
                         RETINEXFORMER_BATCHES, all_reduce=bottleneck)


@launch_set("retinexformer-demo", ("fp32", "mix"),
            f"the LFPV plug-in at the demo Retinexformer's bottleneck ({_sites(RETINEXFORMER_DEMO_SITES)}): "
            f"training crops {RETINEXFORMER_DEMO_TRAIN} at batches {RETINEXFORMER_DEMO_BATCHES}, eval frames "
            f"{DEMO_EVAL_FRAMES}")
def _retinexformer_demo(precision: str) -> None:
    for site in RETINEXFORMER_DEMO_SITES:
        record_lfpv_site(precision, site, RETINEXFORMER_DEMO_TRAIN, DEMO_EVAL_FRAMES, RETINEXFORMER_DEMO_BATCHES)


# --- Retinexformer's channel attention (IG-MSA) at its three levels: (stride, channels, heads), head dim 40.
IG_MSA_LEVELS = ((1, 40, 1), (2, 80, 2), (4, 160, 4))
IG_MSA_TRAIN = [(1, 128), (8, 128)]  # (batch, crop side): forward and backward
IG_MSA_FRAMES = [(1024, 1920)]  # eval frames: forward


@launch_set("ig_msa", ("fp32", "bf16", "fp64"),
            f"Retinexformer's IG-MSA at strides/channels/heads {IG_MSA_LEVELS}: training crops {IG_MSA_TRAIN} "
            f"forward and backward (fp64: the first crop only, as the tests use it), eval frames {IG_MSA_FRAMES} "
            "forward; bf16 is also what autocast gives (the op casts to it)")
def _ig_msa(precision: str) -> None:
    from lfpv_fast.kernels.ig_msa import ig_msa

    dtype = _dtype(precision)
    crops = IG_MSA_TRAIN[:1] if precision == "fp64" else IG_MSA_TRAIN
    frames = [] if precision == "fp64" else IG_MSA_FRAMES
    cases = [((b, s, s), True) for b, s in crops] + [((1, h, w), False) for h, w in frames]
    for (batch, height, width), train in cases:
        for stride, channels, heads in IG_MSA_LEVELS:
            shape = (batch, (height // stride) * (width // stride), channels)
            tensors = [torch.empty(shape, dtype=dtype, requires_grad=train) for _ in range(4)]
            rescale = torch.ones(heads, 1, 1, dtype=torch.float64 if precision == "fp64" else torch.float32,
                                 requires_grad=train)
            out = ig_msa(*tensors, rescale, heads)
            if train:
                out.sum().backward()


# ---------------------------------------------------------------------------------------------
# Recording and distinct specialisations


def record(target: Target, set_name: str, precision: str) -> list[LaunchRecord]:
    """The launches of one launch set in one precision, configured for `target`, on fake tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True), record_launches(target) as records:
        LAUNCH_SETS[set_name].record(precision)
    if precision not in ALL_DTYPES_PRECISIONS:
        records = [r for r in records if r.name.startswith(HOT_LAUNCHES)]
    return records


def record_scenario(target: Target, precision: str, train_shapes: Iterable[tuple[int, int]],
                    eval_frames: Iterable[tuple[int, int]], model: str = "smid") -> list[LaunchRecord]:
    """record_model's launches at the shapes given (tests: one model at small shapes)."""
    with FakeTensorMode(allow_non_fake_inputs=True), record_launches(target) as records:
        record_model(precision, train_shapes, eval_frames, model)
    return records


def _signature(record: LaunchRecord) -> str:
    """The launch as compiled, readably: argument dtypes (and 16-byte alignment), integer
    specialisations (1, a multiple of 16 "i%16", other or unspecialised "i") and constexprs."""
    parts = []
    for param, a in zip(record.kernel.params, record.args, strict=False):
        if isinstance(a, TensorSpec):
            parts.append(str(a.dtype).replace("torch.", "*") + ("" if a.aligned else "(unaligned)"))
        elif isinstance(a, bool):
            parts.append(str(a))
        elif isinstance(a, int):
            parts.append("i" if param.do_not_specialize else "1" if a == 1 else "i%16" if a % 16 == 0 else "i")
        else:
            parts.append(type(a).__name__)
    consts = ",".join(f"{k}={v}" for k, v in sorted(record.kwargs.items()))
    return f"({', '.join(parts)}) {consts}"


def specialization_key(record: LaunchRecord) -> tuple[str, str]:
    """Launches with the same key compile to the same kernel: Triton specialises an integer argument on
    == 1 and divisibility by 16 unless the kernel marks it `do_not_specialize`, a pointer on its dtype
    and 16-byte alignment, and compiles per constexpr value and launch option (Triton 3.6 and 3.9 alike:
    tests/test_compile_gate.py checks it against Triton's binder)."""
    return record.kernel.fn.__qualname__, _signature(record)


def distinct_launches(records: Iterable[LaunchRecord]) -> list[tuple[LaunchRecord, list[int]]]:
    """One record per distinct specialisation, with the largest grid seen for it (per dimension)."""
    found: dict[tuple[str, str], tuple[LaunchRecord, list[int]]] = {}
    for r in records:
        key = specialization_key(r)
        grid = list(r.grid) + [1] * (3 - len(r.grid))
        if key in found:
            found[key] = (found[key][0], [max(a, b) for a, b in zip(found[key][1], grid, strict=True)])
        else:
            found[key] = (r, grid)
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Compiling


def _ptxas_numbers(log: str) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from a `ptxas -v` log; None when it has none."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(regs.group(1)), int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from our own `ptxas -v` run, with the flags Triton
    uses: for a kernel Triton took from its cache (it ran no ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp, "k.o"))],
                              capture_output=True, text=True, check=True)
    return _ptxas_numbers(proc.stdout + proc.stderr) or (-1, 0, 0)


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


def _compile_one(job: tuple[LaunchRecord, Target]) -> CompileResult:
    """Compile one distinct launch for its target with this process's Triton (no verdict yet)."""
    record, target = job
    if isinstance(record.kernel, tuple):
        module, name = record.kernel
        record = dataclasses.replace(record, kernel=getattr(importlib.import_module(module), name))
    result = CompileResult(target.name, "", "", record.name, record.kernel.fn.__name__, _signature(record),
                           list(record.grid))
    # Triton runs `ptxas -v` itself and prints its log with this knob: registers and spills without a
    # second ptxas run (about a tenth of a compile).
    triton.knobs.nvidia.dump_ptxas_log = True
    start = time.perf_counter()
    with _stderr_captured() as stderr:
        try:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                compiled = compile_launch(record, target)
            result.shared = int(compiled.metadata.shared)
            result.registers, result.spill_stores, result.spill_loads = (
                _ptxas_numbers(printed.getvalue()) or _ptxas_stats(compiled.asm["ptx"], target.arch))
        except Exception as exc:  # noqa: BLE001 - every failure is a finding of the gate, reported per launch
            result.error = f"does not compile: {compile_error(exc, stderr())}"
    result.seconds = time.perf_counter() - start
    return result


def verdict(compiled: CompileResult, target: Target, grid: list[int], precision: str, model: str) -> CompileResult:
    """One launch's row: its compile, failed where it needs more shared memory than `target` gives one
    program or its grid is beyond CUDA's limits."""
    result = dataclasses.replace(compiled, precision=precision, model=model, grid=grid)
    if result.error is None and result.shared > target.shared_memory:
        # (Still "compiled": the row shows how much it asks for.)
        result.error = f"needs {result.shared} B of shared memory; {target.name} gives {target.shared_memory} B"
    for dim, (size, limit) in enumerate(zip(grid, _GRID_LIMITS, strict=True)):
        if size > limit:
            result.error = f"grid dimension {dim} is {size}, over CUDA's limit {limit}"
    return result


def _compile_all(jobs: list[tuple[LaunchRecord, Target]], workers: int) -> list[CompileResult]:
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
                record, target = job
                results[i] = CompileResult(target.name, "", "", record.name, record.kernel[1], _signature(record),
                                           list(record.grid),
                                           error="does not compile: the compiler crashed (its process died)")
    return results


def _compile_in_child(jobs_file: Path, results_file: Path, workers: int) -> None:
    """The child's side of compile_with_tritons: compile the pickled jobs with this process's Triton."""
    jobs = pickle.loads(jobs_file.read_bytes())
    start = time.perf_counter()
    results = _compile_all(jobs, workers)
    results_file.write_text(json.dumps(dict(triton=triton.__version__, seconds=round(time.perf_counter() - start, 1),
                                            results=[dataclasses.asdict(r) for r in results])))


def compile_with_tritons(jobs: list[tuple[LaunchRecord, Target]], tritons: list[str | None], workers: int,
                         log=print) -> dict[str, dict]:
    """Compile every job once per Triton: None is the venv's own, a path a folder holding another (first on
    PYTHONPATH). One child process per Triton, all at once, each with `workers` compile processes (the OS
    shares the CPUs; a version that finishes early leaves them to the others). Returns, per Triton
    version, {"seconds": its compile time, "results": a CompileResult per job, in order}."""
    picklable = [(_picklable(record), target) for record, target in jobs]
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file = Path(tmp, "jobs.pkl")
        jobs_file.write_bytes(pickle.dumps(picklable))
        children = []
        for i, folder in enumerate(tritons):
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            if folder:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(folder).resolve()), env.get("PYTHONPATH")]))
            results_file = Path(tmp, f"results-{i}.json")
            log_file = Path(tmp, f"child-{i}.log")
            with open(log_file, "w") as log_out:
                child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--compile-jobs",
                                          str(jobs_file), "--compile-results", str(results_file),
                                          "--workers", str(workers)], env=env, cwd=ROOT, stdout=log_out,
                                         stderr=subprocess.STDOUT)
            children.append((folder, child, results_file, log_file))
        for folder, child, results_file, log_file in children:
            if child.wait() != 0 or not results_file.is_file():
                raise RuntimeError(f"compile gate: the compiles with Triton from {folder or 'the venv'} failed "
                                   f"(exit {child.returncode}):\n{log_file.read_text()[-3000:]}")
            done = json.loads(results_file.read_text())
            if done["triton"] in out:
                raise RuntimeError(f"compile gate: Triton {done['triton']} given twice ({folder or 'the venv'})")
            log(f"compile gate: Triton {done['triton']} compiled {len(jobs)} kernels in {done['seconds']} s")
            out[done["triton"]] = dict(seconds=done["seconds"],
                                       results=[CompileResult(**r) for r in done["results"]])
    return out


@dataclasses.dataclass
class Recorded:
    """The gate's launches: per (set, precision, target), the distinct specialisations and their grids; and
    the distinct (target, specialisation) compiles across all of them, each once."""

    launches: list[tuple[str, str, Target, LaunchRecord, list[int]]]  # (set, precision, target, record, grid)
    compiles: dict[tuple[str, tuple[str, str]], tuple[LaunchRecord, Target]]


def record_all(targets: list[Target], sets: Iterable[str], precisions: Iterable[str] | None = None) -> Recorded:
    """Record every launch set in each of its precisions (those in `precisions`, if given) for each target."""
    launches, compiles = [], {}
    for target in targets:
        for name in sets:
            for precision in LAUNCH_SETS[name].precisions:
                if precisions is not None and precision not in precisions:
                    continue
                for record_, grid in distinct_launches(record(target, name, precision)):
                    launches.append((name, precision, target, record_, grid))
                    # The same compile is often needed by several sets and precisions (float32 banks in
                    # "mix" and "fp32", the same kernel at another size): each is compiled once.
                    compiles.setdefault((target.name, specialization_key(record_)), (record_, target))
    return Recorded(launches, compiles)


def run_recorded(recorded: Recorded, tritons: list[str | None] | None = None, workers: int | None = None,
                 log=print) -> dict[str, dict]:
    """Compile each distinct specialisation of `recorded` once per Triton; per Triton version,
    {"seconds": its compile time, "results": a CompileResult per recorded launch, with its verdict}."""
    keys = list(recorded.compiles)
    log(f"compile gate: {len(recorded.launches)} launches, {len(keys)} distinct compiles, each with "
        f"{len(tritons or [None])} Triton(s)")
    by_version = compile_with_tritons([recorded.compiles[k] for k in keys], tritons or [None],
                                      workers or os.cpu_count() or 1, log)
    out = {}
    for version, done in by_version.items():
        compiled = dict(zip(keys, done["results"], strict=True))
        results = [verdict(compiled[(target.name, specialization_key(r))], target, grid, precision, name)
                   for name, precision, target, r, grid in recorded.launches]
        out[version] = dict(seconds=done["seconds"], results=results)
    return out


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
    lines = ["| target | launch set | kernel | precision | compiles | shared memory (B) | registers | spill stores (B) "
             "| spill loads (B) | status |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (target, model, kernel, precision), row in sorted(rows.items()):
        status = "; ".join(sorted(set(row["errors"]))) or "ok"
        lines.append(f"| {target} | {model} | {kernel} | {precision} | {len(row['compiles'])} | {row['shared']} | "
                     f"{row['registers']} | {row['spills']} | {row['loads']} | {status} |")
    return "\n".join(lines) + "\n"


def markdown_report(results: list[CompileResult], meta: dict) -> str:
    """The per-version report: the verdict, the spills, the launch sets built, then the per-kernel table."""
    s = meta["summary"]
    spill_lines = ["none"] if not s["spills"] else [
        "| target | launch set | precision | kernel | spill stores (B) | spill loads (B) | registers |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
        *(f"| {x['target']} | {x['model']} | {x['precision']} | {x['kernel']} | {x['spill_stores']} | "
          f"{x['spill_loads']} | {x['registers']} |" for x in s["spills"])]
    sets = "\n".join(f"- {x['name']} ({', '.join(x['precisions'])}): {x['shapes']}" for x in meta["sets"])
    load = meta["load"]
    return (f"# Compile gate, Triton {meta['triton']}\n\n"
            f"{meta['date']}, torch {meta['torch']}, {meta['machine']}; `{meta['command']}` took {meta['seconds']} s "
            f"(recording {meta['record_seconds']} s; this Triton's compiles {meta['compile_seconds']} s, alongside "
            f"{meta['alongside'] or 'no other Triton'}); load average {load['before']} before, {load['after']} "
            f"after.\n\n"
            f"**{s['launches']} launches ({s['distinct_compiles']} distinct compiles) for "
            f"{', '.join(t['name'] for t in meta['targets'])}: {s['failed']} failed "
            f"({s['does_not_compile']} do not compile, {s['over_shared_memory']} over shared memory, "
            f"{s['over_grid_limits']} over CUDA's grid limits); {s['launches_with_spills']} launches spill "
            f"registers.** Expected exclusions: none (every launch of every precision, float64 included, "
            f"is built).\n\n"
            f"## Spills (worst compile per kernel)\n\n" + "\n".join(spill_lines) + "\n\n"
            f"## Launch sets recorded\n\n{sets}\n\n"
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


def _split(value: str, known: Iterable[str], option: str, parser: argparse.ArgumentParser) -> list[str]:
    names = value.split(",")
    for name in names:
        if name not in known:
            parser.error(f"{option}: unknown value {name!r}; expected {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/compile_gate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm_90,sm_80",
                        help=f"comma-separated: {', '.join(TARGETS)} or 'local' (this machine's GPU)")
    parser.add_argument("--sets", default=",".join(LAUNCH_SETS),
                        help=f"launch sets (default all): {', '.join(LAUNCH_SETS)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="only these of each set's precisions (default all)")
    parser.add_argument("--also-triton", action="append", default=[], metavar="DIR",
                        help="compile with the Triton installed in DIR too (pip install --target DIR), in the same "
                             "run: the launches are recorded once; repeatable")
    parser.add_argument("--workers", type=int, default=None,
                        help="compile processes per Triton (default: CPU count)")
    parser.add_argument("--out", type=Path, help="write compile-triton-VERSION.json and .md for each Triton here")
    # Internal: the child process that compiles with one Triton (compile_with_tritons).
    parser.add_argument("--compile-jobs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compile-results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("run without TRITON_INTERPRET=1: the interpreter replaces the kernels' JIT functions")
    # Triton 3.9 warns that its default (fused multiply-adds allowed) changes in 3.10: build with the
    # default the kernels run with today, and say so explicitly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.compile_jobs:
        _compile_in_child(args.compile_jobs, args.compile_results, args.workers or os.cpu_count() or 1)
        return 0
    for folder in args.also_triton:
        if not Path(folder, "triton", "__init__.py").is_file():
            parser.error(f"--also-triton {folder}: no triton package there (pip install --no-deps --target DIR "
                         f"triton==VERSION)")
    targets = []
    for name in args.targets.split(","):
        if name == "local":
            targets.append(_local_target())
        elif name in TARGETS:
            targets.append(TARGETS[name])
        else:
            parser.error(f"--targets: unknown target {name!r}; expected {', '.join(TARGETS)} or 'local'")
    sets = _split(args.sets, LAUNCH_SETS, "--sets", parser)
    precisions = _split(args.precisions, PRECISIONS, "--precisions", parser)
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    recorded = record_all(targets, sets, precisions)
    record_seconds = round(time.perf_counter() - start, 1)
    tritons = [None, *args.also_triton]
    by_version = run_recorded(recorded, tritons, args.workers)
    seconds = round(time.perf_counter() - start, 1)
    load_after = [round(x, 2) for x in os.getloadavg()]
    failed = 0
    for version, done in by_version.items():
        results = done["results"]
        meta = dict(triton=version, torch=torch.__version__, seconds=seconds, record_seconds=record_seconds,
                    compile_seconds=done["seconds"], alongside=", ".join(v for v in by_version if v != version),
                    command="python bench/compile_gate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=_machine(),
                    load=dict(before=load_before, after=load_after),
                    targets=[dataclasses.asdict(t) for t in targets],
                    sets=[dict(name=n, precisions=[p for p in LAUNCH_SETS[n].precisions if p in precisions],
                               shapes=LAUNCH_SETS[n].shapes) for n in sets],
                    summary=summarize(results))
        report = markdown_report(results, meta)
        print(report)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            Path(args.out, f"compile-triton-{version}.json").write_text(
                json.dumps(dict(meta=meta, results=[dataclasses.asdict(r) for r in results]), indent=1))
            Path(args.out, f"compile-triton-{version}.md").write_text(report)
        s = meta["summary"]
        print(f"Triton {version}: {s['launches']} launches ({s['distinct_compiles']} distinct compiles), "
              f"{s['failed']} failed, {s['over_shared_memory']} over shared memory, {s['launches_with_spills']} "
              f"spill; compiles {done['seconds']} s, whole run {seconds} s")
        for r in results:
            if not r.ok:
                print(f"FAILED Triton {version} {r.target} {r.model} {r.precision} {r.name}: {r.error}",
                      file=sys.stderr)
        failed += s["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
