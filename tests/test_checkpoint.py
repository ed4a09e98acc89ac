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
from lfpv_fast.training.checkpoint import atomic_save, load_model, read_checkpoint, weights_only_checkpoint

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
    from lfpv_fast.training.checkpoint import is_published_architecture

    assert is_published_architecture(ModelConfig())
    assert not is_published_architecture(TINY)
    assert not is_published_architecture(ModelConfig(nf=16, hr_nf=16))


# ---------------------------------------------------------------------------------------------
# Issue 17 items 6 and 7: readable but malformed checkpoints, NaN weights, a full disk. The checks live in
# lfpv_fast.training.checkpoint, so train, evaluate, enhance and the app refuse the same files with the same line.


def _ours(**changes) -> dict:
    torch.manual_seed(0)
    obj = weights_only_checkpoint(LFPVNet(TINY, backend="reference"))
    obj.update(changes)
    return obj


def _malformed(name: str) -> tuple[dict, str]:
    """(file contents, what the error line must say) for each malformed case."""
    if name == "unknown model_config key":
        obj = _ours()
        obj["model_config"] = dict(obj["model_config"], attention_kind="flash")
        return obj, "unknown key 'attention_kind'"
    if name == "no model":
        obj = _ours()
        del obj["model"]
        return obj, "no 'model' entry"
    if name == "model_config not a dict":
        return _ours(model_config=[8, 8, 1]), "'model_config' is a list"
    if name == "model_config of another width":
        obj = _ours()
        obj["model_config"] = dict(obj["model_config"], options=dict(obj["model_config"]["options"], nf=12))
        return obj, "differ in shape"
    if name == "empty model":
        return _ours(model={}), "holds no weights"
    if name == "NaN weight":
        obj = _ours()
        key = next(k for k in obj["model"] if k.endswith("weight"))
        obj["model"][key] = obj["model"][key].clone()
        obj["model"][key].view(-1)[0] = float("nan")
        return obj, f"tensor {key!r} holds 1 NaN/inf value"
    if name == "inf in a published file":
        state = LFPVNet(TINY, backend="reference").to_original_state_dict()
        state["conv_first_1.weight"] = torch.full_like(state["conv_first_1.weight"], float("inf"))
        return state, "tensor 'conv_first_1.weight' holds"
    raise AssertionError(name)


MALFORMED = ["unknown model_config key", "no model", "model_config not a dict", "model_config of another width",
             "empty model", "NaN weight", "inf in a published file"]


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_checkpoint_is_one_line_naming_the_file_and_the_problem(tmp_path, case):
    contents, named = _malformed(case)
    path = tmp_path / "bad.pth"
    torch.save(contents, path)
    with pytest.raises(ValueError) as info:
        load_model(path, backend="reference")
    message = str(info.value)
    assert str(path) in message and named in message, message
    assert "\n" not in message and len(message) < 600, message  # one line, not torch's list of every key


def test_a_shape_mismatch_names_the_first_differing_keys_in_one_line(tmp_path):
    contents, _ = _malformed("model_config of another width")
    path = tmp_path / "wide.pth"
    torch.save(contents, path)
    with pytest.raises(ValueError) as info:
        load_model(path, backend="reference")
    message = str(info.value)
    wide = LFPVNet(ModelConfig(**contents["model_config"]), backend="reference").state_dict()
    first = next(k for k, v in wide.items() if v.shape != contents["model"][k].shape)  # in the model's order
    assert (f"{first!r} is {tuple(contents['model'][first].shape)} in the file, {tuple(wide[first].shape)} in the "
            "model") in message and "nf=12" in message, message
    assert message.count("\n") == 0 and message.count("', '") <= 3, message


