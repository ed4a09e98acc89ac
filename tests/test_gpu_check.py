"""bench/gpu_check.py on the CPU: the plan of a dry run in a Python without DALI and imagecodecs (and without
scikit-image: synthetic training data and a synthetic benchmark frame), the budget split, a step that times out
while the next still runs, the report on disk after every step (even when the run is killed), SIGTERM stopping
the step in progress, and the data test modules collecting and skipping their 16-bit PNG cases without
imagecodecs."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import blocked_python

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

gpu_check = importlib.import_module("gpu_check")

def run_blocked(blocked: list[str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A script (or `-m pytest ...`) in a Python where the modules `blocked` cannot be imported, as on a bare
    GPU machine."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*blocked_python(blocked), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def gpu_check_dry_run(tmp_path: Path, blocked: list[str],
                      budget: int = 480) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path / "out"
    proc = run_blocked(blocked, str(BENCH / "gpu_check.py"), "--dry-run", "--budget", str(budget), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].endswith("-gpu-check-dry-run.json") and files[1].endswith(".md"), files
    return proc, json.loads((out / files[0]).read_text()), out / files[1]


def sets_of(command: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def test_dry_run_without_dali_and_imagecodecs_plans_every_step(tmp_path):
    proc, doc, md = gpu_check_dry_run(tmp_path, ["nvidia.dali", "imagecodecs", "xdist"], budget=480)
    probe = doc["probe"]
    for module in ("nvidia.dali", "imagecodecs", "xdist"):
        assert probe[module]["available"] is False and "blocked by the test" in probe[module]["error"], probe[module]
    for module in ("torch", "triton", "pytest", "pip", "numpy", "skimage"):
        assert probe[module]["available"] is True, probe[module]
    assert doc["dry_run"] is True and doc["budget_s"] == 480
    steps = {s["key"]: s for s in doc["steps"]}
    assert list(steps) == ["install", "kernel-tests", "dali-gpu", "golden", "ig-msa", "train", "train-retinexformer",
                           "inference"]

    # Without DALI its rows are skipped, with the reason; every other step is planned with a share of the budget.
    assert steps["dali-gpu"]["status"] == "skipped" and steps["dali-gpu"]["share_s"] == 0
    assert "DALI rows are skipped" in steps["dali-gpu"]["skip_reason"]
    assert "nvidia.dali" in steps["dali-gpu"]["skip_reason"]
    assert any("16-bit PNG cases skip" in n for n in steps["dali-gpu"]["notes"])
    planned = [s for s in doc["steps"] if s["status"] == "planned"]
    assert [s["key"] for s in planned] == ["install", "kernel-tests", "golden", "ig-msa", "train",
                                           "train-retinexformer", "inference"]
    assert sum(s["share_s"] for s in planned) == 480 and all(s["share_s"] > 0 for s in planned)
    assert all(s["seconds"] is None and s["log"] == "" for s in doc["steps"])  # nothing ran

    # The exact commands.
    assert steps["install"]["command"].endswith(
        f"-m pip install --no-index --no-deps --no-build-isolation -e {ROOT}")
    kernel = steps["kernel-tests"]["command"]
    assert "-m pytest" in kernel and "--continue-on-collection-errors" in kernel and "-o addopts=-ra" in kernel
    assert " -n " not in kernel and any("serial" in n for n in steps["kernel-tests"]["notes"])
    for name in ("test_kernel_query_fusion.py", "test_kernel_masked_attention.py", "test_kernel_snr_mask.py",
                 "test_kernel_bank_update.py", "test_kernel_autocast.py", "test_kernel_ig_msa.py",
                 "test_kernel_training_retinexformer.py"):
        assert f"tests/kernels/{name}" in kernel
    assert steps["golden"]["command"].endswith("tests/test_golden.py")
    train = steps["train"]["command"]
    assert " -m lfpv_fast.train -c demo " in train
    assert {"train.iterations=40", "train.backend=triton", "train.compile=on", "train.bf16=on",
            "train.fused_adam=on", "data.loader=torch", "train.device=cuda"} <= set(sets_of(train))
    assert "data.dataset=smid" not in train  # scikit-image is there: the demo dataset
    # IG-MSA: the benchmark's three levels at both shapes (its defaults), on the GPU, JSON next to the report.
    ig_msa = shlex.split(steps["ig-msa"]["command"])
    assert ig_msa[1:] == [str(BENCH / "bench_ig_msa.py"), "--quick", "--device", "cuda", "--out",
                          str(tmp_path / "out" / (md.stem + "-ig_msa.json"))]
    retinexformer = steps["train-retinexformer"]["command"]
    assert " -m lfpv_fast.train -c demo_retinexformer " in retinexformer
    assert {"train.iterations=40", "train.backend=triton", "train.compile=off", "train.bf16=on",
            "train.fused_adam=on", "data.loader=torch", "train.device=cuda"} <= set(sets_of(retinexformer))
    assert "data.dataset=smid" not in retinexformer
    inference = steps["inference"]
    assert "bench_inference.py --parts frame --device cuda --out" in inference["command"]
    assert "--input" not in inference["command"]  # scikit-image is there: the default input, the demo's photo
    assert any("coffee photo" in n for n in inference["notes"])

    # What was printed: the probe, the split, the commands, the one-screen summary.
    out = proc.stdout
    assert "nvidia-dali-cuda120" in out and "missing (ModuleNotFoundError: No module named 'nvidia.dali'" in out
    assert "imagecodecs" in out and "missing (ModuleNotFoundError: No module named 'imagecodecs'" in out
    assert "skipped: the DALI rows are skipped" in out
    for s in planned:
        assert f"{s['share_s']:>4} s  $ {s['command']}" in out
    assert "gpu-check plan:" in out and str(md) in out
    text = md.read_text()
    assert "dry run" in text and "budget 480 s" in text
    for s in doc["steps"]:
        assert f"| {s['key']}: {s['title']} | {s['status']}" in text and s["command"] in text


def test_dry_run_without_scikit_image_trains_and_benchmarks_on_synthetic_data(tmp_path):
    proc, doc, _ = gpu_check_dry_run(tmp_path, ["nvidia.dali", "imagecodecs", "skimage"], budget=300)
    steps = {s["key"]: s for s in doc["steps"]}
    assert doc["probe"]["skimage"]["available"] is False
    assert steps["train"]["status"] == "planned"
    assert "data.dataset=smid" in sets_of(steps["train"]["command"])
    assert any("synthetic SMID-style dataset" in n for n in steps["train"]["notes"])
    # The frame benchmark runs on a synthetic frame made with numpy (its photo ships inside scikit-image).
    inference = steps["inference"]
    assert inference["status"] == "planned" and inference["skip_reason"] is None
    words = shlex.split(inference["command"])
    assert words[words.index("--input") + 1] == "synthetic" and words[words.index("--device") + 1] == "cuda"
    assert any(n.startswith("input: a synthetic photo-like frame") and "scikit-image (skimage)" in n
               for n in inference["notes"]), inference["notes"]
    assert "note: input: a synthetic photo-like frame" in proc.stdout
    assert sum(s["share_s"] for s in doc["steps"]) == 300
    assert [s["key"] for s in doc["steps"] if s["share_s"] > 0] == ["install", "kernel-tests", "golden", "ig-msa",
                                                                    "train", "train-retinexformer", "inference"]
    retinexformer = steps["train-retinexformer"]
    assert retinexformer["status"] == "planned" and "data.dataset=smid" in sets_of(retinexformer["command"])
    assert any("synthetic SMID-style dataset" in n for n in retinexformer["notes"])


def test_without_cuda_a_real_run_is_refused_and_bad_arguments_are_usage_errors(tmp_path):
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path / "o")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.startswith("error: gpu-check needs a CUDA device")
        assert "CPU build" in proc.stderr or "sees no CUDA device" in proc.stderr
        assert not (tmp_path / "o").exists()
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--budget", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --budget must be at least 5 seconds, got 0"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(blocker / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --out {blocker / 'o'}: cannot write the report")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "--budget SECONDS" in proc.stdout and "--dry-run" in proc.stdout


def test_budget_split_sums_to_the_budget_in_proportion():
    assert gpu_check.split_budget(480, gpu_check.WEIGHTS) == {"install": 24, "kernel-tests": 154, "dali-gpu": 19,
                                                              "golden": 48, "ig-msa": 48, "train": 86,
                                                              "train-retinexformer": 53, "inference": 48}
    for budget in (5, 7, 100, 479, 481, 1000):
        for weights in ({"a": 1, "b": 1, "c": 1}, {"a": 5, "b": 0, "c": 35, "d": 12}, dict(gpu_check.WEIGHTS)):
            shares = gpu_check.split_budget(budget, weights)
            assert sum(shares.values()) == budget
            total = sum(weights.values())
            for k, w in weights.items():
                assert abs(shares[k] - budget * w / total) < 1, (budget, weights, shares)
                if w == 0:
                    assert shares[k] == 0
    assert gpu_check.split_budget(60, {"a": 0}) == {"a": 0}

    # What earlier steps leave unused goes to the next one; the later shares and the kill grace are kept back.
    later = [gpu_check.Step("b", "", [], share_s=30), gpu_check.Step("c", "", [], share_s=20, status="skipped")]
    assert gpu_check.step_allowance(100, later) == 100 - 30 - gpu_check.KILL_GRACE_S


def fake_probe() -> gpu_check.Probe:
    packages = {p.module: gpu_check.Found(p.module, p.dist, p.needed_for, version="1") for p in gpu_check.PACKAGES}
    return gpu_check.Probe(sys.executable, packages, device="Fake GPU")


def fake_report(out: Path, steps: list, budget: int) -> gpu_check.Report:
    found = fake_probe()
    return gpu_check.Report(out, "fake-gpu-check", gpu_check.run_meta(found, "2026-01-01", "fake"), found, steps,
                            budget, dry_run=False)


def python_step(key: str, code: str) -> gpu_check.Step:
    return gpu_check.Step(key, f"fake {key}", [sys.executable, "-c", code], needs_install=False,
                          figure=lambda log: log.strip().splitlines()[-1])


HANGS = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
         "open(sys.argv[1], 'w').write(str(child.pid)); print('two started', flush=True); time.sleep(60)")


def process_gone(pid: int) -> bool:
    try:
        state = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:")]
    except OSError:
        return True
    return "Z" in state[0]  # dead, waiting to be reaped by its new parent


def test_a_step_that_times_out_is_stopped_and_the_next_one_still_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "WEIGHTS", {"one": 1, "two": 1, "three": 3})
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)
    monkeypatch.setattr(gpu_check, "PROGRESS_EVERY_S", 1)
    pid_file = tmp_path / "grandchild.pid"
    two = python_step("two", HANGS)
    two.command.append(str(pid_file))
    steps = [python_step("one", "print('one done')"), two, python_step("three", "print('three done')")]
    report = fake_report(tmp_path / "out", steps, budget=15)
    gpu_check.assign_shares(steps, 15)
    assert [s.share_s for s in steps] == [3, 3, 9]
    started = time.monotonic()
    gpu_check.run_plan(report, dict(os.environ), started)

    assert [s.status for s in steps][0::2] == ["passed", "passed"]
    assert steps[1].status.startswith("timed out after ")
    # Step two had what step one left unused: the budget less the later share and the grace, less step one's time.
    assert 15 - 9 - 1 - steps[0].seconds - 0.5 <= steps[1].timeout_s <= 15 - 9 - 1
    assert steps[1].seconds >= steps[1].timeout_s
    assert process_gone(int(pid_file.read_text()))  # its whole process group was stopped
    assert [s.key_figure for s in steps][0::2] == ["one done", "three done"]
    printed = capsys.readouterr().out
    assert "... " in printed and "two started" in printed  # a running step shows its latest line
    doc = json.loads(report.json_path.read_text())
    assert [s["status"] for s in doc["steps"]] == [s.status for s in steps]
    for i, s in enumerate(doc["steps"], start=1):
        assert s["log"] == f"fake-gpu-check-logs/{i}-{s['key']}.log" and (report.out_dir / s["log"]).is_file()
    log_two = (report.out_dir / doc["steps"][1]["log"]).read_text()
    assert log_two.startswith("$ ") and "two started" in log_two
    assert log_two.rstrip().endswith(f"gpu-check: {steps[1].status}; its process group was stopped")
    assert "three done" in report.md_path.read_text()


# gpu_check's runner in its own process, on two fake steps: one quick, one that hangs (HANGS).
RUNNER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import gpu_check as g

    g.WEIGHTS = {"one": 1, "two": 1}
    last_line = lambda log: log.strip().splitlines()[-1]
    steps = [g.Step("one", "fake one", [sys.executable, "-c", "print('one done')"], needs_install=False,
                    figure=last_line),
             g.Step("two", "fake two", [sys.executable, "-c", sys.argv[4], sys.argv[3]], needs_install=False)]
    found = g.Probe(sys.executable, {}, device="Fake GPU")
    report = g.Report(Path(sys.argv[2]), "fake-gpu-check", g.run_meta(found, "2026-01-01", "fake"), found, steps,
                      300, dry_run=False)
    g.assign_shares(steps, 300)
    g.stop_on_signals()
    try:
        g.run_plan(report, dict(os.environ), time.monotonic())
    except g.Stopped as exc:
        print("stopped by", exc, flush=True)
        sys.exit(130)
""")


