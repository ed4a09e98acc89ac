"""The first thing to run on a machine with a GPU: `make gpu-check` (or `python3 bench/gpu_check.py --budget 480`).

Made for a bare machine with no network: it runs in the Python that holds CUDA torch (the one running this
file), installs this checkout into it offline (`pip install --no-index --no-deps --no-build-isolation -e .`;
`lfpv_fast.kernels` exists only through the install's folder mapping), checks which optional packages are
there and skips, with the reason printed, what needs a missing one. Steps:

  1. install       the offline editable install of this checkout
  2. kernel-tests  the Triton kernel tests on the GPU against their reference twins (pytest-xdist where present)
  3. dali-gpu      the DALI GPU tests (pytest -m gpu in the data test modules); skipped without DALI
  4. golden        the golden case through the Triton backend on the GPU (tests/test_golden.py)
  5. ig-msa        Retinexformer's IG-MSA kernels against the reference twin (bench/bench_ig_msa.py --quick): forward
                   and forward+backward at its three levels (40, 80, 160 channels), 128x128 crops and a 1024x1920 frame
  6. train         40 training steps: train.backend=triton, torch.compile, bf16, fused Adam, the torch loader, on
                   the demo dataset (a synthetic SMID-style dataset where scikit-image is missing)
  7. train-retinexformer  40 training steps of Retinexformer + LFPVs (configs/demo_retinexformer.yaml):
                   train.backend=triton (the IG-MSA and LFPV kernels), bf16, fused Adam, eager (the SNR-Aware step
                   covers torch.compile), on the same data as step 6
  8. inference     the 512x960 frame benchmark on the GPU against the reference backend (bench/bench_inference.py):
                   the demo's darkened photo, or a synthetic dark frame made with numpy where scikit-image is missing

--budget SECONDS (default 480) is divided across the steps that run, in proportion to WEIGHTS; a step may use
its share plus what earlier steps left unused, and is stopped (its process group killed) when that runs out,
recorded as timed out, and the next step runs. Each step's output goes to its log file; the summary (markdown)
and the JSON are rewritten in --out DIR (default bench/results/) when each step starts and ends, so a run cut
off at any point leaves what it measured. --dry-run plans everything (the packages probe, the budget split, the
exact commands) and writes the same files, without a GPU and without running a step.
Exit status: 0 every step that ran passed, 1 a step failed or timed out, 2 bad arguments or no CUDA device,
130 interrupted (SIGINT/SIGTERM; the step in progress is stopped and recorded).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480  # with the probe and the install, a run fits a 10-minute command limit with room to spare
DEFAULT_OUT = ROOT / "bench" / "results"
# Share of the budget of each step (of those that run). The kernel tests compile every kernel for the card.
WEIGHTS = {"install": 5, "kernel-tests": 32, "dali-gpu": 4, "golden": 10, "ig-msa": 10, "train": 18,
           "train-retinexformer": 11, "inference": 10}
KILL_GRACE_S = 5  # after SIGTERM to a step's process group, SIGKILL follows this much later
MIN_STEP_S = 5  # a step left with less than this is skipped as "budget spent"
PROGRESS_EVERY_S = 30  # a running step prints its latest log line this often
TRAIN_STEPS = 40
TAIL_LINES = 20  # of each step's log, in the markdown summary


# ---------------------------------------------------------------------------------------------
# Which packages this Python has


@dataclass
class Package:
    module: str
    dist: str  # the name pip knows it by (for its version and for messages)
    needed_for: str
    import_it: bool  # import it (a broken install shows); else only look it up (fast)


PACKAGES = [
    Package("torch", "torch", "every step", True),
    Package("triton", "triton", "the kernel tests, the golden Triton parity, the training run", True),
    Package("pytest", "pytest", "the test steps", False),
    Package("xdist", "pytest-xdist", "the kernel tests in parallel (serial without it)", False),
    Package("nvidia.dali", "nvidia-dali-cuda120", "the DALI GPU tests", True),
    Package("imagecodecs", "imagecodecs", "the 16-bit PNG test cases", True),
    Package("skimage", "scikit-image", "the demo dataset and the frame benchmark's photo (else synthetic)", True),
    Package("gradio", "gradio", "the web app (no step here)", False),
    Package("pip", "pip", "the offline install", False),
    Package("setuptools", "setuptools", "the offline install (build back end, no isolation)", False),
    Package("wheel", "wheel", "the offline install, with a setuptools older than 70.1 only", False),
    # Core dependencies: --no-deps installs none of them, so they must be there already.
    Package("numpy", "numpy", "lfpv_fast (core)", False),
    Package("yaml", "PyYAML", "lfpv_fast (core)", False),
    Package("PIL", "Pillow", "lfpv_fast (core)", False),
    Package("tqdm", "tqdm", "lfpv_fast (core)", False),
    Package("tifffile", "tifffile", "lfpv_fast (core)", False),
]


@dataclass
class Found:
    module: str
    dist: str
    needed_for: str
    version: str | None = None
    error: str | None = None  # why it cannot be used; None: available

    @property
    def available(self) -> bool:
        return self.error is None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def probe_package(pkg: Package) -> Found:
    found = Found(pkg.module, pkg.dist, pkg.needed_for)
    try:
        if pkg.import_it:
            module = importlib.import_module(pkg.module)
            found.version = getattr(module, "__version__", None)
        elif importlib.util.find_spec(pkg.module) is None:
            found.error = f"No module named {pkg.module!r}"
            return found
    except Exception as exc:  # not installed, or installed but broken (a wrong CUDA build, say)
        found.error = _first_line(exc)
        return found
    if found.version is None:
        try:
            found.version = importlib.metadata.version(pkg.dist)
        except importlib.metadata.PackageNotFoundError:
            found.version = "?"
    return found


@dataclass
class Probe:
    python: str
    packages: dict[str, Found]
    cuda_build: str | None = None  # torch.version.cuda
    device: str | None = None  # the GPU's name; None without a CUDA device
    cuda_problem: str | None = None  # why there is no usable CUDA device
    externally_managed: bool = False  # PEP 668: pip refuses to install into this Python without a flag
    cpu_count: int = 1

    def has(self, module: str) -> bool:
        return self.packages[module].available

    def why_missing(self, module: str) -> str:
        found = self.packages[module]
        name = found.dist if found.dist == found.module else f"{found.dist} ({found.module})"
        return f"{name} is not importable: {found.error}"


def probe(python: str = sys.executable) -> Probe:
    """What this Python holds; the steps run in the same Python."""
    result = Probe(python, {p.module: probe_package(p) for p in PACKAGES}, cpu_count=os.cpu_count() or 1)
    if result.has("torch"):
        import torch

        result.cuda_build = torch.version.cuda
        if torch.version.cuda is None:
            result.cuda_problem = (f"torch {torch.__version__} in {python} is a CPU build (torch.version.cuda is "
                                   "None); run with the Python that holds CUDA torch (make gpu-check GPU_PY=...)")
        elif not torch.cuda.is_available():
            result.cuda_problem = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) in {python} sees no CUDA "
                                   f"device (driver, or CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
        else:
            result.device = torch.cuda.get_device_name(0)
    else:
        result.cuda_problem = f"{python} cannot import torch ({result.packages['torch'].error})"
    in_venv = sys.prefix != sys.base_prefix
    marker = Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED"
    result.externally_managed = marker.is_file() and not in_venv
    return result


# ---------------------------------------------------------------------------------------------
# The steps


@dataclass
class Step:
    key: str
    title: str
    command: list[str]
    skip_reason: str | None = None  # set: the step does not run, and this says why
    notes: list[str] = field(default_factory=list)  # what is left out inside the step, and why
    needs_install: bool = True
    prepare: Callable[[], None] | None = None  # in-process set-up right before the command (e.g. write data)
    figure: Callable[[str], str] | None = None  # the key figure, from the step's log text
    # Filled in as the run goes:
    share_s: int = 0
    status: str = "planned"
    timeout_s: float | None = None
    seconds: float | None = None
    key_figure: str = ""
    log: str = ""  # path relative to the output folder

    def to_json(self) -> dict:
        return {"key": self.key, "title": self.title, "command": shlex.join(self.command), "status": self.status,
                "skip_reason": self.skip_reason, "notes": self.notes, "share_s": self.share_s,
                "timeout_s": self.timeout_s, "seconds": self.seconds, "key_figure": self.key_figure, "log": self.log}


PYTEST_SUMMARY = re.compile(r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [0-9.]+s")


def pytest_figure(log: str) -> str:
    """pytest's last summary line ("12 passed, 3 skipped in 40.1s")."""
    for line in reversed(log.splitlines()):
        if PYTEST_SUMMARY.search(line):
            return line.strip("= \t")
    return ""


