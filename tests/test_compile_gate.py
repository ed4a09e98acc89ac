"""The compile gate: every Triton launch of a training step and of eval frames, compiled ahead of time for
an H100 (sm_90) and an A100 (sm_80) with Triton's own compiler, must fit the card's shared memory.

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

from lfpv_fast.kernels import _common  # noqa: E402
from lfpv_fast.kernels.compile_gate import DEMO_PRECISIONS, PRECISIONS, record_scenario  # noqa: E402
from lfpv_fast.kernels.ig_msa import GATE_PRECISIONS as IG_MSA_PRECISIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_without_interpreter(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# An older Triton that the kernels must also compile with: the folder it is installed in (`pip install
# --no-deps --target DIR triton==3.6.0`; `make test` installs it in .venv/triton-3.6.0 and sets this).
OLD_TRITON_ENV = "LFPV_OLD_TRITON"


def run_gate(tmp_path: Path, pythonpath: str | None = None) -> dict:
    """The whole gate (sm_90 and sm_80, every precision, the published and the demo model's shapes) in a
    subprocess, with `pythonpath` first on the import path when given; its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "lfpv_fast.kernels.compile_gate", "--json", str(out),
                           "--markdown", str(tmp_path / "compile.md")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def assert_gate_passed(report: dict) -> None:
    results = report["results"]
    assert {r["target"] for r in results} == {"sm_90", "sm_80"}
    assert {(r["model"], r["precision"]) for r in results} == {
        *(("smid", p) for p in (*PRECISIONS, "fp64")), *(("demo", p) for p in DEMO_PRECISIONS),
        *(("ig_msa", p) for p in IG_MSA_PRECISIONS)}
    assert all(r["error"] is None and r["shared"] is not None for r in results)
    names = {r["name"] for r in results}
    assert {"query_fusion_fwd", "query_fusion_bwd_pixel", "query_fusion_bwd_patch", "query_fusion_bwd_patch_params",
            "masked_attention_fwd", "masked_attention_bwd", "snr_mask_ratio", "batch_mean_layer_norm",
            "ig_msa_gram", "ig_msa_attention", "ig_msa_apply", "ig_msa_bwd_reduce", "ig_msa_bwd_stats",
            "ig_msa_bwd_apply"} <= names
    summary = report["meta"]["summary"]
    assert summary["failed"] == summary["over_shared_memory"] == 0
    # The demo model's head dim 32 and C=16 are built, besides the published 64 and 64.
    demo_attention = {r["signature"] for r in results if r["model"] == "demo" and r["name"] == "masked_attention_fwd"}
    assert demo_attention and all("HEAD_DIM=32" in s for s in demo_attention), demo_attention
    assert any("C=16" in r["signature"] for r in results if r["model"] == "demo" and r["name"] == "query_fusion_fwd")
    # Retinexformer's IG-MSA at its head dim 40, up to the 1024x1920 frame's 2M pixels at stride 1.
    ig_msa = [r for r in results if r["model"] == "ig_msa"]
    assert ig_msa and all("HEAD_DIM=40" in r["signature"] for r in ig_msa)


@pytest.mark.slow
def test_every_launch_fits_an_h100_and_an_a100(tmp_path):
    report = run_gate(tmp_path)
    assert report["meta"]["triton"] == triton.__version__
    assert_gate_passed(report)


@pytest.mark.slow
def test_every_launch_compiles_with_the_oldest_supported_triton(tmp_path):
    """The same gate with an older Triton (3.6.0, what torch 2.11 ships) first on the import path."""
    folder = os.environ.get(OLD_TRITON_ENV)
    if not folder:
        pytest.skip(f"{OLD_TRITON_ENV} is not set: `make test` installs Triton 3.6.0 into .venv/triton-3.6.0 "
                    f"and sets it (pip install --no-deps --target DIR triton==3.6.0)")
    folder = str(Path(folder).resolve())
    assert Path(folder, "triton", "__init__.py").is_file(), f"{OLD_TRITON_ENV}={folder}: no triton package there"
    report = run_gate(tmp_path, pythonpath=folder)
    assert report["meta"]["triton"] != triton.__version__, "the older Triton was not the one imported"
    assert_gate_passed(report)


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
        from lfpv_fast.kernels.compile_gate import _compile_one
        f32 = TensorSpec(torch.float32, True)
        big = LaunchRecord("big", toy_kernels.big_tiles, (1,), (f32, f32, f32, 4096),
                           dict(BLOCK=256, num_warps=8, num_stages=4))
        small = LaunchRecord("small", toy_kernels.big_tiles, (1,), (f32, f32, f32, 4096),
                             dict(BLOCK=32, num_warps=4, num_stages=2))
        bad = LaunchRecord("bad", toy_kernels.bad_dot, (1,), (f32, f32), dict(BLOCK=16))
        for record, grid in [(big, [1, 1, 1]), (small, [1, 1, 1]), (small, [1, 70000, 1]), (bad, [1, 1, 1])]:
            r = _compile_one((record, grid, TARGETS["sm_80"], "fp32", "smid"))
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
    records = record_scenario(_common.TARGETS["sm_90"], "mix", [(2, 64)], [(64, 96)], "smid")
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
    records = record_scenario(_common.TARGETS["sm_90"], "fp32", [(1, 64)], [(64, 64)], "demo")
    kinds = {r.name: r for r in records}
    assert kinds["query_fusion_fwd"].kwargs["C"] == 16
    assert kinds["masked_attention_fwd"].kwargs["HEAD_DIM"] == 32


def test_recording_ig_msa_builds_every_level_forward_and_backward():
    """Retinexformer's three levels (C = 40, 80, 160 in heads of 40) at the 128x128 crops and the 1024x1920
    frame: forward and backward launches, in the precision's dtype, the grids sized for the target."""
    records = record_scenario(_common.TARGETS["sm_80"], "bf16", [], [], "ig_msa")
    names = {r.name for r in records}
    assert names == {"ig_msa_gram", "ig_msa_attention", "ig_msa_apply", "ig_msa_bwd_reduce", "ig_msa_bwd_stats",
                     "ig_msa_bwd_apply"}
    assert {r.kwargs["HEAD_DIM"] for r in records} == {40}
    assert {r.args[0].dtype for r in records if r.name == "ig_msa_gram"} == {torch.bfloat16}
    # (batch * heads) rows of programs: 1, 2, 4 heads at batch 1 (frame) and 8 (crops)
    assert {r.grid[1] for r in records if r.name == "ig_msa_gram"} == {1, 2, 4, 8, 16, 32}
    # The frame at stride 1 has 2M pixels over at most 2 programs per SM (108 on an A100): many blocks each.
    assert max(r.grid[0] for r in records if r.name == "ig_msa_apply") <= 2 * 108