def start_runner(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, pid_file = tmp_path / "out", tmp_path / "grandchild.pid"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(BENCH), str(out), str(pid_file), HANGS], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    json_path = out / "fake-gpu-check.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until step two runs: step one has finished and been written
        if json_path.is_file() and pid_file.is_file():
            doc = json.loads(json_path.read_text())
            if doc["steps"][1]["status"] == "running":
                return proc, json_path, pid_file
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("step two never started")


def test_a_run_killed_in_a_step_leaves_the_report_of_the_steps_before(tmp_path):
    proc, json_path, pid_file = start_runner(tmp_path)
    grandchild = int(pid_file.read_text())
    try:
        proc.send_signal(signal.SIGKILL)  # nothing of gpu_check runs after this
        proc.wait(timeout=30)
        doc = json.loads(json_path.read_text())
        one, two = doc["steps"]
        assert one["status"] == "passed" and one["seconds"] is not None and one["key_figure"] == "one done"
        assert two["status"] == "running" and two["timeout_s"] > 200
        assert "one done" in (json_path.parent / one["log"]).read_text()
        md = json_path.with_suffix(".md").read_text()
        assert "| 1 | one: fake one | passed |" in md and "| 2 | two: fake two | running |" in md
    finally:
        # The step ran in its own session and outlives a SIGKILL of the runner: end it (the test started it).
        step_pid = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(grandchild)], capture_output=True,
                                      text=True).stdout.strip() or 0)
        for pid in (step_pid, grandchild):
            if pid > 1:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_sigterm_stops_the_step_in_progress_and_records_it(tmp_path):
    proc, json_path, pid_file = start_runner(tmp_path)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped by SIGTERM" in output
    doc = json.loads(json_path.read_text())
    assert [s["status"] for s in doc["steps"]] == ["passed", "interrupted"]
    assert doc["steps"][1]["seconds"] is not None
    assert process_gone(int(pid_file.read_text()))


