"""The benchmarks' plumbing: --published against a stand-in of the published code, the timing helper,
the traffic model (no row above the copy bandwidth) and run_all's tables. Timings are not asserted."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

common = importlib.import_module("common")
published = importlib.import_module("published")

# A stand-in of the published repository: the same module paths and class names, tiny contents.
# Each class records its use in the marker file named by $FAKE_PUBLISHED_LOG.
STAND_IN = {
    "models/__init__.py": "",
    "models/archs/__init__.py": "",
    "models/archs/low_light_transformer.py": """
        import os
        import torch
        import torch.nn as nn
        import cv2  # noqa: F401  (the published arch file imports OpenCV; a stub in the test)

        def log(what):
            with open(os.environ["FAKE_PUBLISHED_LOG"], "a") as f:
                f.write(what + "\\n")

        class low_light_transformer4(nn.Module):
            def __init__(self, nf=64, nframes=5, groups=8, front_RBs=5, back_RBs=10, center=None,
                         predeblur=False, HR_in=False, w_TSA=True):
                super().__init__()
                assert (nf, front_RBs, back_RBs, HR_in) == (64, 1, 1, True)  # the SMID options
                self.conv = nn.Conv2d(3, 3, 3, 1, 1)
                self.common_feature = nn.Parameter(torch.zeros(16, 64))

            def load_state_dict(self, state, strict=True):
                assert "common_feature" in state and "conv_first_1.weight" in state  # published key names
                log("weights")

            def forward(self, x, mask=None, x_gt=None):
                torch.zeros(1).cuda()  # as the published forward does; must work without CUDA
                out = self.conv(x) * mask + x
                log("forward train" if self.training else "forward eval")
                return (out, out * 0.5) if self.training else out
    """,
    "models/loss.py": """
        import torch
        import torch.nn as nn
        import torchvision  # noqa: F401  (only the VGG loss needs it)

        class CharbonnierLoss(nn.Module):
            def __init__(self, eps=1e-6):
                super().__init__()
                self.eps = eps

            def forward(self, x, y):
                return torch.sum(torch.sqrt((x - y) ** 2 + self.eps))
    """,
    "data/__init__.py": "",
    "data/dataset_SMID_train.py": """
        import glob
        import os
        import numpy as np
        import torch
        import torch.utils.data as data

        class VideoSameSizeDataset(data.Dataset):
            def __init__(self, opt):
                self.opt = opt
                testing = open("./test_list.txt").read().split()  # relative to the working directory
                scenes = [s for s in sorted(glob.glob(os.path.join(opt["dataroot_LQ"], "*")))
                          if os.path.basename(s) not in testing]
                self.frames = [f for s in scenes for f in sorted(glob.glob(os.path.join(s, "*")))]
                with open(os.environ["FAKE_PUBLISHED_LOG"], "a") as f:
                    f.write(f"dataset {len(self.frames)} frames, excluded {testing}\\n")

            def __getitem__(self, index):
                size = self.opt["GT_size"]
                img = torch.from_numpy(np.load(self.frames[index])[:size, :size]).permute(2, 0, 1).float() / 255
                return {"LQs": img, "GT": img, "nf": img, "folder": "x", "idx": "0/1", "border": 0}

            def __len__(self):
                return len(self.frames)
    """,
}


@pytest.fixture
def stand_in(tmp_path, monkeypatch) -> tuple[Path, Path]:
    root = tmp_path / "published"
    for name, text in STAND_IN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    log = tmp_path / "calls.log"
    log.write_text("")
    monkeypatch.setenv("FAKE_PUBLISHED_LOG", str(log))
    if "cv2" not in sys.modules:  # the stand-in needs only the import to work
        monkeypatch.setitem(sys.modules, "cv2", type(sys)("cv2"))
    monkeypatch.delenv(published.ENV, raising=False)
    yield root, log
    for name in list(sys.modules):  # the stand-in's modules must not leak into other tests
        if name.split(".")[0] in published.TOP_LEVEL:
            del sys.modules[name]
    if str(root.resolve()) in sys.path:
        sys.path.remove(str(root.resolve()))


TINY_MODEL = ["model.nf=8", "model.hr_nf=8", "model.layers=1", "model.light_blocks=1", "model.heads=2",
              "model.head_dim=8", "model.ffn_dim=16", "model.bank_size=4", "model.updater_width=1"]


def bench_train_args(tmp_path: Path, demo_root: Path) -> list[str]:
    args = ["--quick", "--crop", "32", "--batch", "1", "--warmup", "1", "--out", str(tmp_path / "train.json"),
            "--set", f"data.demo_root={demo_root}"]
    for override in TINY_MODEL:
        args += ["--set", override]
    return args


def test_bench_train_runs_the_published_code(stand_in, tmp_path, demo_root):
    root, log = stand_in
    bench_train = importlib.import_module("bench_train")
    assert bench_train.main([*bench_train_args(tmp_path, demo_root), "--published", str(root)]) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names[0] == published.PUBLISHED_LABEL and doc["baseline"] == published.PUBLISHED_LABEL
    assert doc["published"] == str(root.resolve())
    calls = log.read_text().splitlines()
    assert calls.count("weights") == 1  # the same initial weights as ours, under the published names
    assert calls.count("forward train") >= common.MIN_REPS + 1  # warm-up + timed steps of its own class
    for row in doc["rows"]:
        if "skipped" not in row:
            assert row["step_s"]["reps"] >= common.MIN_REPS
            assert row["step_s"]["min"] <= row["step_s"]["median"] <= row["step_s"]["max"]
            assert row["speedup_vs_first_row"]["reps"] >= common.MIN_REPS
    assert doc["environment"]["torch"] == torch.__version__ and "loadavg_end" in doc["environment"]


def test_without_published_no_row_is_called_published(tmp_path, demo_root, monkeypatch):
    monkeypatch.delenv(published.ENV, raising=False)
    bench_train = importlib.import_module("bench_train")
    assert bench_train.main(bench_train_args(tmp_path, demo_root)) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names[0] == published.REFERENCE_LABEL and doc["published"] is None
    assert not any(name.startswith("published") for name in names)


def test_bench_data_runs_the_published_dataset(stand_in, tmp_path, monkeypatch):
    root, log = stand_in
    bench_data = importlib.import_module("bench_data")
    for name, value in {"RAW_HW": (48, 64), "SMALL_RAW_HW": (32, 48), "CACHE_WH": (48, 32), "CROP": 16,
                        "BATCH": 2}.items():
        monkeypatch.setattr(bench_data, name, value)
    out = tmp_path / "data.json"
    common_args = ["--quick", "--workers", "0", "--batches", "1", "--out", str(out), "--rows", "published,torch-cache"]
    assert bench_data.main([*common_args, "--published", str(root)]) == 0
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == ["prepare", "published", "torch-cache"]
    assert all(r["samples_per_s"]["reps"] >= common.MIN_REPS for r in doc["rows"])
    assert "dataset 24 frames, excluded ['test']" in log.read_text()  # its own dataset class, our test list
    monkeypatch.delenv(published.ENV, raising=False)
    assert bench_data.main([*common_args[:-1], "reference ops,torch-cache"]) == 0
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    assert names == ["prepare", "reference ops", "torch-cache"]


def test_published_path_is_checked(tmp_path):
    with pytest.raises(SystemExit, match="low_light_transformer.py not found"):
        published.check_path(tmp_path)


def test_timing_helper_interleaves_and_enforces_five_reps():
    order = []
    timings = common.time_rows({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=2, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * common.MIN_REPS  # warm-up, then round by round
    for t in timings.values():
        s = t.summary()
        assert s["reps"] == common.MIN_REPS and s["min"] <= s["median"] <= s["max"]
    rate = common.Timing([1.0, 2.0, 4.0, 2.0, 2.0]).rate(8)
    assert (rate["min"], rate["median"], rate["max"]) == (2.0, 4.0, 8.0)


def test_gather_traffic_counts_only_the_bytes_moved():
    bench = importlib.import_module("bench_lfpv_kernels")
    features = torch.zeros(12, 64, 64, 64)
    vectors, patches = torch.zeros(12, 64), torch.zeros(12, 64, 4, 4)
    sample_bytes = (vectors.numel() + patches.numel()) * 4
    assert bench.traffic("gather_samples", [features], (vectors, patches), backward=False) == 2 * sample_bytes
    # backward: output grads read, the dense feature-map gradient written
    assert bench.traffic("gather_samples", [features], (vectors, patches), backward=True) == \
        3 * sample_bytes + features.numel() * 4


def test_every_row_compares_with_a_copy_of_its_own_bytes(tmp_path):
    """Each row's bandwidth is its counted bytes over its median time, set against a copy of the same bytes timed in
    the same interleaved loop. (Whether a row stays under the copy is a timing, so a benchmark figure, not asserted
    here: on shared cores a copy's median can lose to an op's by chance. The byte counts are checked above.)"""
    bench = importlib.import_module("bench_lfpv_kernels")
    out = tmp_path / "kernels.json"
    assert bench.main(["--shapes", "train", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    measured = [r for r in doc["rows"] if r["status"] == "ok"]
    assert measured
    for row in measured:
        assert row["GBps"] == pytest.approx(row["bytes"] / (row["time_ms"]["median"] / 1e3) / 1e9, rel=1e-9), row
        assert row["fraction_of_copy"] == pytest.approx(row["GBps"] / row["copy_same_bytes_GBps"], rel=1e-12), row
        assert row["time_ms"]["reps"] >= common.MIN_REPS and row["time_ms"]["min"] <= row["time_ms"]["max"]


def test_run_all_markdown_table():
    run_all = importlib.import_module("run_all")
    rows = [{"name": "a", "seconds": {"min": 1.0, "median": 2.0, "max": 3.0, "reps": 5}},
            {"name": "b", "skipped": "needs CUDA"}]
    table = run_all.markdown_table(rows)
    assert "| name | skipped | seconds |" in table and "| a |  | 2 (1-3) |" in table


# bench_inference's frame part with a tiny model on a small frame (the SMID model at 512x960 takes seconds a
# forward here); what it runs and records is the same.
TINY_CONFIG = {"nf": 8, "hr_nf": 8, "layers": 1, "light_blocks": 1, "heads": 2, "head_dim": 8, "ffn_dim": 16,
               "bank_size": 4, "updater_width": 1}


@pytest.fixture
def bench_inference(monkeypatch):
    from lfpv_fast.model import ModelConfig

    module = importlib.import_module("bench_inference")
    monkeypatch.setattr(module, "FRAME_HW", (48, 64))
    monkeypatch.setattr(module, "MODEL", ModelConfig(**TINY_CONFIG))
    return module


def frame_rows_by_input(doc: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in doc["frame"]["rows"]:
        rows.setdefault(row["input"], []).append(row)
    return rows


def test_bench_inference_frame_runs_on_a_synthetic_input_without_scikit_image(bench_inference, tmp_path,
                                                                              monkeypatch, capsys):
    for name in ("skimage", "skimage.data"):  # importing them fails (even if imported before), as on a bare machine
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv(published.ENV, raising=False)
    out = tmp_path / "inference.json"
    # The default input is still the demo's photo: without scikit-image a one-line usage error naming the way out.
    assert bench_inference.main(["--parts", "frame", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --input photo: ") and "scikit-image" in err and "--input synthetic" in err
    assert len(err.splitlines()) == 1 and not out.exists()

    assert bench_inference.main(["--parts", "frame", "--input", "synthetic", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["input"]["kind"] == "synthetic" and doc["input"]["label"] == "dark synthetic frame"
    assert doc["frame"]["input"] == doc["input"] and doc["frame"]["frame_hw"] == [48, 64]
    rows = frame_rows_by_input(doc)
    assert list(rows) == ["dark synthetic frame", "SNR map of ones (every key kept)"]
    for name, input_rows in rows.items():
        assert [r["name"] for r in input_rows][0] == published.REFERENCE_LABEL == doc["frame"]["baseline"]
        assert len(input_rows) == 5
        for r in input_rows:
            assert r["seconds"]["reps"] >= common.MIN_REPS and r["seconds"]["min"] <= r["seconds"]["max"]
            if "bf16" not in r["name"]:  # fp32 rows: the reference's output within 1e-4
                assert r["max_abs_diff_vs_reference"] <= 1e-4, (name, r)
    assert rows["SNR map of ones (every key kept)"][0]["kept_keys"] == 1.0
    assert "48x64 frame, dark synthetic frame" in capsys.readouterr().out


def test_synthetic_frame_is_deterministic_dark_and_keeps_few_keys_like_the_photo():
    from lfpv_fast.model import LFPVNet, ModelConfig

    bench = importlib.import_module("bench_inference")
    scene = bench.synthetic_scene(96, 128)
    assert scene.shape == (96, 128, 3) and scene.dtype == "uint8"
    assert (scene == bench.synthetic_scene(96, 128)).all() and (scene != bench.synthetic_scene(96, 128, 1)).any()
    # Well lit and varied (shading, objects, texture) before it is darkened.
    assert 60 < scene.mean() < 200 and scene.std() > 30
    steps = abs(scene[:, 1:].astype(int) - scene[:, :-1]).max(axis=2)
    assert (steps > 40).mean() > 0.01  # hard edges, not only smooth gradients
    frame = bench.dark_synthetic_frame(*bench.FRAME_HW)
    assert frame.shape == (1, 3, *bench.FRAME_HW) and (frame == bench.dark_synthetic_frame(*bench.FRAME_HW)).all()
    assert 0.02 < float(frame.mean()) < 0.15  # the demo's low-light model at the photo's exposure
    # Like the dark photo, its SNR map keeps few attention keys (the case the benchmark's first input stands for).
    net = LFPVNet(ModelConfig(**TINY_CONFIG))  # kept_fraction reads align and token_size: the SMID model's
    assert net.config.align == ModelConfig().align and net.config.token_size == ModelConfig().token_size
    assert bench.kept_fraction(net, net.snr_mask(frame)) < 0.1


def test_bench_inference_frame_reads_an_image_file_as_input(bench_inference, tmp_path, monkeypatch, capsys):
    from lfpv_fast.io.imageio import write_image

    monkeypatch.delenv(published.ENV, raising=False)
    image = tmp_path / "night.png"
    write_image(image, bench_inference.synthetic_scene(40, 50) / 255.0 * 0.1)  # a small dark photo of one's own
    out = tmp_path / "inference.json"
    assert bench_inference.main(["--parts", "frame", "--input", str(image), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["input"]["kind"] == "file" and doc["input"]["path"] == str(image)
    assert list(frame_rows_by_input(doc))[0] == "image night.png"

    missing = tmp_path / "missing.png"
    assert bench_inference.main(["--parts", "frame", "--input", str(missing), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --input {missing}: ") and "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_bench_train_retinexformer_rows(tmp_path, demo_root):
    """--backbone retinexformer: Retinexformer alone and with LFPVs (the LOL-v1 preset's models, shrunk here),
    the reference backend against auto in each, every row with min/median/max over >= 5 steps and its ratio to
    its own model's reference row."""
    bench_train = importlib.import_module("bench_train")
    out = tmp_path / "train-retinexformer.json"
    args = ["--backbone", "retinexformer", "--crop", "16", "--batch", "1", "--warmup", "1", "--out", str(out),
            "--set", f"data.demo_root={demo_root}", "--set", "model.options.n_feat=4",
            "--set", "model.options.num_blocks=[1, 1, 1]", "--set", "model.lfpv.bank_size=4",
            "--set", "model.lfpv.updater_width=8"]
    assert bench_train.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["backbone"] == "retinexformer" and doc["preset"] == bench_train.RETINEXFORMER_PRESET
    assert (doc["batch"], doc["crop"]) == (1, 16)
    assert doc["model"]["Retinexformer"]["lfpv"]["enabled"] is False
    assert doc["model"]["Retinexformer + LFPVs"]["lfpv"]["enabled"] is True
    assert all(m["backbone"] == "retinexformer" and m["options"]["n_feat"] == 4 for m in doc["model"].values())
    timed = [r for r in doc["rows"] if "skipped" not in r]
    auto = "triton" if torch.cuda.is_available() else "cpu_ops"  # the op set "auto" runs in these rows
    first_rows = [(r["model"], r["name"], r["backend"]) for r in timed if r["name"].endswith(("reference ops", "auto"))]
    assert first_rows == [("Retinexformer", "Retinexformer: reference ops", "reference"),
                          ("Retinexformer", "Retinexformer: lfpv_fast auto", auto),
                          ("Retinexformer + LFPVs", "Retinexformer + LFPVs: reference ops", "reference"),
                          ("Retinexformer + LFPVs", "Retinexformer + LFPVs: lfpv_fast auto", auto)]
    assert doc["baselines"] == {"Retinexformer": "Retinexformer: reference ops",
                                "Retinexformer + LFPVs": "Retinexformer + LFPVs: reference ops"}
    for r in timed:
        assert r["step_s"]["reps"] >= common.MIN_REPS
        assert r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        if r["name"] in doc["baselines"].values():
            assert r["speedup_vs_first_row"]["min"] == r["speedup_vs_first_row"]["max"] == 1.0
    if not torch.cuda.is_available():
        assert len(timed) == 4
        assert {r["name"] for r in doc["rows"] if "skipped" in r} == {
            f"{m}: {row}" for m in ("Retinexformer", "Retinexformer + LFPVs")
            for row in ("+ fused Adam", "+ torch.compile", "+ bf16", "+ CUDA graphs")}
