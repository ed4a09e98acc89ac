"""Checkpoint files as a user meets them: what is not a checkpoint says so in one line (never suggesting an
unsafe load), the model config used is named with where it came from, and the published format explains
what it can hold."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, assert_one_line_error, run
from lfpv_fast import LFPVNet, ModelConfig
from lfpv_fast import enhance as enhance_cli
from lfpv_fast import evaluate as evaluate_cli
from lfpv_fast.checkpoint import atomic_save, load_model, read_checkpoint, weights_only_checkpoint

FORBIDDEN = ("weights_only=False", "file an issue", "Unsupported operand", "\n")


class Pickled:  # a Python object inside a checkpoint: refused by torch.load(weights_only=True)
    def __init__(self) -> None:
        self.value = 3


def not_checkpoints(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {
        "random bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        # Random bytes after a pickle protocol header: what made torch print "Unsupported operand 144".
        "random bytes after a pickle header": b"\x80\x02\x90" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"hello, I am not a checkpoint\n",
        "empty": b"",
    }
    buffer = io.BytesIO()
    torch.save({"model": Pickled()}, buffer)
    files["pickled object"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({"model": torch.zeros(1000)}, buffer)
    files["truncated"] = buffer.getvalue()[:-300]
    paths = {}
    for name, data in files.items():
        paths[name] = folder / (name.replace(" ", "_") + ".pth")
        paths[name].write_bytes(data)
    return paths


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path):
    for kind, path in not_checkpoints(tmp_path).items():
        with pytest.raises(ValueError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert str(path) in message, kind
        for text in FORBIDDEN:
            assert text not in message, (kind, text, message)
    for name, named in [("truncated", "truncated"), ("pickled_object", "pickled Python object"), ("empty", "empty")]:
        with pytest.raises(ValueError, match=named):
            read_checkpoint(tmp_path / f"{name}.pth")
    assert zipfile.is_zipfile(tmp_path / "pickled_object.pth")  # the pickled-object file is a real torch file


def test_the_clis_report_a_non_checkpoint_in_one_line(tmp_path, capsys):
    bad = not_checkpoints(tmp_path)["random bytes after a pickle header"]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    code, err = run(enhance_cli.main, [tmp_path / "a.png", "--checkpoint", bad, "-o", tmp_path / "o", "-q"], capsys)
    line = assert_one_line_error(code, err, str(bad), "not")
    assert "weights_only" not in line
    code, err = run(evaluate_cli.main, ["-c", "demo", "--checkpoint", bad, "--device", "cpu",
                                        "--set", f"data.demo_root={tmp_path / 'demo'}"], capsys)
    assert "weights_only" not in assert_one_line_error(code, err, str(bad))


# ---------------------------------------------------------------------------------------------
# Defect 3: evaluate says which model config it used and where it came from


def test_evaluate_names_the_model_config_from_the_checkpoint(tmp_path, capsys):
    from lfpv_fast.data.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "demo")
    torch.manual_seed(0)
    ckpt = tmp_path / "nf8.pth"
    atomic_save(weights_only_checkpoint(LFPVNet(TINY, backend="reference")), ckpt)
    code = evaluate_cli.main(["-c", "demo", "--checkpoint", str(ckpt), "--device", "cpu", "--max-images", "1",
                              "--no-progress", "--out", str(tmp_path / "r.json"),
                              "--set", f"data.demo_root={tmp_path / 'demo'}"])
    assert code == 0
    out = capsys.readouterr().out
    # The config file says nf 16; the checkpoint's nf 8 is what runs, and the output says so.
    line = next(line for line in out.splitlines() if "model config" in line)
    assert "from the checkpoint" in line and "nf=8" in line and "nf=16" in line, out
    assert json.loads((tmp_path / "r.json").read_text())["model_config_source"] == "checkpoint"


# ---------------------------------------------------------------------------------------------
# Defect 4: the published format holds only the published architecture


def test_a_published_format_file_of_another_architecture_points_to_final_weights(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "final_original_format.pth"
    torch.save(LFPVNet(TINY, backend="reference").to_original_state_dict(), path)
    with pytest.raises(ValueError, match="final_weights.pth") as info:
        load_model(path)
    assert "published" in str(info.value) and "\n" not in str(info.value)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    code, err = run(enhance_cli.main, [tmp_path / "a.png", "--checkpoint", path, "-o", tmp_path / "o", "-q"], capsys)
    assert_one_line_error(code, err, str(path), "final_weights.pth")


def test_only_the_published_architecture_is_exported_in_the_published_format():
    from lfpv_fast.checkpoint import is_published_architecture

    assert is_published_architecture(ModelConfig())
    assert not is_published_architecture(TINY)
    assert not is_published_architecture(ModelConfig(nf=16, hr_nf=16))