def install_figure(log: str) -> str:
    found = re.findall(r"Successfully installed .*", log)
    return found[-1].strip() if found else ""


def train_figure(run_dir: Path) -> Callable[[str], str]:
    def figure(_log: str) -> str:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = rows[-1]
        text = f"step {last['step']}: loss {last['loss']:.4g}, {last['images_per_s']:.1f} img/s"
        val = run_dir / "val.jsonl"
        if val.is_file():
            vals = [json.loads(line) for line in val.read_text().splitlines() if line.strip()]
            if vals:
                text += f", val PSNR {vals[-1]['psnr']:.2f} dB"
        return text

    return figure


def inference_figure(json_path: Path) -> Callable[[str], str]:
    def figure(_log: str) -> str:
        doc = json.loads(json_path.read_text())
        dark = doc["frame"]["rows"][0]["input"]  # the dark frame's rows come first, then the SNR map of ones
        rows = [r for r in doc["frame"]["rows"] if r["input"] == dark]
        base = rows[0]
        parts = [f"{base['name']}: {base['seconds']['median'] * 1e3:.1f} ms/frame"]
        for r in rows[1:]:
            if r["name"] == "lfpv_fast auto":
                parts.append(f"auto {r['speedup_vs_first_row']['median']:.2f}x, "
                             f"max |diff| {r['max_abs_diff_vs_reference']:.1e}")
        return "; ".join(parts) + f" ({dark})"

    return figure


