"""Inputs of a hostile but realistic user (issue 25, items 3-12): each is refused with one short `error:` line
naming what is wrong, without a traceback, a hang or a huge allocation."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace as dataclass_replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, assert_one_line_error, folder_snapshot, run, write_noise_png
from lfpv_fast import LFPVNet
from lfpv_fast.config import model_config_to_dict
from lfpv_fast.training.checkpoint import atomic_save, load_model, weights_only_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tiny_weights(path: Path, **model_config) -> Path:
    """TINY's weights, under a model config with `model_config` changed (a file edited or forged; flat keys such
    as nf=512 go to their place in the nested section, as the file would hold them)."""
    torch.manual_seed(0)
    obj = weights_only_checkpoint(LFPVNet(TINY, backend="reference"))
    if model_config:
        obj["model_config"] = model_config_to_dict(dataclass_replace(TINY, **model_config))
    atomic_save(obj, path)
    return path


def run_measured(code: str, *args: str) -> tuple[int, str, int]:
    """Exit status, stderr and peak RSS (bytes) of `code` run in a fresh Python (argv[1:] = args)."""
    wrapper = ("import resource, sys\n"
               "try:\n"
               f"    status = {code}\n"
               "finally:\n"
               "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n"
               "sys.exit(status)\n")
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    lines = done.stderr.splitlines()
    peaks = [int(line.split()[1]) for line in lines if line.startswith("PEAK ")]
    err = "\n".join(line for line in lines if not line.startswith("PEAK "))
    return done.returncode, err, peaks[-1] if peaks else -1


# ---------------------------------------------------------------------------------------------
# 3. A tiny checkpoint whose config claims a huge network


def test_a_tiny_checkpoint_claiming_a_huge_network_is_refused_with_a_small_peak(tmp_path):
    checkpoint = tiny_weights(tmp_path / "forged.pth", nf=512)  # building nf=512 takes about 2 GB
    image = write_noise_png(tmp_path / "a.png", 16, 16)
    enhance = "__import__('lfpv_fast.enhance').enhance.main(sys.argv[1:])"
    code, err, peak = run_measured(enhance, str(image), "--checkpoint", str(checkpoint), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "forged.pth", "nf=512", "differ in shape")
    # The same command with the checkpoint as it was saved (it enhances the image): the refusal costs no more.
    code, err, baseline = run_measured(enhance, str(image), "--checkpoint", str(tiny_weights(tmp_path / "ok.pth")),
                                       "-o", str(tmp_path / "out"), "-q")
    assert code == 0, err
    assert peak < baseline + 200 * 2**20, f"peak RSS {peak / 2**30:.2f} GiB refusing a 3 MB checkpoint, " \
                                          f"{baseline / 2**30:.2f} GiB enhancing with a good one"


def test_a_network_too_big_for_the_memory_here_is_refused_before_it_is_built(tmp_path, monkeypatch):
    from lfpv_fast.inference import whole_image as inference

    checkpoint = tiny_weights(tmp_path / "tiny.pth")
    built = []
    monkeypatch.setattr(inference, "available_memory", lambda device: 2**20)  # 1 MiB free
    monkeypatch.setattr(LFPVNet, "__init__", _recording_init(built))
    with pytest.raises(ValueError) as info:
        load_model(checkpoint, backend="reference")
    line = str(info.value)
    assert "\n" not in line and "tiny.pth" in line and "GiB available" in line, line
    assert built and set(built) == {"meta"}, f"the network was built on {built} before its size was checked"


def test_a_published_retinexformer_file_is_checked_before_it_is_built(tmp_path, monkeypatch):
    """Published Retinexformer files (plain Retinexformer, options from the config): a wrong shape, and a network
    too big for the memory here (Retinexformer's own activation estimate), are refused on the meta device."""
    from lfpv_fast.inference import whole_image as inference
    from lfpv_fast.models import ModelConfig, RetinexFormer

    config = ModelConfig("retinexformer", {"n_feat": 8, "num_blocks": [1, 1, 1]}, {"enabled": False})
    state = RetinexFormer(n_feat=8, num_blocks=[1, 1, 1], backend="reference").published_state_dict()
    good = tmp_path / "retinexformer.pth"
    torch.save({"params": state}, good)
    malformed = tmp_path / "malformed.pth"
    torch.save({"params": {**state, "body.0.estimator.conv1.weight": torch.zeros(9, 4, 1, 1)}}, malformed)
    built: list[str] = []
    monkeypatch.setattr(LFPVNet, "__init__", _recording_init(built))
    with pytest.raises(ValueError, match=r"malformed\.pth: key 'body\.0\.estimator\.conv1\.weight'.*shape"):
        load_model(malformed, backend="reference", config=config)
    assert built == ["meta"], f"the network was built on {built} before its weights were checked"
    built.clear()
    monkeypatch.setattr(inference, "available_memory", lambda device: 2**12)  # 4 KiB free (its weights take 0.2 MB)
    with pytest.raises(ValueError) as info:
        load_model(good, backend="reference", config=config)
    line = str(info.value)
    assert "\n" not in line and "retinexformer.pth" in line and "GiB available" in line, line
    assert built and set(built) == {"meta"}, f"the network was built on {built} before its size was checked"
    monkeypatch.undo()
    assert load_model(good, backend="reference", config=config).backbone.n_feat == 8  # the file itself is fine


def _recording_init(built: list[str]):
    original = LFPVNet.__init__

    def init(self, *args, **kwargs):
        built.append(torch.empty(0).device.type)  # the default device: meta inside build_on_meta
        original(self, *args, **kwargs)

    return init


# ---------------------------------------------------------------------------------------------
# 4. Bad values inside a training checkpoint's optimizer and scheduler state


def _set_first_moment(obj: dict, shape: tuple[int, ...]) -> None:
    obj["optimizer"]["state"][0]["exp_avg"] = torch.zeros(shape)


OPTIMIZER_DAMAGE = {
    "lr 1e39": (lambda obj: obj["optimizer"]["param_groups"][0].update(lr=1e39), "lr"),
    "betas (5, 5)": (lambda obj: obj["optimizer"]["param_groups"][0].update(betas=(5.0, 5.0)), "betas"),
    "eps 0": (lambda obj: obj["optimizer"]["param_groups"][0].update(eps=0.0), "eps"),
    "exp_avg of another shape": (lambda obj: _set_first_moment(obj, (3, 3)), "exp_avg"),
    "exp_avg_sq with NaN": (lambda obj: obj["optimizer"]["state"][0]["exp_avg_sq"].fill_(float("nan")), "exp_avg_sq"),
    "a negative step count": (lambda obj: obj["optimizer"]["state"][0].update(step=torch.tensor(-3.0)), "step"),
    "state of a parameter no group holds": (lambda obj: obj["optimizer"]["state"].update({10**6: {}}), "1000000"),
    "scheduler base lr inf": (lambda obj: obj["scheduler"].update(base_lrs=[float("inf")]), "base_lrs"),
    "scheduler last_epoch -5": (lambda obj: obj["scheduler"].update(last_epoch=-5), "last_epoch"),
}


def test_bad_optimizer_and_scheduler_state_is_refused_before_the_run_folder_changes(tmp_path, demo_root, capsys):
    from helpers import tiny_config
    from lfpv_fast.train import main
    from lfpv_fast.training.checkpoint import list_checkpoints, read_checkpoint
    from lfpv_fast.training.trainer import Trainer

    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(demo_root, "train.iterations=2", "train.checkpoint_every=2"), run_dir)
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    good = list_checkpoints(run_dir / "checkpoints")[-1]
    damaged = tmp_path / "damaged.pth"
    capsys.readouterr()
    for case, (damage, named) in OPTIMIZER_DAMAGE.items():
        obj = read_checkpoint(good)
        damage(obj)
        torch.save(obj, damaged)
        before = folder_snapshot(run_dir)
        code, err = run(main, ["--out", run_dir, "--resume", damaged, "--set", "train.iterations=3"], capsys)
        assert code == 2, f"{case}: exit {code}, {err[-400:]}"
        assert_one_line_error(code, err, "damaged.pth", named)
        assert folder_snapshot(run_dir) == before, f"{case}: the run folder changed"


