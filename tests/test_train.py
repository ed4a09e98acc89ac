"""The trainer on the CPU: exact resume (mid-epoch), checkpoints, signals, kill -9, non-finite steps, config errors.

Every run here is a tiny model on the demo dataset at 64x48 (3 batches of 24 crops per epoch), so that a
whole run takes seconds on two cores.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_RUN, folder_snapshot, metrics, one_error_line, tiny_config, write_tiny_yaml
from lfpv_fast.config import ConfigError, load_config
from lfpv_fast.train import load_run_config, main, parse_args
from lfpv_fast.training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    read_checkpoint,
    restore_rng,
)
from lfpv_fast.training.fast_path import resolve_features
from lfpv_fast.training.trainer import Trainer, cosine_restart_lambda


def fit(cfg, run_dir: Path, **kwargs) -> tuple[int, Trainer]:
    trainer = Trainer(cfg, run_dir, **kwargs)
    try:
        return trainer.fit(), trainer
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------


def test_cosine_restarts_follow_the_published_schedule():
    lr, eta_min, period = 4e-4, 1e-7, 10
    factor = cosine_restart_lambda(lr, period, eta_min)
    assert factor(0) == pytest.approx(1.0)
    assert factor(5) * lr == pytest.approx((lr + eta_min) / 2)
    assert factor(9) * lr == pytest.approx(eta_min + (lr - eta_min) * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert factor(10) == pytest.approx(1.0)  # restart
    assert factor(13) == pytest.approx(factor(3))


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.save(state, tmp_path / "rng.pth")
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(torch.load(tmp_path / "rng.pth", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_resume_in_the_middle_of_an_epoch_repeats_the_uninterrupted_losses(tmp_path, demo_root):
    code, full = fit(tiny_config(demo_root), tmp_path / "full")
    assert code == 0
    reference = metrics(tmp_path / "full")
    assert [r["step"] for r in reference] == list(range(1, 9))

    # Stop after step 5 (epoch 1, batch 2 of 3), then continue through the CLI to step 8.
    cfg_part = tiny_config(demo_root, "train.iterations=5")
    assert fit(cfg_part, tmp_path / "part")[0] == 0
    ckpt = read_checkpoint(latest_checkpoint(tmp_path / "part"))  # torch.load(weights_only=True)
    assert ckpt["step"] == 5 and ckpt["loader"] == {"epoch": 1, "batch": 2}
    assert {"model", "optimizer", "scheduler", "rng", "draw_generator", "config", "model_config"} <= set(ckpt)
    assert main(["--out", str(tmp_path / "part"), "--resume", "--set", "train.iterations=8"]) == 0

    resumed = metrics(tmp_path / "part")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(reference, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), f"step {a['step']}"
    # The losses change from step to step, so equal losses are not an accident.
    assert len({round(r["loss"], 3) for r in reference}) > 4
    final_full = read_checkpoint(tmp_path / "full" / "final_weights.pth")["model"]
    final_part = read_checkpoint(tmp_path / "part" / "final_weights.pth")["model"]
    for key, value in final_full.items():
        torch.testing.assert_close(final_part[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # Run folder contents, retention (keep 2 + best) and the exports.
    run = tmp_path / "full"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000006.pth", "step_00000008.pth"]
    assert (run / "checkpoints" / "best.pth").is_file() and (run / "config.yaml").is_file()
    assert "validation at step 8" in (run / "train.log").read_text()
    assert len(list((run / "images").glob("step_00000008_*.png"))) == 1
    net = load_model(run / "checkpoints" / "step_00000008.pth", backend="reference")  # training checkpoints load
    assert torch.equal(net.bank_vectors, full.net.bank_vectors)
    # The published format holds only the published architecture: a tiny model is exported as final_weights.pth.
    assert not (run / "final_original_format.pth").exists()
    assert "final_original_format.pth is not written" in (run / "train.log").read_text()


def test_channels_last_trains_like_the_default_layout(tmp_path, demo_root):
    cfg = tiny_config(demo_root, "train.iterations=2", "val.every=100", "val.max_images=1")
    fit(cfg, tmp_path / "a")
    fit(tiny_config(demo_root, "train.iterations=2", "val.max_images=1", "train.channels_last=true"), tmp_path / "b")
    for a, b in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_the_loss_is_the_published_one(tmp_path, demo_root):
    from lfpv_fast.training.losses import PerceptualLoss, charbonnier_loss

    torch.manual_seed(0)
    vgg = PerceptualLoss()
    torch.save(vgg.vgg.state_dict(), tmp_path / "vgg19.pth")  # torchvision key layout: features.N.weight
    cfg = tiny_config(demo_root, f"train.vgg_weights={tmp_path / 'vgg19.pth'}", "train.pixel_weight=0.5")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.close()
    out, without_lfpv, gt = (torch.rand(2, 3, 32, 32) for _ in range(3))
    expected = 0.5 * (charbonnier_loss(out, gt) + charbonnier_loss(without_lfpv, gt)) + 0.1 * vgg(without_lfpv, gt)
    torch.testing.assert_close(trainer.loss(out, without_lfpv, gt), expected)
    assert "perceptual loss term is off" not in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_torch_compile_trains_like_eager(tmp_path, demo_root):
    # The compile switch on the CPU (inductor's C++ backend): same losses up to fused-kernel rounding.
    # The network compiles to one graph (forward and backward), with no graph break and no recompile as the
    # sampled bank positions change from step to step: host values read while tracing (the draws' check,
    # indexing by a 0-d CPU tensor) broke it into 7 forward graphs and recompiled per position.
    from torch._dynamo.utils import counters

    base = ("train.iterations=3", "data.batch_size=4", "val.max_images=1")
    fit(tiny_config(demo_root, *base), tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    _, trainer = fit(tiny_config(demo_root, *base, "train.compile=on"), tmp_path / "compiled")
    assert trainer.features.compile and trainer.wrapped_net is not trainer.net
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1, dict(counters["frames"])
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_triton_backend_trains_like_the_reference(tmp_path, demo_root):
    # On a CPU machine the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1).
    base = ("train.iterations=2", "data.batch_size=4", "val.max_images=1")
    fit(tiny_config(demo_root, *base), tmp_path / "reference")
    _, trainer = fit(tiny_config(demo_root, *base, "train.backend=triton"), tmp_path / "triton")
    assert trainer.features.backend == "triton" and trainer.net.backend == "triton"
    for a, b in zip(metrics(tmp_path / "reference"), metrics(tmp_path / "triton"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


class PoisonedLoader:
    """Wraps a loader and turns the input of the given (1-based) batches into NaN."""

    def __init__(self, inner, bad: set[int]) -> None:
        self.inner, self.bad, self.count = inner, bad, 0

    def __iter__(self):
        for batch in self.inner:
            self.count += 1
            if self.count in self.bad:
                batch = dict(batch, lq=batch["lq"] * float("nan"))
            yield batch

    def __len__(self) -> int:
        return len(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)


def poisoned_loaders(cfg, bad: set[int]):
    from lfpv_fast.data.loaders import build_loader

    return PoisonedLoader(build_loader(cfg, "train"), bad), build_loader(cfg, "test")


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, demo_root):
    cfg = tiny_config(demo_root, "logging.every=4", "train.checkpoint_every=2")
    train, val = poisoned_loaders(cfg, {3})
    code, _ = fit(cfg, tmp_path / "run", train_loader=train, val_loader=val)
    assert code == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "non-finite loss or gradient at step 3" in log
    assert "last good checkpoint is " + str(tmp_path / "run" / "checkpoints" / "step_00000002.pth") in log
    # Found at the logging interval (step 4), before step 4's checkpoint could be written.
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002.pth"]


def test_non_finite_steps_are_skipped_when_asked(tmp_path, demo_root):
    cfg = tiny_config(demo_root, "train.nonfinite=skip", "train.iterations=5")
    train, val = poisoned_loaders(cfg, {3})
    code, trainer = fit(cfg, tmp_path / "run", train_loader=train, val_loader=val)
    assert code == 0 and trainer.skipped == 1 and trainer.step == 5
    for name, t in [*trainer.net.named_parameters(), *trainer.net.named_buffers()]:
        assert torch.isfinite(t.float()).all(), name
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Errors before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
@pytest.mark.parametrize("override, named", [
    ("train.bf16=on", "train.bf16=on"),
    ("train.fused_adam=on", "train.fused_adam=on"),
    ("train.cuda_graphs=true", "train.cuda_graphs=true"),
    ("data.device=gpu", "data.device=gpu"),
    ("train.device=cuda", "train.device is 'cuda'"),
    ("train.backend=triton", "train.backend=triton"),
])
def test_gpu_features_on_a_cpu_machine_fail_before_any_work(tmp_path, capsys, monkeypatch, override, named):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' conftest sets it for the kernels
    out = tmp_path / "run"
    assert main(["--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and ("CPU" in err or "no CUDA" in err)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_compile_with_interpreted_triton_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "run"
    assert main(["--set", "train.backend=triton", "--set", "train.compile=on", "--out", str(out)]) == 2
    assert "train.compile=on with train.backend=triton" in capsys.readouterr().err
    assert not out.exists()


def test_auto_switches_are_off_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU machine only")
    f = resolve_features(load_config("smid"))
    assert (f.device.type, f.backend, f.compile, f.bf16, f.fused_adam, f.cuda_graphs) == \
        ("cpu", "reference", False, False, False, False)


def test_config_and_run_folder_errors(tmp_path, capsys, demo_root):
    assert main(["-c", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["--set", "train.cuda_graphs=true", "--set", "train.compile=off"]) == 2
    assert "train.cuda_graphs" in capsys.readouterr().err
    assert main(["--resume"]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="val.max_images"):
        load_config("demo", ["val.max_images=0"])
    # A folder that already holds a run is not overwritten.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({}, tmp_path / "run" / "checkpoints" / "step_00000001.pth")
    cfg_file = write_tiny_yaml(tmp_path / "tiny.yaml", demo_root)
    assert main(["-c", str(cfg_file), "--out", str(tmp_path / "run")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, demo_root):
    run = tmp_path / "run"
    assert fit(tiny_config(demo_root, "train.iterations=4", "train.checkpoint_every=2"), run)[0] == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002.pth", "step_00000004.pth"]
    # Branch off at step 2 with a checkpoint every step: the abandoned step_4 must neither push the new
    # checkpoints out of retention nor be what a later --resume picks.
    cfg = tiny_config(demo_root, "train.iterations=3", "train.checkpoint_every=1")
    assert fit(cfg, run, resume=run / "checkpoints" / "step_00000002.pth")[0] == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002.pth", "step_00000003.pth"]
    assert read_checkpoint(latest_checkpoint(run))["step"] == 3
    assert (run / "checkpoints" / "step_00000004.pth.abandoned").is_file()


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    assert fit(tiny_config(demo_root, "train.iterations=4", "train.checkpoint_every=2"), run)[0] == 0
    latest = run / "checkpoints" / "step_00000004.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--set", "train.iterations=5"]) == 0
    out = capsys.readouterr().out
    assert "step_00000004.pth" in out and "truncated" in out
    assert "resuming from step_00000002.pth, the newest intact checkpoint" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000002.pth'} at step 2" in out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "step_00000004.pth.damaged").is_file()  # set aside, not deleted
    assert read_checkpoint(latest_checkpoint(run))["step"] == 5
    # An explicit --resume PATH to a damaged file is an error naming it (and no fallback).
    broken = run / "checkpoints" / "step_00000004.pth.damaged"
    assert main(["--out", str(run), "--resume", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err


def test_loader_workers_are_capped_at_the_available_cores_saying_so_once(monkeypatch, capsys, demo_root):
    import warnings

    from lfpv_fast.data.loaders import build_loader
    from lfpv_fast.pipelines import torch_loader

    monkeypatch.setattr(torch_loader.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(torch_loader, "_reported_worker_caps", set())
    cfg = tiny_config(demo_root, "data.num_workers=3")
    train, val = build_loader(cfg, "train"), build_loader(cfg, "test")
    assert train.num_workers == val.num_workers == 1
    err = capsys.readouterr().err
    assert err.count("note: data.num_workers=3 but this process may use 1 CPU core(s): using 1") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "worker processes in total" warning would fail here
        next(iter(val))
    assert build_loader(tiny_config(demo_root, "data.num_workers=0"), "test").num_workers == 0


def test_the_demo_says_when_it_builds_its_dataset_and_where(tmp_path, capsys):
    cfg = load_config("demo", [*TINY_RUN, f"data.demo_root={tmp_path / 'demo'}", "train.iterations=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.close()
    out = capsys.readouterr().out
    assert f"building the demo dataset in {tmp_path / 'demo'}" in out and "demo dataset written to" in out
    assert "building the demo dataset" in (tmp_path / "run" / "train.log").read_text()  # also in the log
    trainer = Trainer(cfg, tmp_path / "run2")
    trainer.close()
    assert "building the demo dataset" not in capsys.readouterr().out  # built once


def test_resume_reads_the_config_of_a_run_folder_given_with_a_tilde(tmp_path, demo_root, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    write_tiny_yaml(tmp_path / "run" / "config.yaml", demo_root, "train.seed=7")
    args = parse_args(["--out", "~/run", "--resume"])
    assert load_run_config(args).train.seed == 7  # not the packaged demo config


def test_demo_config_is_small():
    cfg = load_config("demo")
    m = cfg.model
    assert cfg.data.dataset == "demo" and cfg.data.crop == 128 and cfg.data.batch_size <= 8
    assert m.nf <= 32 and m.layers <= 2 and m.ffn_dim <= 256 and m.d_model <= 512


# ---------------------------------------------------------------------------------------------
# Processes: signals and kill -9


def _python(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits_0(tmp_path, demo_root, sig):
    cfg_file = write_tiny_yaml(tmp_path / "tiny.yaml", demo_root, "train.iterations=100000", "val.every=100000",
                               "train.checkpoint_every=100000")
    run = tmp_path / "run"
    proc = _python("-m", "lfpv_fast.train", "-c", str(cfg_file), "--out", str(run), cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    proc.send_signal(sig)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output
    assert f"stopped by {sig.name}" in output and f"--out {run} --resume" in output
    step = read_checkpoint(latest_checkpoint(run))["step"]
    assert 2 <= step < 100000 and metrics(run)[-1]["step"] == step
    trainer = Trainer(load_config(run / "config.yaml"), run, resume="latest")
    assert trainer.step == step
    trainer.close()


def test_ctrl_c_at_a_terminal_with_loader_workers_stops_cleanly(tmp_path, demo_root):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included."""
    cfg_file = write_tiny_yaml(tmp_path / "tiny.yaml", demo_root, "train.iterations=100000", "val.every=100000",
                               "train.checkpoint_every=100000", "data.num_workers=2")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lfpv_fast.train", "-c", str(cfg_file), "--out", str(run)],
                            cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output
    assert "stopped by SIGINT" in output and "exited unexpectedly" not in output
    assert read_checkpoint(latest_checkpoint(run))["step"] >= 2


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from lfpv_fast.training.checkpoint import write_checkpoint
    folder = Path(sys.argv[1])
    for step in range(1, 100000):
        print("writing", step, flush=True)
        write_checkpoint({"step": step, "blob": torch.full((6_000_000,), float(step))}, folder, step, keep=2)
        print("saved", step, flush=True)
