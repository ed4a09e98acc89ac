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


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from lfpv_fast.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root)
    return root


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


def test_no_row_exceeds_the_copy_bandwidth(tmp_path):
    bench = importlib.import_module("bench_lfpv_kernels")
    out = tmp_path / "kernels.json"
    assert bench.main(["--shapes", "train", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    measured = [r for r in doc["rows"] if r["status"] == "ok"]
    assert measured
    for row in measured:
        assert row["fraction_of_copy"] <= 1.0, row
        assert row["time_ms"]["reps"] >= common.MIN_REPS and row["time_ms"]["min"] <= row["time_ms"]["max"]


def test_run_all_markdown_table():
    run_all = importlib.import_module("run_all")
    rows = [{"name": "a", "seconds": {"min": 1.0, "median": 2.0, "max": 3.0, "reps": 5}},
            {"name": "b", "skipped": "needs CUDA"}]
    table = run_all.markdown_table(rows)
    assert "| name | skipped | seconds |" in table and "| a |  | 2 (1-3) |" in table