def ig_msa_figure(json_path: Path) -> Callable[[str], str]:
    """The fused kernels' median speed-up over the reference twin, forward+backward, per shape and level."""
    def figure(_log: str) -> str:
        rows = [r for r in json.loads(json_path.read_text())["rows"]
                if r["impl"] == "triton" and r["pass"] == "fwd+bwd" and "speedup" in r]
        parts = []
        for shape in dict.fromkeys(r["shape"] for r in rows):
            levels = [r for r in rows if r["shape"] == shape]
            channels = "/".join(str(r["channels"]) for r in levels)
            speedups = "/".join(f"{r['speedup']['median']:.2f}" for r in levels)
            parts.append(f"{shape} C={channels}: {speedups}x")
        return ("triton fwd+bwd vs reference: " + "; ".join(parts)) if parts else ""

    return figure


def write_synthetic_smid(root: Path, scenes: int = 8, frames: int = 3, width: int = 256, height: int = 192) -> Path:
    """A small SMID-layout dataset made with numpy alone (for a Python without scikit-image): smooth colour
    fields as ground truths, each frame a dark, noisy copy. Returns the test-scene list; scenes t0 and t1 are
    held out."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    names = [f"t{k}" if k < 2 else f"s{k}" for k in range(scenes)]
    for k, name in enumerate(names):
        phase = rng.uniform(0, 6, 3)
        gt = np.stack([np.sin((5 + k) * xx + phase[c]) * np.cos((3 + c) * yy - phase[c]) for c in range(3)], axis=2)
        gt_u8 = np.round((gt * 0.45 + 0.5) * 255).astype(np.uint8)
        (root / "gt" / name).mkdir(parents=True, exist_ok=True)
        (root / "lq" / name).mkdir(parents=True, exist_ok=True)
        np.save(root / "gt" / name / "long.npy", gt_u8)
        for f in range(frames):
            dark = gt_u8 * rng.uniform(0.03, 0.1) + rng.normal(0, 2.0, gt_u8.shape)
            np.save(root / "lq" / name / f"{f:04d}.npy", np.clip(np.round(dark), 0, 255).astype(np.uint8))
    test_list = root / "test_scenes.txt"
    test_list.write_text("t0\nt1\n")
    return test_list


def pytest_command(python: str, *args: str) -> list[str]:
    # addopts is replaced: the project's holds --benchmark-disable, an error where pytest-benchmark is missing.
    # A module that fails to import is reported and the others still run. One line per test (-v): a step cut
    # off by its time limit shows in its log how far it got; the slowest tests are listed (first compiles).
    return [python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=-ra", "--durations=10",
            "--continue-on-collection-errors", *args]


def plan_steps(found: Probe, work: Path, out_dir: Path, stem: str) -> list[Step]:
    """Every step, with its exact command, and the reason for each one that cannot run here."""
    py = found.python
    steps: list[Step] = []

    install = [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    notes = []
    if found.externally_managed:
        install.append("--break-system-packages")
        notes.append("this Python is marked externally managed (PEP 668): the editable install of this checkout, "
                     "with no dependencies, needs --break-system-packages")
    steps.append(Step("install", "offline editable install", install, needs_install=False, notes=notes,
                      skip_reason=None if found.has("pip") else found.why_missing("pip"), figure=install_figure))

    no_pytest = None if found.has("pytest") else found.why_missing("pytest")
    no_triton = None if found.has("triton") else found.why_missing("triton") + "; the kernels cannot run"

    kernel_tests = ROOT / "tests" / "kernels"
    kernel_files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(kernel_tests / "test_kernel_*.py")))
    xdist, notes = [], []
    if found.has("xdist"):
        xdist = ["-n", str(max(1, min(8, found.cpu_count)))]
    else:
        notes.append(f"serial: {found.why_missing('xdist')}")
    steps.append(Step("kernel-tests", "Triton kernel tests on the GPU",
                      pytest_command(py, *xdist, *kernel_files, "tests/test_backends.py"),
                      skip_reason=no_pytest or no_triton, notes=notes, figure=pytest_figure))

    notes = []
    if not found.has("imagecodecs"):
        notes.append(f"the 16-bit PNG cases skip: {found.why_missing('imagecodecs')}")
    no_dali = None if found.has("nvidia.dali") else \
        f"the DALI rows are skipped: {found.why_missing('nvidia.dali')}"
    steps.append(Step("dali-gpu", "DALI GPU tests",
                      pytest_command(py, "-m", "gpu", "tests/test_data_loaders.py", "tests/test_data_images.py"),
                      skip_reason=no_pytest or no_dali, notes=notes, figure=pytest_figure))

    steps.append(Step("golden", "golden case through the Triton backend on the GPU",
                      pytest_command(py, "tests/test_golden.py"), skip_reason=no_pytest or no_triton,
                      figure=pytest_figure))

    ig_msa_json = out_dir / f"{stem}-ig_msa.json"
    steps.append(Step("ig-msa", "IG-MSA kernels against the reference twin: 3 levels, 128x128 crops and a 1024x1920 "
                      "frame", [py, str(ROOT / "bench" / "bench_ig_msa.py"), "--quick", "--device", "cuda", "--out",
                                str(ig_msa_json)],
                      skip_reason=no_triton, figure=ig_msa_figure(ig_msa_json)))

    common_sets = [f"train.iterations={TRAIN_STEPS}", "train.device=cuda", "train.backend=triton", "train.bf16=on",
                   "train.fused_adam=on", "data.loader=torch", "data.device=cpu", "data.num_workers=2",
                   f"val.every={TRAIN_STEPS}", f"train.checkpoint_every={TRAIN_STEPS}", "logging.every=10",
                   "logging.progress=false", "logging.tensorboard=false"]
    prepare, data_notes = None, []
    if found.has("skimage"):
        data_notes.append("data: the built-in demo dataset (written once from scikit-image's bundled photos into "
                          "data.demo_root, ~/.cache/lfpv_fast/demo)")
    else:
        data = work / "synthetic-smid"
        common_sets += ["data.dataset=smid", f"data.lq_root={data / 'lq'}", f"data.gt_root={data / 'gt'}",
                        f"data.test_scenes={data / 'test_scenes.txt'}"]
        prepare = lambda: write_synthetic_smid(data)  # noqa: E731  (each training step writes it: either may run alone)
        data_notes.append(f"data: a synthetic SMID-style dataset written with numpy into {data} "
                          f"({found.why_missing('skimage')})")

    def train_command(config: str, run_dir: Path, sets: list[str]) -> list[str]:
        command = [py, "-m", "lfpv_fast.train", "-c", config, "--out", str(run_dir)]
        for s in sets:
            command += ["--set", s]
        return command

    run_dir = work / "train-run"
    steps.append(Step("train", f"{TRAIN_STEPS} training steps: triton, compile, bf16, fused Adam, torch loader",
                      train_command("demo", run_dir, [*common_sets, "train.compile=on"]), skip_reason=no_triton,
                      notes=list(data_notes), prepare=prepare, figure=train_figure(run_dir)))

    run_dir = work / "train-retinexformer-run"
    notes = [*data_notes, "eager (train.compile=off): the IG-MSA and LFPV kernels as launched; the SNR-Aware step "
             "covers torch.compile"]
    steps.append(Step("train-retinexformer", f"{TRAIN_STEPS} training steps of Retinexformer + LFPVs: triton, bf16, "
                      "fused Adam", train_command("demo_retinexformer", run_dir, [*common_sets, "train.compile=off"]),
                      skip_reason=no_triton, notes=notes, prepare=prepare, figure=train_figure(run_dir)))

    inference_json = out_dir / f"{stem}-inference.json"
    command = [py, str(ROOT / "bench" / "bench_inference.py"), "--parts", "frame", "--device", "cuda",
               "--out", str(inference_json)]
    if found.has("skimage"):
        notes = ["input: the demo's coffee photo (scikit-image), darkened by the demo's low-light model"]
    else:
        command += ["--input", "synthetic"]
        notes = [f"input: a synthetic photo-like frame made with numpy, darkened by the demo's low-light model "
                 f"({found.why_missing('skimage')})"]
    steps.append(Step("inference", "512x960 frame benchmark on the GPU against the reference backend", command,
                      notes=notes, figure=inference_figure(inference_json)))
    assert [s.key for s in steps] == list(WEIGHTS)
    return steps


# ---------------------------------------------------------------------------------------------
# The budget


def split_budget(budget_s: int, weights: dict[str, float]) -> dict[str, int]:
    """Whole seconds per key, in proportion to the weights, summing to exactly `budget_s` (largest remainders).
    A key of weight 0 gets 0."""
    total = sum(weights.values())
    if total <= 0:
        return {k: 0 for k in weights}
    exact = {k: budget_s * w / total for k, w in weights.items()}
    shares = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(weights, key=lambda k: exact[k] - shares[k], reverse=True)
    for k in by_remainder[: budget_s - sum(shares.values())]:
        shares[k] += 1
    return shares


def assign_shares(steps: list[Step], budget_s: int) -> None:
    shares = split_budget(budget_s, {s.key: 0 if s.skip_reason else WEIGHTS.get(s.key, 1) for s in steps})
    for s in steps:
        s.share_s = shares[s.key]
        if s.skip_reason:
            s.status = "skipped"


def step_allowance(remaining_s: float, later: list[Step]) -> float:
    """Seconds a step may run: what is left of the budget, less the later steps' shares and the kill grace, so
    that time unused by earlier steps goes to this one and an overrun is taken from this one."""
    return remaining_s - sum(s.share_s for s in later if s.status == "planned") - KILL_GRACE_S


# ---------------------------------------------------------------------------------------------
# The report: written whenever a step starts or ends


class Stopped(Exception):
    """SIGTERM (or SIGINT) arrived: stop the step in progress, record it, end."""


def _load_atomic_write():
    """lfpv_fast/io/files.py by its path: importing the package would need the install (and torch) first."""
    spec = importlib.util.spec_from_file_location("_lfpv_fast_files", ROOT / "lfpv_fast" / "io" / "files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.atomic_write_text


atomic_write_text = _load_atomic_write()


@dataclass
class Report:
    out_dir: Path
    stem: str
    meta: dict
    probe: Probe
    steps: list[Step]
    budget_s: int
    dry_run: bool

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.stem}.json"

    @property
    def md_path(self) -> Path:
        return self.out_dir / f"{self.stem}.md"

    @property
    def logs_dir(self) -> Path:
        return self.out_dir / f"{self.stem}-logs"

    def to_json(self) -> dict:
        return {**self.meta, "dry_run": self.dry_run, "budget_s": self.budget_s,
                "probe": {m: {"dist": f.dist, "available": f.available, "version": f.version, "error": f.error,
                              "needed_for": f.needed_for} for m, f in self.probe.packages.items()},
                "steps": [s.to_json() for s in self.steps]}

    def table(self) -> list[str]:
        rows = ["| # | step | status | share s | s | key figure | log |",
                "| ---: | --- | --- | ---: | ---: | --- | --- |"]
        for i, s in enumerate(self.steps, start=1):
            status = s.status + (f": {s.skip_reason}" if s.skip_reason else "")
            seconds = "" if s.seconds is None else f"{s.seconds:.1f}"
            rows.append(f"| {i} | {s.key}: {s.title} | {status} | {s.share_s} | {seconds} | {s.key_figure} | "
                        f"{s.log} |")
        return rows

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# gpu-check{' (dry run: planned, nothing ran)' if self.dry_run else ''}: {m['device']}, "
                 f"{m['date']}", "",
                 f"Python {m['python_version']} ({m['python']}), torch {m['torch']}, CUDA {m['cuda']}, "
                 f"Triton {m['triton']}; budget {self.budget_s} s; command `{m['command']}`", "",
                 "## Steps", "", *self.table(), "", "## Packages", "", "| package | version | needed for |",
                 "| --- | --- | --- |"]
        for f in self.probe.packages.values():
            lines.append(f"| {f.dist} | {f.version if f.available else 'missing: ' + str(f.error)} | {f.needed_for} |")
        for i, s in enumerate(self.steps, start=1):
            lines += ["", f"## {i}. {s.key}: {s.title}", "", f"`{shlex.join(s.command)}`", ""]
            lines += [f"- {n}" for n in s.notes]
            log = self.out_dir / s.log if s.log else None
            if log is not None and log.is_file():
                tail = log.read_text(errors="replace").strip().splitlines()[-TAIL_LINES:]
                lines += ["", "```", *tail, "```"]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        atomic_write_text(self.json_path, json.dumps(self.to_json(), indent=1) + "\n")
        atomic_write_text(self.md_path, self.markdown())


# ---------------------------------------------------------------------------------------------
# Running


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (pytest workers, loader workers); after the grace (or as soon
    as the step's own process has ended), SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-150:] if lines else ""


def run_step(step: Step, log_path: Path, timeout_s: float, env: dict) -> None:
    """Run the step's command, its output into `log_path`; sets status and seconds."""
    start = time.monotonic()
    log_path.write_text(f"$ {shlex.join(step.command)}\n")
    with open(log_path, "a") as log:  # appending: the step's process writes to the same file
        proc = None
        try:
            if step.prepare is not None:
                step.prepare()
            proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            next_note = start + PROGRESS_EVERY_S
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    if now - start >= timeout_s:
                        _stop_group(proc)
                        step.status = f"timed out after {timeout_s:.0f} s"
                        log.write(f"\ngpu-check: {step.status}; its process group was stopped\n")
                        return
                    if now >= next_note:
                        print(f"    ... {now - start:.0f} s: {_last_line(log_path)}", flush=True)
                        next_note = now + PROGRESS_EVERY_S
            step.status = "passed" if code == 0 else f"failed (exit {code})"
        except Stopped:
            if proc is not None:
                _stop_group(proc)
            step.status = "interrupted"
            raise
        except Exception as exc:  # the command could not start, or prepare failed: recorded, the run goes on
            log.write(f"\ngpu-check: {_first_line(exc)}\n")
            step.status = f"failed ({_first_line(exc)})"
        finally:
            step.seconds = round(time.monotonic() - start, 1)


