"""The first thing to run on a machine with a GPU: `make gpu-check` (or `python bench/gpu_check.py`).

Runs, each as its own command with a 9-minute limit:
  1. the GPU tests: kernels compiled for this card against their reference twins (TRITON_INTERPRET=0),
     the golden case through the Triton backend, autocast mixes, the DALI GPU pipelines;
  2. the compile gate for this card (shared memory, registers, spills of every launch);
  3. a short training run with every fast switch on (torch.compile, Triton ops, bf16, fused Adam,
     DALI on the GPU);
  4. the benchmarks (bench/run_all.py) and the training-step table (bench/bench_train.py).
Writes bench/results/<date>-<gpu>-gpu-check.json and .md (each step's status, time and output tail) and
prints a one-screen summary. Exits 1 if a step failed, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_LIMIT_S = 540  # each command stays under 9 minutes

GPU_TESTS = [
    "tests/test_kernel_query_fusion.py", "tests/test_kernel_masked_attention.py", "tests/test_kernel_snr_mask.py",
    "tests/test_kernel_bank_update.py", "tests/test_kernel_autocast.py", "tests/test_golden.py",
    "tests/test_backends.py", "tests/test_data_loaders.py", "tests/test_data_images.py",
]


def steps(python: str, results: Path, slug: str, run_dir: Path) -> list[tuple[str, list[str]]]:
    return [
        ("GPU tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]),
        ("compile gate (this card)", [python, "-m", "lfpv_fast.kernels.compile_gate", "--targets", "local",
                                      "--json", str(results / f"{slug}-compile.json"),
                                      "--markdown", str(results / f"{slug}-compile.md")]),
        ("training, every fast switch", [python, "-m", "lfpv_fast.train", "-c", "configs/demo.yaml",
                                         "--out", str(run_dir), "--set", "train.iterations=60",
                                         "--set", "train.backend=triton", "--set", "train.compile=on",
                                         "--set", "train.bf16=on", "--set", "train.fused_adam=on",
                                         "--set", "data.loader=dali", "--set", "data.device=gpu",
                                         "--set", "val.every=60", "--set", "logging.every=10"]),
        ("benchmarks (bench/run_all.py)", [python, "bench/run_all.py"]),
        ("training-step table (bench/bench_train.py)", [python, "bench/bench_train.py"]),
    ]


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter that holds CUDA torch")
    parser.add_argument("--only", type=int, nargs="*", help="run only these steps (1-based)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA device, and torch sees none "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2
    name = gpu_name()
    date = datetime.date.today().isoformat()
    slug = f"{date}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = dict(gpu=name, date=date, torch=torch.__version__, cuda=torch.version.cuda, steps=[])
    with tempfile.TemporaryDirectory() as tmp:
        for i, (title, cmd) in enumerate(steps(args.python, results, slug, Path(tmp, "run")), start=1):
            if args.only and i not in args.only:
                continue
            print(f"[{i}] {title}: {' '.join(cmd)}", flush=True)
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STEP_LIMIT_S)
                status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                output = proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as exc:
                status = f"timed out after {STEP_LIMIT_S} s"
                output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
            seconds = round(time.perf_counter() - start, 1)
            tail = "\n".join(output.strip().splitlines()[-15:])
            report["steps"].append(dict(step=i, title=title, command=" ".join(cmd), status=status, seconds=seconds,
                                        tail=tail))
            print(f"    {status} in {seconds} s\n" + "\n".join("    " + line for line in tail.splitlines()[-6:]),
                  flush=True)
    (results / f"{slug}-gpu-check.json").write_text(json.dumps(report, indent=1))
    lines = [f"# gpu-check on {name}, {date}", "", f"torch {report['torch']}, CUDA {report['cuda']}", "",
             "| step | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {s['step']}. {s['title']} | {s['status']} | {s['seconds']} |" for s in report["steps"]]
    lines += [""] + [f"## {s['step']}. {s['title']}\n\n`{s['command']}`\n\n```\n{s['tail']}\n```\n"
                     for s in report["steps"]]
    (results / f"{slug}-gpu-check.md").write_text("\n".join(lines))
    print("\n".join(lines[:6 + len(report["steps"])]))
    print(f"written: bench/results/{slug}-gpu-check.json and .md")
    return 0 if all(s["status"] == "passed" for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
