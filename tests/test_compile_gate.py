"""The compile gate (bench/compile_gate.py): every Triton launch of a training step and of eval frames, of
the published model, the demo and the LFPV plug-in at Retinexformer's sites, compiled ahead of time for an
H100 (sm_90) and an A100 (sm_80) with Triton's own compiler, must fit the card's shared memory; with the
venv's Triton and the oldest supported one, in one run.

The interpreter replaces the kernels' JIT functions (tests/conftest.py sets TRITON_INTERPRET=1 on a CPU
machine), so the compiles run in subprocesses without it. No GPU is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compile_gate  # noqa: E402

from lfpv_fast.kernels import _common  # noqa: E402


def run_without_interpreter(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# An older Triton that the kernels must also compile with: the folder it is installed in (`pip install
# --no-deps --target DIR triton==3.6.0`; `make test` installs it in .venv/triton-3.6.0 and sets this).
OLD_TRITON_ENV = "LFPV_OLD_TRITON"


def old_triton_folder() -> str | None:
    folder = os.environ.get(OLD_TRITON_ENV)
    if not folder:
        return None
    folder = str(Path(folder).resolve())
    assert Path(folder, "triton", "__init__.py").is_file(), f"{OLD_TRITON_ENV}={folder}: no triton package there"
    return folder


@pytest.fixture(scope="module")
def gate_reports(tmp_path_factory) -> dict[str, dict]:
    """The whole gate (sm_90 and sm_80, every launch set in each of its precisions), run once for both
    tests: with the venv's Triton and, where LFPV_OLD_TRITON names one, the older Triton in the same run
    (the launches recorded once, each distinct specialisation compiled once per version). Its JSON report
    per Triton version."""
    out = tmp_path_factory.mktemp("compile-gate")
    old = old_triton_folder()
    proc = run_without_interpreter(["bench/compile_gate.py", "--out", str(out),
                                    *(["--also-triton", old] if old else [])], timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {path.stem.removeprefix("compile-triton-"): json.loads(path.read_text())
            for path in out.glob("compile-triton-*.json")}


def assert_gate_passed(report: dict) -> None:
    results = report["results"]
    assert {r["target"] for r in results} == {"sm_90", "sm_80"}
    assert {(r["model"], r["precision"]) for r in results} == {
        (name, p) for name, s in compile_gate.LAUNCH_SETS.items() for p in s.precisions}
    assert all(r["error"] is None and r["shared"] is not None for r in results)
    names = {r["name"] for r in results}
    assert {"query_fusion_fwd", "query_fusion_bwd_pixel", "query_fusion_bwd_patch", "query_fusion_bwd_patch_params",
            "masked_attention_fwd", "masked_attention_bwd", "snr_mask_ratio", "batch_mean_layer_norm"} <= names
    summary = report["meta"]["summary"]
    assert summary["failed"] == summary["over_shared_memory"] == 0
    # The demo model's head dim 32 and C=16 are built, besides the published 64 and 64.
    demo_attention = {r["signature"] for r in results if r["model"] == "demo" and r["name"] == "masked_attention_fwd"}
    assert demo_attention and all("HEAD_DIM=32" in s for s in demo_attention), demo_attention
    assert any("C=16" in r["signature"] for r in results if r["model"] == "demo" and r["name"] == "query_fusion_fwd")
    # The plug-in at Retinexformer's three levels, forward and backward, float32 and the bf16 mix.
    for name in ("query_fusion_fwd", "query_fusion_bwd_pixel", "query_fusion_bwd_patch",
                 "query_fusion_bwd_patch_params", "sample_updater_inputs", "mutual_updater_inputs_bwd"):
        for precision in ("fp32", "mix"):
            channels = {c for r in results if (r["model"], r["name"], r["precision"]) == ("retinexformer", name,
                                                                                          precision)
                        for c in (40, 80, 160) if f"C={c}," in r["signature"]}
            assert channels == {40, 80, 160}, (name, precision, channels)
    # Retinexformer's IG-MSA, forward and backward, at its head dim 40.
    ig_msa = [r for r in results if r["model"] == "ig_msa"]
    assert {r["name"] for r in ig_msa} >= {"ig_msa_gram", "ig_msa_attention", "ig_msa_apply", "ig_msa_bwd_reduce",
                                           "ig_msa_bwd_stats", "ig_msa_bwd_apply"}
    assert all("HEAD_DIM=40" in r["signature"] for r in ig_msa)


@pytest.mark.slow
def test_every_launch_fits_an_h100_and_an_a100(gate_reports):
    assert triton.__version__ in gate_reports, sorted(gate_reports)
    assert_gate_passed(gate_reports[triton.__version__])


@pytest.mark.slow
def test_every_launch_compiles_with_the_oldest_supported_triton(gate_reports):
    """The same gate with an older Triton (3.6.0, what torch 2.11 ships), compiled in the same run."""
    if old_triton_folder() is None:
        pytest.skip(f"{OLD_TRITON_ENV} is not set: `make test` installs Triton 3.6.0 into .venv/triton-3.6.0 "
                    f"and sets it (pip install --no-deps --target DIR triton==3.6.0)")
    others = sorted(set(gate_reports) - {triton.__version__})
    assert len(others) == 1, f"the older Triton was not the one imported: reports for {sorted(gate_reports)}"
    report = gate_reports[others[0]]
    assert report["meta"]["triton"] == others[0]
    assert_gate_passed(report)
    # Recorded once: both versions built the very same launches.
    newest = gate_reports[triton.__version__]["results"]
    assert [(r["target"], r["model"], r["precision"], r["signature"]) for r in report["results"]] == [
        (r["target"], r["model"], r["precision"], r["signature"]) for r in newest]


def test_distinct_specialisations_are_tritons_own():
    """specialization_key merges two launches exactly when Triton's binder gives them the same
    specialisation and options (compiles them once): on the launches of a training step and eval frames
    of the demo model and of the plug-in at two sites, in float32 and the bf16 mix."""
    script = textwrap.dedent('''
        import sys, collections
        sys.path.insert(0, "bench")
        import compile_gate as g
        from lfpv_fast.kernels._common import TARGETS
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        from torch._subclasses.fake_tensor import FakeTensorMode
        from lfpv_fast.kernels._common import record_launches
        backend = make_backend(GPUTarget("cuda", 90, 32))
        records = []
        for precision in ("fp32", "mix"):
            records += g.record_scenario(TARGETS["sm_90"], precision, [(1, 64), (2, 48)], [(48, 80)], "demo")
            with FakeTensorMode(allow_non_fake_inputs=True), record_launches(TARGETS["sm_90"]) as found:
                for site in (g.PluginSite(40, 1), g.PluginSite(160, 4)):
                    g.record_lfpv_site(precision, site, [64], [(64, 96), (400, 600)], [1, 3])
            records += found
        def binder_key(r):
            bind = create_function_from_signature(r.kernel.signature, r.kernel.params, backend)
            _, specialization, options = bind(*r.args, **r.kwargs)
            return repr((r.kernel.fn.__qualname__, specialization, options))
        ours, theirs = collections.defaultdict(set), collections.defaultdict(set)
        for r in records:
            ours[g.specialization_key(r)].add(binder_key(r))
            theirs[binder_key(r)].add(g.specialization_key(r))
        print(len(records), len(ours), len(theirs), max(map(len, ours.values())), max(map(len, theirs.values())))
    ''')
    proc = run_without_interpreter(["-c", script], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launches, ours, theirs, most_merged_by_us, most_merged_by_triton = map(int, proc.stdout.split()[-5:])
    assert launches > ours > 10, proc.stdout  # several launches share a compile
    assert ours == theirs and most_merged_by_us == most_merged_by_triton == 1, proc.stdout


def test_the_gate_fails_what_does_not_fit(tmp_path):
    """A kernel whose pipelined tiles need megabytes of shared memory, and a grid beyond CUDA's limit:
    both compile, and both fail the gate with a message that says why. A kernel that does not compile
    fails with the compiler's cause and the source line where it arose (in a called @triton.jit
    function), not just the "^" under it."""
    module = tmp_path / "toy_kernels.py"
    module.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def big_tiles(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            acc = tl.zeros((BLOCK, BLOCK), tl.float32)
            for k in range(0, K, BLOCK):
                a = tl.load(a_ptr + i[:, None] * K + (k + i)[None, :])
                b = tl.load(b_ptr + (k + i)[:, None] * BLOCK + i[None, :])
                acc += tl.dot(a, b)
            tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], acc)

        @triton.jit
        def mismatched_product(a, b):
            return tl.dot(a, b)

        @triton.jit
        def bad_dot(a_ptr, c_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            j = tl.arange(0, 2 * BLOCK)
            a = tl.load(a_ptr + i[:, None] * BLOCK + i[None, :])
            b = tl.load(a_ptr + j[:, None] * BLOCK + i[None, :])
            tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], mismatched_product(a, b))
    '''))
    script = textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import toy_kernels
        from lfpv_fast.kernels._common import TARGETS, LaunchRecord, TensorSpec
        sys.path.insert(0, "bench")
        from compile_gate import _compile_one, verdict
        f32 = TensorSpec(torch.float32, True)
        big = LaunchRecord("big", toy_kernels.big_tiles, (1,), (f32, f32, f32, 4096),
                           dict(BLOCK=256, num_warps=8, num_stages=4))
        small = LaunchRecord("small", toy_kernels.big_tiles, (1,), (f32, f32, f32, 4096),
                             dict(BLOCK=32, num_warps=4, num_stages=2))
        bad = LaunchRecord("bad", toy_kernels.bad_dot, (1,), (f32, f32), dict(BLOCK=16))
        for record, grid in [(big, [1, 1, 1]), (small, [1, 1, 1]), (small, [1, 70000, 1]), (bad, [1, 1, 1])]:
            r = verdict(_compile_one((record, TARGETS["sm_80"])), TARGETS["sm_80"], grid, "fp32", "smid")
            print(record.name, r.shared, r.error)
    ''')
    proc = run_without_interpreter(["-c", script], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    big, small, wide, bad = proc.stdout.strip().splitlines()[-4:]
    assert "needs" in big and "sm_80 gives 166912 B" in big, big
    assert small.endswith("None"), small
    assert "grid dimension 1 is 70000" in wide, wide
    # (The wording of tl.dot's shape check differs between Triton versions.)
    assert "does not compile: AssertionError: " in bad and not bad.rstrip().endswith("^"), bad
    assert "`return tl.dot(a, b)`" in bad and "mismatched_product(a, b)" in bad, bad


def test_recording_sees_the_launches_and_dtypes_of_an_autocast_step():
    """On fake tensors, one bf16-autocast training step and one eval frame: every op's launches are
    recorded (none runs), with the mix of dtypes autocast makes and the sm_90 configuration."""
    records = compile_gate.record_scenario(_common.TARGETS["sm_90"], "mix", [(2, 64)], [(64, 96)], "smid")
    by_name = {}
    for r in records:
        by_name.setdefault(r.name, []).append(r)
    assert {"snr_mask_ratio", "snr_mask_normalize", "query_fusion_keys", "query_fusion_fwd",
            "query_fusion_bwd_pixel", "query_fusion_bwd_patch", "query_fusion_bwd_patch_params", "sum_rows",
            "query_fusion_keys_bwd", "masked_attention_fwd", "masked_attention_bwd", "sample_updater_inputs",
            "batch_mean_layer_norm", "mutual_updater_inputs"} <= set(by_name)


    def dtypes(name: str, *positions: int) -> set[tuple[torch.dtype, ...]]:
        return {tuple(r.args[i].dtype for i in positions) for r in by_name[name]}

    # features and the vector bank: bf16 banks as CPU autocast updates them, float32 ones as CUDA
    # autocast does (and as the stored banks are in eval); the backward sees both too.
    assert dtypes("query_fusion_fwd", 0, 2) == {(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)}
    assert dtypes("query_fusion_bwd_pixel", 0, 4) == {(torch.bfloat16, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32)}
    assert dtypes("batch_mean_layer_norm", 0, 3) >= {(torch.bfloat16, torch.float32)}
    assert dtypes("masked_attention_fwd", 0) == {(torch.bfloat16,)}
    assert dtypes("snr_mask_ratio", 0) == {(torch.float32,)}
    # The launch configuration is the target's: 4 programs per SM over the pixel tiles at most.
    assert all(r.grid[0] <= 4 * 132 for r in by_name["query_fusion_bwd_pixel"])


def test_recording_the_demo_model_builds_its_own_shapes():
    """The demo model (configs/demo.yaml: C=16, 2 heads of 32) is recorded with its own sizes."""
    records = compile_gate.record_scenario(_common.TARGETS["sm_90"], "fp32", [(1, 64)], [(64, 64)], "demo")
    kinds = {r.name: r for r in records}
    assert kinds["query_fusion_fwd"].kwargs["C"] == 16
    assert kinds["masked_attention_fwd"].kwargs["HEAD_DIM"] == 32


def test_recording_the_plugin_at_retinexformers_bottleneck():
    """The plug-in's launches at C=160, 1/4 scale: every op forward and backward in training, query-and-fusion
    in eval at a frame padded to whole patches (400x600 -> 100x152 features), bf16 features beside float32
    banks in the mix."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), _common.record_launches(_common.TARGETS["sm_90"]) as records:
        compile_gate.record_lfpv_site("mix", compile_gate.PluginSite(160, 4), [128], [(400, 600)], [2],
                                      all_reduce=True)
    names = {r.name for r in records}
    assert {"sample_updater_inputs", "sample_updater_inputs_bwd", "batch_mean_layer_norm",
            "batch_mean_layer_norm_bwd", "batch_mean", "bank_layer_norm", "mutual_updater_inputs",
            "mutual_updater_inputs_bwd", "query_fusion_fwd", "query_fusion_bwd_pixel", "query_fusion_bwd_patch",
            "query_fusion_bwd_patch_params", "query_fusion_keys_bwd"} <= names, names
    fused = [r for r in records if r.name == "query_fusion_fwd"]
    assert {r.kwargs["C"] for r in fused} == {160}
    assert {(r.args[0].dtype, r.args[2].dtype) for r in fused} == {(torch.bfloat16, torch.float32)}
    assert {tuple(r.args[10:12]) for r in fused} == {(32, 32), (100, 152)}  # (H, W): training crop, eval frame


def test_recording_ig_msa_builds_every_level_forward_and_backward():
    """Retinexformer's three levels (C = 40, 80, 160 in heads of 40) at the 128x128 crops and the 1024x1920
    frame: forward and backward launches, in the precision's dtype, the grids sized for the target."""
    records = compile_gate.record(_common.TARGETS["sm_80"], "ig_msa", "bf16")
    names = {r.name for r in records}
    assert names == {"ig_msa_gram", "ig_msa_attention", "ig_msa_apply", "ig_msa_bwd_reduce", "ig_msa_bwd_stats",
                     "ig_msa_bwd_apply"}
    assert {r.kwargs["HEAD_DIM"] for r in records} == {40}
    assert {r.args[0].dtype for r in records if r.name == "ig_msa_gram"} == {torch.bfloat16}
    # (batch * heads) rows of programs: 1, 2, 4 heads at batch 1 (frame) and 8 (crops)
    assert {r.grid[1] for r in records if r.name == "ig_msa_gram"} == {1, 2, 4, 8, 16, 32}
    # The frame at stride 1 has 2M pixels over at most 2 programs per SM (108 on an A100): many blocks each.
    assert max(r.grid[0] for r in records if r.name == "ig_msa_apply") <= 2 * 108
