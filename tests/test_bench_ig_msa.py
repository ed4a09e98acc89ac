"""bench/bench_ig_msa.py: its CPU formulation equals the reference twin, and the script runs (tiny shapes)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

from lfpv_fast.ops import reference

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
bench = importlib.import_module("bench_ig_msa")


def test_torch_gram_formulation_equals_the_reference():
    """The benchmark's "torch_gram" rows compute the reference's values (float64: to rounding), gradients too."""
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(2, 33, 80, generator=gen, dtype=torch.float64) for _ in range(4)]
    leaves.append(torch.tensor([1.5, 0.5], dtype=torch.float64).reshape(2, 1, 1))
    weights = torch.randn(2, 33, 80, generator=gen, dtype=torch.float64)
    results = []
    for fn in (bench.torch_gram_ig_msa, reference.ig_msa):
        inputs = [t.clone().requires_grad_() for t in leaves]
        out = fn(*inputs, 2)
        results.append((out, *torch.autograd.grad((out * weights).sum(), inputs)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bench_runs_and_writes_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "train", (2, 16, 16))
    out = tmp_path / "ig_msa.json"
    assert bench.main(["--shapes", "train", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    # 3 levels x 2 passes x 3 implementations; on the CPU the triton rows say why they are skipped
    assert len(rows) == 18
    assert {(r["channels"], r["tokens"]) for r in rows} == {(40, 256), (80, 64), (160, 16)}
    for r in rows:
        if r["impl"] == "triton":
            assert r["status"].startswith("skipped: no CUDA device") and "time_ms" not in r
        else:
            assert r["status"] == "ok" and r["time_ms"]["reps"] >= 5 and r["speedup"]["reps"] >= 5