def test_the_synthetic_dataset_and_the_training_overrides_make_a_valid_run_config(tmp_path):
    """Where scikit-image is missing, the training step reads a synthetic SMID-style tree; every --set of the
    planned command is a valid key and value, and the loaders read the tree."""
    from lfpv_fast.config import load_config
    from lfpv_fast.data.loaders import build_loader

    found = fake_probe()
    found.packages["skimage"].error = "No module named 'skimage'"
    steps = {s.key: s for s in gpu_check.plan_steps(found, tmp_path, tmp_path / "out", "stem")}
    train = steps["train"]
    train.prepare()
    overrides = [s for s in sets_of(shlex.join(train.command)) if not s.startswith("data.num_workers")]
    cfg = load_config("demo", [*overrides, "data.num_workers=0"])
    assert cfg.data.dataset == "smid" and cfg.train.iterations == 40 and cfg.train.backend == "triton"
    batch = next(iter(build_loader(cfg, "train")))
    assert tuple(batch["lq"].shape) == (cfg.data.batch_size, 3, cfg.data.crop, cfg.data.crop)
    test = list(build_loader(cfg, "test"))
    assert len(test) == cfg.data.test_frames == 6  # the two held-out scenes, three frames each
    assert float(test[0]["lq"].mean()) < 0.2 * float(test[0]["gt"].mean())  # dark inputs

    # The Retinexformer + LFPVs run: its own config, the same tree, valid overrides.
    retinexformer = steps["train-retinexformer"]
    assert retinexformer.prepare is not None and retinexformer.command[retinexformer.command.index("-c") + 1] == \
        "demo_retinexformer"
    overrides = [s for s in sets_of(shlex.join(retinexformer.command)) if not s.startswith("data.num_workers")]
    cfg = load_config("demo_retinexformer", [*overrides, "data.num_workers=0"])
    assert cfg.model.backbone == "retinexformer" and cfg.model.lfpv.enabled
    assert cfg.data.dataset == "smid" and cfg.train.iterations == 40 and cfg.train.backend == "triton"
    assert cfg.train.compile == "off" and cfg.train.bf16 == "on"
    batch = next(iter(build_loader(cfg, "train")))
    assert tuple(batch["lq"].shape) == (cfg.data.batch_size, 3, cfg.data.crop, cfg.data.crop)
    assert len(list(build_loader(cfg, "test"))) == cfg.data.test_frames == 6

    found.packages["skimage"].error = None  # with scikit-image: the demo dataset, the overrides valid as well
    steps = {s.key: s for s in gpu_check.plan_steps(found, tmp_path, tmp_path / "out", "stem")}
    train, retinexformer = steps["train"], steps["train-retinexformer"]
    assert train.prepare is None and retinexformer.prepare is None
    assert load_config("demo", sets_of(shlex.join(train.command))).data.dataset == "demo"
    assert load_config("demo_retinexformer", sets_of(shlex.join(retinexformer.command))).data.dataset == "demo"


