"""Fault injection on a training run: kill -9 during checkpoint writes, and a disk that fills up.

Promises tested (README, "Commands"): a resume never loses a checkpoint; nothing half-written is ever left
under a checkpoint's name; a full disk is one `error:` line, with no temporary file left and the checkpoints
written before intact.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import metrics, one_error_line, tiny_config, write_tiny_yaml
from lfpv_fast.config import load_config
from lfpv_fast.train import main
from lfpv_fast.training.checkpoint import (
    check_training_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)

# The real `python -m lfpv_fast.train`, with every checkpoint write announced on stdout (so the test can kill
# the process while one is under way) and made longer by a padding tensor, so that a kill lands inside it.
LAUNCHER = textwrap.dedent("""
    import sys
    import torch
    from lfpv_fast import train
    from lfpv_fast.training import checkpoint

    real_save = checkpoint.atomic_save

    def announced_save(obj, path):
        if isinstance(obj, dict) and "optimizer" in obj:
            obj = dict(obj, padding=torch.zeros(3_000_000))
        print("writing", path, flush=True)
        real_save(obj, path)
        print("written", path, flush=True)

    checkpoint.atomic_save = announced_save
    sys.exit(train.main(sys.argv[1:]))
""")


def _start(launcher: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(launcher), *args], cwd=launcher.parent, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_nothing_half_written(run: Path, model_config) -> None:
    """Every file under a checkpoint's name is complete and resumable; only temporary files may be torn."""
    for path in [*list_checkpoints(run / "checkpoints"), run / "checkpoints" / "best.pth"]:
        if path.exists():
            check_training_checkpoint(read_checkpoint(path), path, model_config)


@pytest.mark.slow
def test_kill_9_during_training_checkpoint_writes_then_resume_is_exact(tmp_path, demo_root):
    iterations = 10
    # One CPU thread on both sides: the in-process run would otherwise take whatever thread count an earlier test
    # in this worker process left (a sum split over other threads rounds differently), the subprocess the default.
    cfg_file = write_tiny_yaml(tmp_path / "tiny.yaml", demo_root, f"train.iterations={iterations}",
                               "train.checkpoint_every=1", "train.keep_checkpoints=2", "val.every=3",
                               "val.max_images=1", "train.cpu_threads=1")
    model_config = load_config(cfg_file).model
    launcher = tmp_path / "launch_train.py"
    launcher.write_text(LAUNCHER)

    assert main(["-c", str(cfg_file), "--out", str(tmp_path / "reference")]) == 0  # uninterrupted, in-process

    run = tmp_path / "run"
    rng = random.Random(0)
    kills, torn_temporaries, args = 0, 0, ["-c", str(cfg_file), "--out", str(run)]
    while kills < 4:
        proc = _start(launcher, *args)
        # Kill at a random checkpoint write of this process (not before one step has been saved by it).
        target, writes, killed = rng.randint(2, 4), 0, False
        for line in proc.stdout:
            if line.startswith("writing"):
                writes += 1
                if writes == target:
                    time.sleep(rng.uniform(0.0, 0.03))  # somewhere inside torch.save / fsync / rename
                    proc.kill()
                    killed = True
                    break
        proc.wait(timeout=600)
        if not killed:  # the run finished before the chosen write: fine, it is then complete
            break
        kills += 1
        torn_temporaries += len(list((run / "checkpoints").glob(".*.tmp")))
        _assert_nothing_half_written(run, model_config)
        assert latest_checkpoint(run) is not None
        args = ["--out", str(run), "--resume"]
    if kills:
        proc = _start(launcher, *args)
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output
    assert kills >= 2, "the run finished before the kills could land"

    # Nothing half-written is left once the run has finished, and the resumed run is the uninterrupted one.
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    _assert_nothing_half_written(run, model_config)
    expected, got = metrics(tmp_path / "reference"), metrics(run)
    assert [r["step"] for r in got] == list(range(1, iterations + 1))
    for a, b in zip(expected, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), f"step {a['step']}"
    final_reference = read_checkpoint(tmp_path / "reference" / "final_weights.pth")["model"]
    final_resumed = read_checkpoint(run / "final_weights.pth")["model"]
    for key, value in final_reference.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    print(f"{kills} kills, {torn_temporaries} of them left a torn temporary file (removed on resume)")


def test_a_disk_that_fills_up_while_saving_a_checkpoint_stops_with_one_error_line(tmp_path, demo_root,
                                                                                    small_filesystem, capsys):
    folder = small_filesystem(8 * 1024)
    run = folder / "run"
    cfg_file = write_tiny_yaml(tmp_path / "tiny.yaml", demo_root, "train.iterations=3", "train.checkpoint_every=3",
                               "val.every=100", "val.max_images=1")
    assert main(["-c", str(cfg_file), "--out", str(run)]) == 0
    step_3 = run / "checkpoints" / "step_00000003.pth"
    before = step_3.read_bytes()
    # Fill the disk, leaving room for the log lines but not for a checkpoint.
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    room = max(len(before) // 3, 16 * 1024)
    assert free > room + len(before)
    (folder / "filler").write_bytes(b"\0" * (free - room))
    capsys.readouterr()

    # Steps 4-6, then the checkpoint of step 6 does not fit.
    code = main(["--out", str(run), "--resume", "--set", "train.iterations=7"])
    err = capsys.readouterr().err
    assert code == 1, err
    line = one_error_line(err, "step_00000006.pth", "No space left on device")
    assert line.startswith("error: could not write "), err
    assert not [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]  # the temporary file is removed
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003.pth"]
    assert step_3.read_bytes() == before  # the old checkpoint is intact and still resumes
    check_training_checkpoint(read_checkpoint(step_3), step_3, tiny_config(demo_root).model)