def run_plan(report: Report, env: dict, started: float) -> None:
    """Run every planned step in order within the budget, rewriting the report at each start and end."""
    report.logs_dir.mkdir(parents=True, exist_ok=True)
    install = report.steps[0] if report.steps and report.steps[0].key == "install" else None
    for i, step in enumerate(report.steps, start=1):
        if step.status != "planned":
            continue
        if step.needs_install and install is not None and install.status.startswith(("failed", "timed out")):
            step.status, step.skip_reason = "skipped", "the install step did not pass"
            print(f"[{i}] {step.key}: skipped ({step.skip_reason})", flush=True)
            report.write()
            continue
        allowance = step_allowance(report.budget_s - (time.monotonic() - started), report.steps[i:])
        if allowance < MIN_STEP_S:
            step.status, step.skip_reason = "skipped", f"budget spent ({allowance:.0f} s left for it)"
            print(f"[{i}] {step.key}: skipped ({step.skip_reason})", flush=True)
            report.write()
            continue
        step.timeout_s = round(allowance, 1)
        step.log = str(Path(report.logs_dir.name) / f"{i}-{step.key}.log")
        step.status = "running"
        print(f"[{i}] {step.key}: {step.title} (up to {allowance:.0f} s; log {report.out_dir / step.log})\n"
              f"    $ {shlex.join(step.command)}", flush=True)
        report.write()
        try:
            run_step(step, report.out_dir / step.log, allowance, env)
        finally:
            if step.figure is not None and step.status != "interrupted":
                try:
                    step.key_figure = step.figure((report.out_dir / step.log).read_text(errors="replace"))
                except Exception:  # the step did not get as far as its figure
                    step.key_figure = ""
            report.write()
        tail = _last_line(report.out_dir / step.log)
        print(f"    {step.status} in {step.seconds} s" + (f": {step.key_figure}" if step.key_figure else "") +
              (f"\n    last line: {tail}" if step.status != "passed" else ""), flush=True)