def test_pytest_summary_is_the_key_figure():
    log = "....s.F\n=== short test summary info ===\nFAILED x\n== 5 passed, 1 failed, 1 skipped in 3.21s ==\n"
    assert gpu_check.pytest_figure(log) == "5 passed, 1 failed, 1 skipped in 3.21s"
    assert gpu_check.pytest_figure("12 passed in 40.10s\n") == "12 passed in 40.10s"
    assert gpu_check.pytest_figure("ImportError: no module\n") == ""


def test_the_data_test_modules_collect_and_skip_16_bit_png_without_imagecodecs():
    cases = ["tests/test_data_loaders.py::test_global_batch_must_divide[png16]",
             "tests/test_data_images.py::test_resize_of_image_files_dali_and_torch_and_the_opencv_formula[16]"]
    proc = run_blocked(["imagecodecs"], "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                       *cases)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 skipped" in out and out.count("writing 16-bit PNG needs imagecodecs, which is not installed") == 2
    proc = run_blocked(["imagecodecs"], "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                       "--collect-only", "tests/test_data_loaders.py", "tests/test_data_images.py")
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "png16" in proc.stdout and "tests collected" in proc.stdout


def test_train_and_inference_key_figures_read_what_the_steps_write(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10, "loss": 0.5, "images_per_s": 10.0}, {"step": 40, "loss": 0.25, "images_per_s": 123.45}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_check.train_figure(run)("") == "step 40: loss 0.25, 123.5 img/s"
    (run / "val.jsonl").write_text(json.dumps({"step": 40, "psnr": 17.125}) + "\n")
    assert gpu_check.train_figure(run)("") == "step 40: loss 0.25, 123.5 img/s, val PSNR 17.12 dB"

    def row(name, median, speedup, diff, inp="dark photo"):
        return {"input": inp, "name": name, "seconds": {"median": median}, "speedup_vs_first_row": {"median": speedup},
                "max_abs_diff_vs_reference": diff}

    for dark in ("dark photo", "dark synthetic frame"):  # the rows of the dark frame, whichever --input it was
        doc = {"frame": {"rows": [row("reference ops", 0.0123, 1.0, 0.0, dark),
                                  row("lfpv_fast auto", 0.004, 3.07, 2e-6, dark),
                                  row("reference ops", 0.02, 1.0, 0.0, "SNR map of ones"),
                                  row("lfpv_fast auto", 0.01, 2.0, 1e-6, "SNR map of ones")]}}
        (tmp_path / "inference.json").write_text(json.dumps(doc))
        assert gpu_check.inference_figure(tmp_path / "inference.json")("") == \
            f"reference ops: 12.3 ms/frame; auto 3.07x, max |diff| 2.0e-06 ({dark})"


def test_ig_msa_key_figure_reads_the_benchmark_json(tmp_path):
    """The fused kernels' forward+backward speed-up per shape and level, from bench_ig_msa.py's rows."""
    def row(shape, channels, pass_name, impl, speedup=None):
        r = {"shape": shape, "channels": channels, "pass": pass_name, "impl": impl}
        if speedup is not None:
            r["speedup"] = {"median": speedup, "min": speedup, "max": speedup}
        return r

    rows = [row("train", 40, "fwd", "triton", 9.0), row("train", 40, "fwd+bwd", "reference", 1.0),
            row("train", 40, "fwd+bwd", "triton", 3.14159), row("train", 80, "fwd+bwd", "triton", 2.5),
            row("frame", 40, "fwd+bwd", "torch_gram", 1.9), row("frame", 40, "fwd+bwd", "triton", 4.0)]
    path = tmp_path / "ig_msa.json"
    path.write_text(json.dumps({"rows": rows}))
    assert gpu_check.ig_msa_figure(path)("") == \
        "triton fwd+bwd vs reference: train C=40/80: 3.14/2.50x; frame C=40: 4.00x"
    path.write_text(json.dumps({"rows": [row("train", 40, "fwd+bwd", "triton")]}))  # skipped rows: no figure
    assert gpu_check.ig_msa_figure(path)("") == ""


def test_make_gpu_check_runs_the_gpu_python_with_the_arguments_given():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    # --no-print-directory and no inherited MAKEFLAGS: under `make test` a child make says where it is.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "GPU_PY=python3",
                           "ARGS=--budget 300 --out /tmp/x"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "python3 -u bench/gpu_check.py --budget 300 --out /tmp/x"


@pytest.mark.parametrize("missing,skipped", [
    ("pip", {"install"}),
    ("triton", {"kernel-tests", "golden", "ig-msa", "train", "train-retinexformer"}),
    ("pytest", {"kernel-tests", "dali-gpu", "golden"}),
    ("nvidia.dali", {"dali-gpu"}),
    ("skimage", set()),  # the training step writes synthetic data, the frame benchmark makes a synthetic frame
    ("imagecodecs", set()),
    ("xdist", set()),
])
def test_each_missing_package_skips_exactly_the_steps_that_need_it(tmp_path, missing, skipped):
    found = fake_probe()
    found.packages[missing].error = f"No module named {missing!r}"
    steps = gpu_check.plan_steps(found, tmp_path, tmp_path, "stem")
    assert {s.key for s in steps if s.skip_reason} == skipped
    for s in steps:
        if s.skip_reason:
            assert found.packages[missing].dist in s.skip_reason and missing in s.skip_reason, s.skip_reason
    gpu_check.assign_shares(steps, 480)
    assert sum(s.share_s for s in steps) == 480 and all((s.share_s == 0) == bool(s.skip_reason) for s in steps)


def test_an_externally_managed_python_gets_the_flag_and_the_reason(tmp_path):
    found = fake_probe()
    install = gpu_check.plan_steps(found, tmp_path, tmp_path, "stem")[0]
    assert "--break-system-packages" not in install.command and not install.notes
    found.externally_managed = True
    install = gpu_check.plan_steps(found, tmp_path, tmp_path, "stem")[0]
    assert install.command[-1] == "--break-system-packages" and "PEP 668" in install.notes[0]


def test_when_the_install_fails_the_steps_that_need_it_are_skipped(tmp_path, capsys):
    install = gpu_check.Step("install", "fails", [sys.executable, "-c", "import sys; sys.exit(3)"],
                             needs_install=False)
    needs = python_step("kernel-tests", "print('ran')")
    needs.needs_install = True
    independent = python_step("three", "print('three done')")
    steps = [install, needs, independent]
    report = fake_report(tmp_path / "out", steps, budget=120)
    gpu_check.assign_shares(steps, 120)
    gpu_check.run_plan(report, dict(os.environ), time.monotonic())
    assert [s.status for s in steps] == ["failed (exit 3)", "skipped", "passed"]
    assert needs.skip_reason == "the install step did not pass"
    assert "kernel-tests: skipped (the install step did not pass)" in capsys.readouterr().out