# ---------------------------------------------------------------------------------------------
# 5. A YAML alias bomb; every error line short


def alias_bomb(levels: int) -> str:
    """YAML whose `levels` levels of anchors each repeat the one before 9 times: 9**levels values."""
    anchors = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(anchors)}]"


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    from lfpv_fast.evaluate import main as evaluate_main
    from lfpv_fast.train import main as train_main

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"train:\n  seed: {alias_bomb(7)}\n")  # 4.8 million values once expanded, 400 bytes
    assert len(bomb.read_bytes()) < 600
    code, err = run(train_main, ["-c", bomb, "--out", tmp_path / "run"], capsys)
    line = assert_one_line_error(code, err, "bomb.yaml", "aliases")
    assert len(line) < 400, line[:1000]
    assert not (tmp_path / "run").exists()
    # The same document as a --set value.
    code, err = run(evaluate_main, ["-c", "demo", "--checkpoint", tmp_path / "none.pth", "--out", tmp_path / "e.json",
                                    "--set", f"train.seed={alias_bomb(6)}"],
                    capsys)
    line = assert_one_line_error(code, err, "--set train.seed=", "aliases")
    assert len(line) < 600, line[:1000]


def test_a_long_value_is_cut_in_the_error_line(tmp_path, capsys):
    from lfpv_fast.train import main as train_main

    long_list = "[" + ", ".join(["'x'"] * 3000) + "]"  # 3000 values: under the bound, but 15 kB to print
    code, err = run(train_main, ["--out", tmp_path / "run", "--set", f"train.seed={long_list}"], capsys)
    line = assert_one_line_error(code, err, "train.seed", "expected int")
    assert len(line) < 600, line[:1000]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 6. Configs that passed validation and crashed at step 1: the model's own rules, checked up front


