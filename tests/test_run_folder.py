"""A run folder is never lost or mixed (issue 25 items 1-2), `--resume auto` inside the guard and the lock (issue 24
item 1). That lfpv_fast/training/run_folder.py is the one home of a run's file names: tests/test_one_home.py.

Promises tested (README, "Promises"): a folder holding any run artefact is a run, and a new run there is refused with
one `error:` line; a run holds an OS lock on its folder for its whole life, a second process on it stops at once
naming the holder, and a killed holder leaves no stale lock; `--resume auto` resumes the newest checkpoint or starts
a new run, saying which.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_one_line_error, folder_snapshot, metrics, run, write_tiny_yaml
from lfpv_fast.train import main
from lfpv_fast.training import run_folder
from lfpv_fast.training.checkpoint import list_checkpoints, read_checkpoint
from lfpv_fast.training.run_folder import RunFolder, RunFolderBusy


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_root) -> tuple[Path, Path]:
    """A finished tiny run (4 steps, a checkpoint every 2, validation every 2) and its config file."""
    base = tmp_path_factory.mktemp("finished")
    cfg_file = write_tiny_yaml(base / "tiny.yaml", demo_root, "train.iterations=4", "train.checkpoint_every=2",
                               "data.batch_size=8", "val.every=2", "val.max_images=1")
    assert main(["-c", str(cfg_file), "--out", str(base / "run")]) == 0
    return base / "run", cfg_file


# ---------------------------------------------------------------------------------------------
# 25.1 the guard


def test_a_finished_run_without_its_step_checkpoints_is_not_overwritten(finished_run, tmp_path, capsys):
    """The issue's case: a copy of a finished run minus checkpoints/step_*.pth. The old guard looked only for those."""
    source, cfg_file = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    for path in list_checkpoints(copy / "checkpoints"):
        path.unlink()
    before = folder_snapshot(copy)
    assert len(metrics(copy)) == 4
    code, err = run(main, ["-c", cfg_file, "--out", copy, "--set", "train.iterations=2"], capsys)
    line = assert_one_line_error(code, err, str(copy), "--resume", "--out")
    assert "final_weights.pth" in line or "config.yaml" in line  # names what it holds
    assert folder_snapshot(copy) == before


@pytest.mark.parametrize("artefact", ["config.yaml", "train.log", "metrics.jsonl", "val.jsonl",
                                      "final_weights.pth", "checkpoints/best.pth",
                                      "checkpoints/step_00000002.pth.abandoned", "images/step_00000002_x.png"])
def test_any_single_run_artefact_makes_a_folder_a_run(finished_run, tmp_path, capsys, artefact):
    _, cfg_file = finished_run
    folder = tmp_path / "run"
    (folder / artefact).parent.mkdir(parents=True, exist_ok=True)
    (folder / artefact).write_bytes(b"x")  # the guard goes by names: what the file holds does not matter
    before = folder_snapshot(folder)
    code, err = run(main, ["-c", cfg_file, "--out", folder], capsys)
    assert artefact in assert_one_line_error(code, err, "already holds a run", "--resume")
    assert folder_snapshot(folder) == before


def test_a_folder_without_run_artefacts_takes_a_new_run(finished_run, tmp_path, demo_root):
    _, cfg_file = finished_run
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)  # empty folders and unrelated files are not a run
    (folder / "notes.txt").write_text("mine")
    assert RunFolder(folder).artefacts() == []
    assert main(["-c", str(cfg_file), "--out", str(folder), "--set", "train.iterations=1"]) == 0
    assert (folder / "notes.txt").read_text() == "mine" and not (folder / run_folder.LOCK).exists()


# ---------------------------------------------------------------------------------------------
# 25.2 the lock