@pytest.mark.parametrize("case", ["NaN weight", "unknown model_config key"])
def test_enhance_and_evaluate_refuse_a_malformed_checkpoint_with_status_2(tmp_path, capsys, case):
    contents, named = _malformed(case)
    path = tmp_path / "bad.pth"
    torch.save(contents, path)
    Image.fromarray(np.full((16, 16, 3), 40, np.uint8)).save(tmp_path / "a.png")
    code, err = run(enhance_cli.main, [tmp_path / "a.png", "--checkpoint", path, "-o", tmp_path / "o", "-q"], capsys)
    assert_one_line_error(code, err, str(path), named)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))  # nothing enhanced
    code, err = run(evaluate_cli.main, ["-c", "demo", "--checkpoint", path, "--device", "cpu", "--out",
                                        tmp_path / "r.json", "--set", f"data.demo_root={tmp_path / 'demo'}"], capsys)
    assert_one_line_error(code, err, str(path), named)
    assert not (tmp_path / "r.json").exists()


def _training_checkpoint() -> dict:
    from lfpv_fast.training.checkpoint import training_checkpoint

    torch.manual_seed(0)
    net = LFPVNet(TINY, backend="reference")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return training_checkpoint(net, optimizer, scheduler, step=4, best_psnr=None, config={},
                               loader_state={"epoch": 1, "batch": 1}, world_size=1)


@pytest.mark.parametrize("entry, value, named", [
    ("rng", {}, "'rng' is not a saved random state"),
    ("rng", {"torch": torch.zeros(3, dtype=torch.uint8), "cuda": [], "numpy": {}, "python": {}},
     "'rng' is not a saved random state"),
    ("optimizer", {}, "'optimizer' is not an optimizer state"),
    ("model", {}, "'model' holds no weights"),
    ("draw_generator", torch.zeros(7, dtype=torch.uint8), "'draw_generator' is not a saved torch.Generator state"),
    ("draw_generator", "seed 3", "'draw_generator' is not a saved torch.Generator state"),
    ("loader", {"epoch": "one"}, "'loader' must be the loader's position"),
    ("step", -1, "'step' must be a whole number"),
])
def test_a_resume_checkpoint_with_a_broken_entry_is_refused_naming_it(tmp_path, entry, value, named):
    from lfpv_fast.training.checkpoint import check_training_checkpoint

    good = _training_checkpoint()
    check_training_checkpoint(good, "good.pth", TINY)  # the unbroken one passes
    path = tmp_path / "bad.pth"
    torch.save(dict(good, **{entry: value}), path)
    with pytest.raises(ValueError) as info:
        check_training_checkpoint(read_checkpoint(path), path, TINY)
    assert str(path) in str(info.value) and named in str(info.value) and "\n" not in str(info.value)


def test_vgg_weights_that_are_a_tensor_or_a_pickled_object_are_one_line_errors(tmp_path):
    from lfpv_fast.training.losses import PerceptualLoss

    torch.save(torch.zeros(3, 3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match=r"VGG19 weights file .*tensor.pth: expected a dict of weights, got a tensor"):
        PerceptualLoss.from_file(tmp_path / "tensor.pth")
    pickled = not_checkpoints(tmp_path)["pickled object"]
    with pytest.raises(ValueError) as info:
        PerceptualLoss.from_file(pickled)
    assert "pickled Python object" in str(info.value) and str(pickled) in str(info.value)
    for text in FORBIDDEN:  # torch's advice to load with weights_only=False is never passed on
        assert text not in str(info.value), text
    torch.save({"features.0.weight": "not a tensor"}, tmp_path / "strings.pth")
    with pytest.raises(ValueError, match="strings.pth"):
        PerceptualLoss.from_file(tmp_path / "strings.pth")


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_file(small_filesystem):
    from lfpv_fast.training.checkpoint import CheckpointWriteError

    folder = small_filesystem(256)
    atomic_save({"x": torch.ones(1000)}, folder / "old.pth")
    with pytest.raises(CheckpointWriteError) as info:
        atomic_save({"x": torch.ones(200_000)}, folder / "new.pth")  # 800 KB into 256 KiB
    message = str(info.value)
    assert str(folder / "new.pth") in message and "No space left on device" in message and "\n" not in message
    assert isinstance(info.value, OSError)
    assert sorted(p.name for p in folder.iterdir()) == ["old.pth"]  # no temporary file, the old file intact
    assert torch.equal(read_checkpoint(folder / "old.pth")["x"], torch.ones(1000))