def stop_on_signals() -> None:
    """SIGTERM (a time limit's kill) and SIGINT raise Stopped: the step in progress is stopped and recorded."""

    def stop(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run_meta(found: Probe, date: str, command: str) -> dict:
    """The run's header: machine, versions, command."""
    def version(module: str) -> str | None:
        return found.packages[module].version if module in found.packages else None

    return {"tool": "bench/gpu_check.py", "date": date, "device": found.device or "no CUDA device",
            "python": found.python, "python_version": sys.version.split()[0], "torch": version("torch"),
            "cuda": found.cuda_build, "triton": version("triton"), "cuda_problem": found.cuda_problem,
            "command": command}


def key_width(steps: list[Step]) -> int:
    """The step column's width: the longest key (13 at least, as before the longer keys)."""
    return max([13, *(len(s.key) for s in steps)])


def print_plan(report: Report) -> None:
    found = report.probe
    print(f"gpu-check: {report.meta['device']}; Python {report.meta['python_version']} ({found.python}); "
          f"torch {report.meta['torch']}, CUDA {report.meta['cuda']}")
    if found.cuda_problem:
        print(f"  no CUDA: {found.cuda_problem}")
    print("packages:")
    for f in found.packages.values():
        state = f"{f.version}" if f.available else f"missing ({f.error})"
        print(f"  {f.dist:<20} {state:<48} {f.needed_for}")
    print(f"budget {report.budget_s} s:")
    width = key_width(report.steps)
    for i, s in enumerate(report.steps, start=1):
        if s.skip_reason:
            print(f"  [{i}] {s.key:<{width}} skipped: {s.skip_reason}")
        else:
            print(f"  [{i}] {s.key:<{width}} {s.share_s:>4} s  $ {shlex.join(s.command)}")
        for n in s.notes:
            print(f"      note: {n}")
    sys.stdout.flush()


def print_summary(report: Report, used_s: float) -> None:
    print(f"\ngpu-check {'plan' if report.dry_run else 'summary'}: {report.meta['device']}, {report.meta['date']}; "
          f"budget {report.budget_s} s, used {used_s:.0f} s")
    width = key_width(report.steps)
    print(f"{'#':>2} {'step':<{width}} {'status':<24} {'s':>6}  key figure / log")
    for i, s in enumerate(report.steps, start=1):
        seconds = "" if s.seconds is None else f"{s.seconds:.1f}"
        what = s.key_figure or s.skip_reason or ""
        print(f"{i:>2} {s.key:<{width}} {s.status[:24]:<24} {seconds:>6}  "
              f"{what[:90] + ('...' if len(what) > 90 else '')}")
        if s.log:
            print(f"{'':>{width + 35}}{report.out_dir / s.log}")
    print(f"written: {report.md_path}\n         {report.json_path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                    help=f"wall-clock seconds for all steps together (default {DEFAULT_BUDGET_S})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR",
                    help="folder for the summary, the JSON and the logs (default bench/results/)")
    ap.add_argument("--dry-run", action="store_true", help="plan and write the files; run nothing, no GPU needed")
    ap.add_argument("--only", nargs="+", choices=list(WEIGHTS), metavar="STEP",
                    help=f"run only these steps ({', '.join(WEIGHTS)}); the others are skipped")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.budget < MIN_STEP_S:
        print(f"error: --budget must be at least {MIN_STEP_S} seconds, got {args.budget}", file=sys.stderr)
        return 2
    found = probe()
    if found.cuda_problem and not args.dry_run:
        print(f"error: gpu-check needs a CUDA device: {found.cuda_problem}", file=sys.stderr)
        return 2
    device = found.device or "no CUDA device"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") if found.device else "no-gpu"
    date = datetime.date.today().isoformat()
    stem = f"{date}-{slug}-gpu-check" + ("-dry-run" if args.dry_run else "")
    out_dir = Path(args.out).expanduser().resolve()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps = plan_steps(found, work, out_dir, stem)
    if args.only:
        for s in steps:
            if s.key not in args.only and not s.skip_reason:
                s.skip_reason = "not in --only"
    assign_shares(steps, args.budget)
    command = shlex.join(["bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    report = Report(out_dir, stem, run_meta(found, date, command), found, steps, args.budget, args.dry_run)
    print_plan(report)
    try:
        try:
            report.write()
        except OSError as exc:
            print(f"error: --out {out_dir}: cannot write the report there ({exc.strerror or exc})", file=sys.stderr)
            return 2
        if args.dry_run:
            print_summary(report, time.monotonic() - started)
            return 0
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
        env["PYTHONUNBUFFERED"] = "1"
        stop_on_signals()
        try:
            run_plan(report, env, started)
        except Stopped as exc:
            print(f"\nstopped by {exc}; the step in progress was stopped and recorded", flush=True)
            print_summary(report, time.monotonic() - started)
            return 130
        print_summary(report, time.monotonic() - started)
        ran = [s for s in steps if s.status != "skipped"]
        return 0 if all(s.status == "passed" for s in ran) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