HOLDER = """
import sys, time
from lfpv_fast.training.run_folder import RunFolder
lock = RunFolder(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_a_locked_folder_stops_at_once_naming_the_holder(finished_run, tmp_path, capsys):
    _, cfg_file = finished_run
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        code, err = run(main, ["-c", cfg_file, "--out", folder, "--set", "train.iterations=1"], capsys)
        assert_one_line_error(code, err, str(folder), f"process {holder.pid}", "another --out")
        assert time.monotonic() - start < 30  # at once: no waiting for the holder
        code, err = run(main, ["--out", folder, "--resume", "auto", "-c", cfg_file], capsys)  # auto respects it too
        assert_one_line_error(code, err, f"process {holder.pid}")
        assert sorted(p.name for p in folder.iterdir()) == [run_folder.LOCK]  # nothing written beside the lock
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait(timeout=30)
    # No stale lock: the folder is free again at once, though the killed holder's lock file is still there.
    assert (folder / run_folder.LOCK).exists()
    lock = RunFolder(folder).lock()
    lock.release()


def test_two_trainers_on_one_folder_never_mix(finished_run, tmp_path):
    """The issue's case: two runs with different seeds started at once on one --out. One trains, the other stops
    with one line; the folder holds one run (one config, one seed's steps, each logged once)."""
    _, cfg_file = finished_run
    folder = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "lfpv_fast.train", "-c", str(cfg_file), "--out", str(folder),
                               "--set", f"train.seed={seed}", "--set", "train.iterations=3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [p.communicate(timeout=240) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1]
    lines = [line for line in loser.splitlines() if line.strip()]
    assert len(lines) == 1 and "is in use by another training run" in lines[0], loser
    winner_seed = (1, 2)[[p.returncode for p in procs].index(0)]
    assert read_checkpoint(folder / "final_weights.pth")["format"] == "lfpv_fast"
    assert f"seed: {winner_seed}" in (folder / "config.yaml").read_text()
    assert [r["step"] for r in metrics(folder)] == [1, 2, 3]


def test_a_killed_run_leaves_no_stale_lock(finished_run, tmp_path):
    _, cfg_file = finished_run
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lfpv_fast.train", "-c", str(cfg_file), "--out", str(folder),
                             "--set", "train.iterations=100000", "--set", "train.checkpoint_every=1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(folder / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        assert (folder / run_folder.LOCK).read_text().split()[0] == str(proc.pid)
        with pytest.raises(RunFolderBusy, match=f"process {proc.pid}"):
            RunFolder(folder).lock()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert main(["--out", str(folder), "--resume", "auto", "--set", "train.iterations=2"]) == 0


def test_a_run_that_cannot_start_leaves_neither_lock_nor_folder(finished_run, tmp_path, capsys):
    """The lock is taken before the checks (so two starts cannot both pass them), and given back with what it made."""
    _, cfg_file = finished_run
    out = tmp_path / "new" / "nested" / "run"
    code, err = run(main, ["-c", cfg_file, "--out", out, "--set", f"train.vgg_weights={tmp_path / 'missing.pth'}"],
                    capsys)
    assert_one_line_error(code, err, "missing.pth")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 24.1 --resume auto


def test_resume_auto_starts_new_then_continues_and_says_which(finished_run, tmp_path, capsys):
    _, cfg_file = finished_run
    folder = tmp_path / "run"
    args = ["-c", str(cfg_file), "--out", str(folder), "--resume", "auto", "--set", "train.checkpoint_every=2"]
    assert main([*args, "--set", "train.iterations=2"]) == 0
    assert "--resume auto: no checkpoint in" in capsys.readouterr().out
    assert main([*args, "--set", "train.iterations=4"]) == 0
    out = capsys.readouterr().out
    assert f"--resume auto: resuming from {folder / 'checkpoints' / 'step_00000002.pth'}" in out
    assert [r["step"] for r in metrics(folder)] == [1, 2, 3, 4]


def test_resume_auto_restarts_a_run_that_never_reached_a_checkpoint_only_if_it_is_this_run(finished_run, tmp_path,
                                                                                           capsys):
    """An elastic restart before the first checkpoint leaves config, log and metrics but no checkpoint: the same
    config starts again from step 0 (the metrics cut back); another config there is another run, refused."""
    _, cfg_file = finished_run
    folder = tmp_path / "run"
    args = ["-c", str(cfg_file), "--out", str(folder), "--resume", "auto", "--set", "train.iterations=3",
            "--set", "train.checkpoint_every=100"]
    assert main(args) == 0
    for path in [*list_checkpoints(folder / "checkpoints"), folder / "final_weights.pth"]:
        path.unlink()  # as if killed after step 3, before any checkpoint or export
    capsys.readouterr()
    code, err = run(main, [*args, "--set", "train.seed=5"], capsys)
    assert_one_line_error(code, err, "already holds a run", "not this run's config")
    assert main(args) == 0
    assert "starting it again from step 0" in capsys.readouterr().out
    assert [r["step"] for r in metrics(folder)] == [1, 2, 3]
    # A finished run whose checkpoints are gone is never restarted over its exported weights.
    for path in list_checkpoints(folder / "checkpoints"):
        path.unlink()
    code, err = run(main, args, capsys)
    assert_one_line_error(code, err, "already holds a run", "exported weights")


# ---------------------------------------------------------------------------------------------
# 26.2 one home for the run folder's names


def test_preparing_a_run_removes_the_temporaries_of_killed_writes_everywhere_in_it(tmp_path):
    """kill -9 inside an atomic write leaves `.<name>.<random>.tmp` beside the file: checkpoints, the exported
    weights, config.yaml, validation images. Starting or resuming the run removes them; other files stay."""
    folder = RunFolder(tmp_path / "run")
    folder.checkpoints.mkdir(parents=True)
    folder.images.mkdir()
    stale = [folder.root / f".{run_folder.FINAL_WEIGHTS}.x1.tmp", folder.root / f".{run_folder.CONFIG}.x2.tmp",
             folder.checkpoints / ".step_00000004.pth.x3.tmp", folder.images / ".step_4.png.x4.tmp"]
    kept = [folder.root / run_folder.FINAL_WEIGHTS, folder.checkpoints / "step_00000004.pth"]
    for path in stale + kept:
        path.write_bytes(b"x")
    folder.prepare("model: {}\n")
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert folder.config.read_text() == "model: {}\n"


def test_a_resumed_run_sets_aside_the_newer_and_the_unreadable_checkpoints_and_cuts_its_rows_back(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.checkpoints.mkdir(parents=True)
    for step in (2, 4, 6):
        folder.checkpoint(step).write_bytes(b"x")
    folder.metrics.write_text("".join(f'{{"step": {step}}}\n' for step in (1, 2, 3, 4)) + '{"step": 5, "lo')
    moved = folder.set_aside_after_resume(2, [folder.checkpoint(6)])
    assert [(p.name, q.name, damaged) for p, q, damaged in moved] == [
        ("step_00000004.pth", "step_00000004.pth.abandoned", False),
        ("step_00000006.pth", "step_00000006.pth.damaged", True)]
    assert [p.name for p in folder.list_checkpoints()] == ["step_00000002.pth"]
    assert folder.metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