@pytest.mark.parametrize("overrides, named", [
    # With the backbone seam the alignment is lcm(4 * token_size, 4 * patch_size): token 5 / patch 2 aligns to 40,
    # token 3 / patch 4 to 48 (both train, see below); a crop under that alignment is the config error.
    (["model.token_size=5", "model.patch_size=2", "data.crop=32"], "data.crop must be in [40,"),
    (["model.token_size=3", "model.patch_size=4", "data.crop=40"], "data.crop must be in [48,"),
    (["model.token_size=8", "data.crop=16"], "data.crop must be in [32,"),
    (["model.token_size=8", "data.resize=[960, 24]", "data.crop=24"], "data.resize must be"),
    (["train.cpu_threads=100000"], "train.cpu_threads must be in [1,"),
])
def test_configs_that_break_the_models_rules_are_config_errors(tmp_path, capsys, overrides, named):
    from lfpv_fast.train import main as train_main

    argv = ["--out", tmp_path / "run"]
    for override in overrides:
        argv += ["--set", override]
    code, err = run(train_main, argv, capsys)
    assert_one_line_error(code, err, named)
    assert not (tmp_path / "run").exists()


def test_the_models_rules_accept_what_the_model_runs(tmp_path):
    """The rules are the model's: a config they accept trains a step (token 2, patch 1: 8-pixel crops)."""
    import os

    from lfpv_fast.config import load_config

    cfg = load_config("demo", ["model.token_size=2", "model.patch_size=1", "data.crop=8",
                               f"train.cpu_threads={os.cpu_count()}"])
    assert cfg.model.align == 8
    # token 2 / patch 1, and the pairs that crashed before the seam aligned inputs to whole patches as well as
    # whole tokens (patch_size need not divide token_size): each trains a step at its alignment.
    for token, patch, align in ((2, 1, 8), (5, 2, 40), (3, 4, 48)):
        assert load_config("demo", [f"model.token_size={token}", f"model.patch_size={patch}",
                                    f"data.crop={align}"]).model.align == align
        net = LFPVNet(dataclass_replace(TINY, token_size=token, patch_size=patch), backend="reference").train()
        x = torch.rand(2, 3, align, align)
        out, without = net(x, net.snr_mask(x))
        assert out.shape == without.shape == x.shape and bool(torch.isfinite(out).all())


# ---------------------------------------------------------------------------------------------
# 7. Names too long for the file system


LONG_NAME = "a" * 300  # over the 255 bytes of a file name