""")


def test_kill_9_while_writing_a_checkpoint_leaves_the_previous_ones_intact(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    folder = tmp_path / "checkpoints"
    rng = random.Random(0)
    for _attempt in range(6):
        proc = _python(str(script), str(folder), cwd=tmp_path)
        saved = 0
        for line in proc.stdout:
            if line.startswith("saved"):
                saved = int(line.split()[1])
            elif line.startswith("writing") and saved >= 2:
                time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside torch.save / fsync / rename
                proc.kill()
                break
        proc.wait()
        torn = list(folder.glob(".*.tmp"))
        found = list_checkpoints(folder)
        assert found and checkpoint_steps(found)[-1] >= saved
        for path in found:  # every file that carries a checkpoint name is complete
            ckpt = read_checkpoint(path)
            assert torch.equal(ckpt["blob"], torch.full((6_000_000,), float(ckpt["step"])))
        if torn:  # the kill hit a write: the temporary file is left, never a step_*.pth
            break
        for p in folder.iterdir():
            p.unlink()
    else:
        pytest.fail("no kill landed inside a checkpoint write in 6 attempts")


def checkpoint_steps(paths: list[Path]) -> list[int]:
    return [int(p.stem.split("_")[1]) for p in paths]


# ---------------------------------------------------------------------------------------------
# Issue 17: a failed resume abandons nothing; nothing is written before an input error; non-finite runs stop


def test_a_failed_resume_changes_nothing_in_the_run_folder(tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    assert fit(tiny_config(demo_root, "train.iterations=4", "train.checkpoint_every=2"), run)[0] == 0
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002.pth", "step_00000004.pth"]
    # A resume checkpoint with an empty random state, placed where a resume would find it.
    broken = read_checkpoint(ckpts / "step_00000002.pth")
    broken["rng"] = {}
    torch.save(broken, ckpts / "step_00000003.pth")
    before = folder_snapshot(run)
    capsys.readouterr()
    failing = {
        "missing VGG weights (the issue's case)": (["--resume", str(ckpts / "step_00000002.pth"), "--set",
                                                   f"train.vgg_weights={tmp_path / 'nonexistent.pth'}"],
                                                  "nonexistent.pth"),
        "a checkpoint with an empty rng": (["--resume", str(ckpts / "step_00000003.pth")], "'rng'"),
        "another model width": (["--resume", str(ckpts / "step_00000002.pth"), "--set", "model.nf=16"],
                                "model config"),
        "an absurd learning rate": (["--resume", str(ckpts / "step_00000002.pth"), "--set", "train.lr=1e39"],
                                    "train.lr"),
    }
    for case, (args, named) in failing.items():
        assert main(["--out", str(run), *args]) == 2, case
        one_error_line(capsys.readouterr().err, named)
        assert folder_snapshot(run) == before, f"{case}: the run folder changed"
    # Once it resumes, the newer checkpoint is set aside (kept, not deleted), and the log says so.
    (ckpts / "step_00000003.pth").unlink()
    assert main(["--out", str(run), "--resume", str(ckpts / "step_00000002.pth"), "--set", "train.iterations=3"]) == 0
    assert (ckpts / "step_00000004.pth.abandoned").read_bytes() == before["checkpoints/step_00000004.pth"]
    assert "renamed to step_00000004.pth.abandoned" in (run / "train.log").read_text()
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_a_bad_vgg_weights_file_writes_nothing_before_the_error(tmp_path, demo_root, capsys):
    cfg_file = write_tiny_yaml(tmp_path / "tiny.yaml", demo_root)
    torch.save(torch.zeros(4), tmp_path / "tensor.pth")  # a tensor, not a state dict
    for vgg, named in [(tmp_path / "nonexistent.pth", "does not exist"), (tmp_path / "tensor.pth", "got a tensor")]:
        out = tmp_path / f"run_{vgg.stem}"
        assert main(["-c", str(cfg_file), "--out", str(out), "--set", f"train.vgg_weights={vgg}"]) == 2
        one_error_line(capsys.readouterr().err, str(vgg), "VGG19 weights file", named)
        assert not out.exists()  # no config.yaml, no train.log


def test_the_learning_rate_and_the_skip_limit_are_checked(capsys):
    with pytest.raises(ConfigError, match=r"train.lr must be in \(0, 1\], got 1e\+39"):
        load_config("demo", ["train.lr=1e39"])
    with pytest.raises(ConfigError, match="train.pixel_weight must be a finite number"):
        load_config("demo", ["train.pixel_weight=.nan"])
    with pytest.raises(ConfigError, match="train.max_consecutive_skips must be >= 1"):
        load_config("demo", ["train.max_consecutive_skips=0"])
    assert load_config("demo").train.max_consecutive_skips == 10
    assert main(["--set", "train.lr=1e39", "--out", "never-made"]) == 2
    one_error_line(capsys.readouterr().err, "train.lr")
    assert not Path("never-made").exists()


def test_skip_mode_stops_after_too_many_skipped_steps_and_exports_nothing(tmp_path, demo_root):
    cfg = tiny_config(demo_root, "train.nonfinite=skip", "train.max_consecutive_skips=3", "val.every=2",
                      "train.checkpoint_every=100")
    train, val = poisoned_loaders(cfg, set(range(1, 100)))  # every batch is NaN
    code, trainer = fit(cfg, tmp_path / "run", train_loader=train, val_loader=val)
    assert code == 1 and trainer.step == 3 and trainer.skipped == 3
    log = (tmp_path / "run" / "train.log").read_text()
    assert "3 steps in a row (steps 1 to 3)" in log and "train.max_consecutive_skips=3" in log
    rows = metrics(tmp_path / "run")
    assert rows and all(r["loss"] is None and r["loss_per_pixel"] is None for r in rows)  # never a 0.0 loss
    assert "no loss (all 1 step(s) since the last line were skipped" in log
    assert not (tmp_path / "run" / "checkpoints" / "best.pth").exists()
    assert not (tmp_path / "run" / "final_weights.pth").exists()

    # A run shorter than the limit whose every step was skipped: exit 1 too, and nothing exported.
    cfg = tiny_config(demo_root, "train.nonfinite=skip", "train.iterations=2", "val.every=1")
    train, val = poisoned_loaders(cfg, set(range(1, 100)))
    code, _ = fit(cfg, tmp_path / "short", train_loader=train, val_loader=val)
    assert code == 1
    assert "every step of this run (2)" in (tmp_path / "short" / "train.log").read_text()
    assert not (tmp_path / "short" / "checkpoints" / "best.pth").exists()
    assert not (tmp_path / "short" / "final_weights.pth").exists()


def test_the_log_shows_a_per_pixel_loss_and_says_what_the_sum_is(tmp_path, demo_root):
    cfg = tiny_config(demo_root, "train.iterations=2", "val.every=100", "val.max_images=1")
    assert fit(cfg, tmp_path / "run")[0] == 0
    values = cfg.data.batch_size * 3 * cfg.data.crop * cfg.data.crop  # the output values of one step
    log = (tmp_path / "run" / "train.log").read_text()
    for row in metrics(tmp_path / "run"):
        assert row["loss_per_pixel"] == pytest.approx(row["loss"] / values, rel=1e-12)
        assert 0 < row["loss_per_pixel"] < 2  # a Charbonnier-sized number, not a sum of 1e4-1e5
        assert f"step {row['step']}: loss {row['loss_per_pixel']:.5g} per pixel (batch sum {row['loss']:.5g}), lr" \
            in log
