"""train.deterministic: two runs with the same seed, side by side on the same (so: busy) cores, give the same
losses bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml

from helpers import TINY_RUN
from lfpv_fast.config import config_to_dict, load_config
from lfpv_fast.training.trainer import configure_torch


def test_the_switch_sets_every_torch_knob_and_the_default_leaves_them_off(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        described = configure_torch(load_config("demo", ["train.deterministic=true"]), torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.get_num_threads() == 1 and "deterministic" in described
        configure_torch(load_config("demo", ["train.deterministic=true", "train.cpu_threads=2"]), torch.device("cpu"))
        assert torch.get_num_threads() == 2
        assert configure_torch(load_config("demo"), torch.device("cpu")) is None
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.set_num_threads(threads)


def test_two_runs_in_parallel_give_bit_identical_losses(tmp_path):
    from lfpv_fast.data.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "demo")
    cfg = load_config("demo", [*TINY_RUN, f"data.demo_root={tmp_path / 'demo'}", "train.iterations=6",
                               "train.checkpoint_every=100", "train.deterministic=true"])
    config = tmp_path / "deterministic.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "lfpv_fast.train", "-c", str(config), "--out", str(run)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for run in runs]
    for proc in procs:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    assert [r["step"] for r in rows[0]] == list(range(1, 7))
    for a, b in zip(*rows, strict=True):
        # json writes floats with repr(), which round-trips exactly: equal here means equal bits.
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    assert len({r["loss"] for r in rows[0]}) == 6  # the losses move, so equality is not an accident
    weights = [torch.load(run / "final_weights.pth", weights_only=True)["model"] for run in runs]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    assert "deterministic (1 CPU thread(s))" in (runs[0] / "train.log").read_text()