def test_over_long_names_in_enhance_are_one_line_naming_the_file(tmp_path, tiny_checkpoint, capsys):
    from lfpv_fast.enhance import main as enhance_main

    image = write_noise_png(tmp_path / "a.png", 16, 16)
    long_path = tmp_path.joinpath(*["b" * 100] * 45)  # 4.5 kB: over the 4096 bytes of a path
    cases = {
        "input": [tmp_path / f"{LONG_NAME}.png", "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint],
        "-o": [image, "-o", tmp_path / LONG_NAME, "--checkpoint", tiny_checkpoint],
        "--checkpoint": [image, "-o", tmp_path / "out", "--checkpoint", tmp_path / f"{LONG_NAME}.pth"],
        "a 4.5 kB path": [long_path, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint],
    }
    for case, argv in cases.items():
        code, err = run(enhance_main, argv, capsys)
        line = assert_one_line_error(code, err, "too long", "aaaa" if case != "a 4.5 kB path" else "bbbb")
        assert len(line) < 500 and "Errno" not in line, (case, line)
    assert not (tmp_path / "out").exists()


def test_over_long_names_in_evaluate_are_one_line_naming_the_file(tmp_path, tiny_checkpoint, capsys):
    from lfpv_fast.evaluate import main as evaluate_main

    cases = {
        "--checkpoint": ["-c", "demo", "--checkpoint", tmp_path / f"{LONG_NAME}.pth", "--out", tmp_path / "e.json"],
        "--out": ["-c", "demo", "--checkpoint", tiny_checkpoint, "--out", tmp_path / f"{LONG_NAME}.json"],
        "-c": ["-c", tmp_path / f"{LONG_NAME}.yaml", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "e.json"],
        "--save-images": ["-c", "demo", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "e.json",
                          "--save-images", tmp_path / LONG_NAME],
    }
    for case, argv in cases.items():
        code, err = run(evaluate_main, argv, capsys)
        line = assert_one_line_error(code, err, "too long", "aaaa")
        assert len(line) < 500 and "Errno" not in line, (case, line)
    assert not (tmp_path / "e.json").exists()


def test_over_long_names_in_the_app(tmp_path, tiny_checkpoint, capsys):
    import socket

    from lfpv_fast import app as app_mod

    with socket.socket() as probe:  # a free port, so that the address check passes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = run(app_mod.main, ["--checkpoint", tmp_path / f"{LONG_NAME}.pth", "--device", "cpu", "--port", port],
                    capsys)
    assert_one_line_error(code, err, "checkpoint", "too long", "aaaa")
    # An upload whose name fits the file system, but not with "_enhanced" added: its outputs get a cut name.
    name = "c" * 250 + ".png"
    upload = write_noise_png(tmp_path / "upload.png", 16, 16)
    enhancer = app_mod.Enhancer(load_model(tiny_checkpoint, backend="reference"), tiny_checkpoint,
                                torch.device("cpu"))
    (tmp_path / "work").mkdir()
    done = enhancer.enhance_file(upload, name, tmp_path / "work")
    assert done.output.is_file() and done.output.name.startswith("c" * 100) and len(done.output.name) < 255


# ---------------------------------------------------------------------------------------------
# 8. Tiling small images: the overlap shrinks with the tile; the tile rule is the model's alignment


def test_tiling_small_images_works_and_the_overlap_shrinks_with_the_tile(tmp_path, tiny_checkpoint, capsys):
    from lfpv_fast.enhance import main as enhance_main
    from lfpv_fast.inference.enhancement import overlap_for, tile_starts

    assert tile_starts(48, 48, 64) == [0]  # one tile on an axis: no neighbour to overlap
    assert overlap_for(16, None) == 8 and overlap_for(1024, None) == 64 and overlap_for(16, 3) == 3
    cases = {"40x56 --max-pixels 100": ((40, 56), ["--max-pixels", "100"]),
             "17x1000 --tile 256": ((17, 1000), ["--tile", "256"]),
             "40x56 --tile 16": ((40, 56), ["--tile", "16"])}
    for case, ((height, width), flags) in cases.items():
        out = tmp_path / case.replace(" ", "_")
        image = write_noise_png(tmp_path / f"{height}x{width}.png", height, width)
        code, err = run(enhance_main, [image, "-o", out, "--checkpoint", tiny_checkpoint, "-q", *flags], capsys)
        assert code == 0, (case, err)
        with Image.open(out / image.name) as result:
            assert result.size == (width, height), case


def test_the_tile_rule_is_the_models_alignment(tmp_path, tiny_checkpoint, capsys):
    from lfpv_fast.enhance import main as enhance_main

    image = write_noise_png(tmp_path / "a.png", 40, 56)
    code, err = run(enhance_main, [image, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint, "--tile", "24"],
                    capsys)
    assert_one_line_error(code, err, "--tile must be a positive multiple of 16", "got 24")
    assert not (tmp_path / "out").exists()
    # A model aligned to 8 (token_size 2) takes 24-pixel tiles.
    torch.manual_seed(0)
    small = tmp_path / "align8.pth"
    atomic_save(weights_only_checkpoint(LFPVNet(dataclass_replace(TINY, token_size=2, patch_size=2),
                                                backend="reference")), small)
    code, err = run(enhance_main, [image, "-o", tmp_path / "out", "--checkpoint", small, "--tile", "24", "-q"], capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# 9. Ctrl-C in prepare and enhance


SLOW_PREPARE = """
import signal, sys, time
# A shell without job control starts background commands with SIGINT ignored, and a Python started so keeps it
# ignored: restore Ctrl-C's default (KeyboardInterrupt), as in a terminal, so the test runs anywhere.
signal.signal(signal.SIGINT, signal.default_int_handler)
import lfpv_fast.prepare as prepare
convert = prepare._convert
def slow(*args):
    time.sleep(0.05)
    convert(*args)
prepare._convert = slow
sys.exit(prepare.main(sys.argv[1:]))
"""

SLOW_ENHANCE = """
import signal, sys, time
# A shell without job control starts background commands with SIGINT ignored, and a Python started so keeps it
# ignored: restore Ctrl-C's default (KeyboardInterrupt), as in a terminal, so the test runs anywhere.
signal.signal(signal.SIGINT, signal.default_int_handler)
from lfpv_fast import enhance
from lfpv_fast.inference.enhancement import ImageEnhancer
write = ImageEnhancer.write
def slow(path, image, result):
    write(path, image, result)
    time.sleep(0.2)
ImageEnhancer.write = staticmethod(slow)
sys.exit(enhance.main(sys.argv[1:]))
"""


def _interrupt_when(process: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the work did not start in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)


def test_ctrl_c_stops_prepare_at_once_leaving_whole_frames_and_one_line(tmp_path):
    from helpers import write_tree

    rng = np.random.default_rng(0)
    lq, gt = write_tree(tmp_path / "raw", {"s1": [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                                                  for _ in range(300)]},
                        {"s1": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)}, decoys=False)
    out = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, "--lq", str(lq), "--gt", str(gt), "--out",
                                str(out), "--resize", "8", "8", "--workers", "2", "--no-progress"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def frames() -> int:
        return len(list((out / "lq" / "s1").glob("*.npy"))) if (out / "lq" / "s1").is_dir() else 0

    _interrupt_when(process, lambda: frames() >= 10)
    at_signal = frames()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and str(out) in lines[0], err
    # Queued frames were not started: at most the two being written when the signal came (and one finishing).
    assert frames() - at_signal <= 3, (at_signal, frames())
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.is_file()], "temporary files left"


def test_ctrl_c_in_enhance_is_one_line_and_leaves_whole_outputs(tmp_path, tiny_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(30):
        write_noise_png(inputs / f"{k:02d}.png", 16, 16, seed=k)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_ENHANCE, str(inputs), "-o", str(out), "--checkpoint",
                                str(tiny_checkpoint), "-q"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _interrupt_when(process, lambda: out.is_dir() and len(list(out.glob("*.png"))) >= 2)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    written = sorted(out.iterdir())
    assert 2 <= len(written) < 30 and all(p.suffix == ".png" for p in written), written
    for path in written:
        with Image.open(path) as image:
            image.load()  # whole files only


# ---------------------------------------------------------------------------------------------
# 10. A full disk outside a checkpoint save: one rule (status 1, the file named, no partial file, results first)


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory) -> Path:
    from lfpv_fast.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root)
    return root


def test_evaluate_save_images_onto_a_full_disk_prints_results_then_names_the_file(demo_images, tmp_path, capsys,
                                                                                    small_filesystem,
                                                                                    tiny_checkpoint):
    import json
    import os

    from lfpv_fast.evaluate import main as evaluate_main

    disk = small_filesystem(256)
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 40_000))  # room for about one image
    out = tmp_path / "res.json"
    argv = ["-c", "smid", "--device", "cpu", "--no-progress", "--checkpoint", tiny_checkpoint, "--out", out,
            "--max-images", "4", "--save-images", disk / "img"]
    for override in ("data.dataset=demo", f"data.demo_root={demo_images}", "data.resize=[256, 192]",
                     "data.crop=128", "data.num_workers=0"):
        argv += ["--set", override]
    code = evaluate_main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "mean of scenes" in captured.out  # the results first
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write {disk / 'img'}/"), captured.err
    assert "No space left on device" in lines[0] and ".png" in lines[0]
    assert json.loads(out.read_text())["save_images_error"].startswith("could not write")
    saved = list((disk / "img").iterdir())
    assert all(p.suffix == ".png" and not p.name.startswith(".") and p.stat().st_size > 0 for p in saved), saved
    for path in saved:
        with Image.open(path) as image:
            image.load()


def test_validation_images_onto_a_full_disk_stop_training_naming_the_file(tmp_path, demo_root, capsys,
                                                                           monkeypatch):
    import errno

    from helpers import TINY_RUN
    from lfpv_fast.io import files
    from lfpv_fast.train import main as train_main

    real = files.atomic_write

    def full_for_images(path, write):
        if Path(path).parent.name == "images":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(files, "atomic_write", full_for_images)
    argv = ["--out", tmp_path / "run"]
    for override in [*TINY_RUN, f"data.demo_root={demo_root}", "train.iterations=2", "val.every=1",
                     "val.save_images=1"]:
        argv += ["--set", override]
    code, err = run(train_main, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err
    assert len(lines) == 1 and f"could not write {tmp_path / 'run' / 'images'}/step_" in lines[0], err
    assert "No space left on device" in lines[0]
    assert not list((tmp_path / "run" / "images").glob(".*")), "a temporary file was left"


# ---------------------------------------------------------------------------------------------
# 11. --side-by-side with a file name that is not UTF-8


def test_side_by_side_with_a_name_that_is_not_utf8(tmp_path, tiny_checkpoint, capsys):
    import os

    from lfpv_fast.enhance import main as enhance_main
    from lfpv_fast.enhance import side_by_side_owner

    inputs = tmp_path / "in"
    inputs.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: Python sees a surrogate
    write_noise_png(inputs / name, 16, 16)
    out = tmp_path / "out"
    for extra in ([], ["--overwrite"]):  # the second call reads the owner recorded by the first
        code, err = run(enhance_main, [inputs, "-o", out, "--checkpoint", tiny_checkpoint, "-q", "--side-by-side",
                                       *extra], capsys)
        assert code == 0, err
    side = out / os.fsdecode(b"caf\xe9_side_by_side.png")
    assert (out / name).is_file() and side.is_file()
    assert side_by_side_owner(side) == "caf\\udce9.png"


# ---------------------------------------------------------------------------------------------
# 12. Smaller ones


def test_evaluate_writes_valid_json_when_a_psnr_is_infinite(demo_images, tmp_path, capsys, monkeypatch,
                                                            tiny_checkpoint):
    import json

    from lfpv_fast import evaluate as evaluate_module

    real = evaluate_module.evaluate

    def an_output_equal_to_its_target(*args, **kwargs):
        summary = real(*args, **kwargs)
        summary["per_frame"][0]["psnr"] = float("inf")  # what psnr() gives for identical images
        summary["psnr_all_frames"] = float("inf")
        return summary

    monkeypatch.setattr(evaluate_module, "evaluate", an_output_equal_to_its_target)
    out = tmp_path / "res.json"
    argv = ["-c", "smid", "--device", "cpu", "--no-progress", "--checkpoint", tiny_checkpoint, "--out", out,
            "--max-images", "2"]
    for override in ("data.dataset=demo", f"data.demo_root={demo_images}", "data.resize=[256, 192]",
                     "data.crop=128", "data.num_workers=0"):
        argv += ["--set", override]
    assert evaluate_module.main([str(a) for a in argv]) == 0, capsys.readouterr().err

    def no_constants(name: str):
        raise AssertionError(f"{name} is not JSON")

    result = json.loads(out.read_text(), parse_constant=no_constants)
    assert result["per_frame"][0]["psnr"] is None and result["psnr_all_frames"] is None
    assert result["non_finite"]["count"] == 2 and "per_frame[0].psnr = inf" in result["non_finite"]["values"]


def test_the_non_finite_loss_error_goes_to_stderr(tmp_path, demo_root, capsys, monkeypatch):
    from helpers import TINY_RUN
    from lfpv_fast.train import main as train_main
    from lfpv_fast.training import trainer as trainer_module

    real = trainer_module.charbonnier_loss
    monkeypatch.setattr(trainer_module, "charbonnier_loss", lambda out, gt: real(out, gt) * float("nan"))
    argv = ["--out", tmp_path / "run"]
    for override in [*TINY_RUN, f"data.demo_root={demo_root}", "train.iterations=2"]:
        argv += ["--set", override]
    code = train_main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 1
    assert "error: non-finite loss" in captured.err and "error:" not in captured.out, captured


def test_config_file_errors_are_one_line_naming_the_file(tmp_path, capsys):
    from lfpv_fast.train import main as train_main

    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1, 2\n  seed: 3\n")
    code, err = run(train_main, ["-c", broken, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, f"{broken}:3:7: not valid YAML")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  seed: 1  # café\n".encode("latin-1"))
    code, err = run(train_main, ["-c", latin, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, str(latin), "not UTF-8")
    for value in ("1180591620717411303424", "-5"):  # 2**70: numpy cannot seed with it
        code, err = run(train_main, ["--out", tmp_path / "run", "--set", f"train.seed={value}"], capsys)
        assert_one_line_error(code, err, "train.seed must be in [0, 2**32 - 1]", value)
    assert not (tmp_path / "run").exists()


def test_the_image_bound_is_the_readers_real_peak(tmp_path):
    import imagecodecs

    from lfpv_fast.io.imageio import ImageTooLargeError, read_image, read_image_info

    path = tmp_path / "gray16.png"
    path.write_bytes(imagecodecs.png_encode(np.zeros((4000, 4000), np.uint16)))  # 32 MB decoded, 40 kB on disk
    info = read_image_info(path, max_decoded_bytes=None)
    assert info.decoded_bytes == 32 * 10**6 and info.read_peak_bytes == (2 + 6 + 12) * 16 * 10**6
    with pytest.raises(ImageTooLargeError, match=r"would decode to 30\.5 MiB but take 305\.2 MiB to read"):
        read_image(path, max_decoded_bytes=100 * 2**20)
    code, err, peak = run_measured("(__import__('lfpv_fast.io.imageio').io.imageio.read_image(sys.argv[1]), 0)[1]",
                                   str(path))
    code0, _, base = run_measured("(__import__('lfpv_fast.io.imageio'), 0)[1]")
    assert code == code0 == 0, err
    assert peak - base <= info.read_peak_bytes + 16 * 2**20, (peak - base, info.read_peak_bytes)


def test_weights_cast_to_integers_are_refused_and_other_floats_converted(tmp_path):
    torch.manual_seed(0)
    net = LFPVNet(TINY, backend="reference")
    for dtype, named in ((torch.int32, "torch.int32"), (torch.int64, "torch.int64")):
        obj = weights_only_checkpoint(net)
        obj["model"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in obj["model"].items()}
        atomic_save(obj, tmp_path / "cast.pth")
        with pytest.raises(ValueError, match=f"hold {named} values .* cast to integers"):
            load_model(tmp_path / "cast.pth", backend="reference")
    obj = weights_only_checkpoint(net)
    half = {k: v.half() if v.is_floating_point() else v for k, v in obj["model"].items()}
    obj["model"] = half
    atomic_save(obj, tmp_path / "half.pth")
    loaded = load_model(tmp_path / "half.pth", backend="reference")
    for key, value in loaded.state_dict().items():
        assert value.dtype == net.state_dict()[key].dtype
        assert torch.equal(value, half[key].to(value.dtype)), key
