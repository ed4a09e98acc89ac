"""Run every benchmark in bench/ and collect their JSON into bench/results/.

    python bench/run_all.py            # full runs (GPU rows where CUDA is available)
    python bench/run_all.py --quick    # short runs, e.g. on a CPU-only machine

Each script prints its own table and writes `bench/results/<date>-<device>-<name>.json`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_lfpv_kernels.py", "bench_attention_snr.py", "bench_data.py", "bench_train.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    args = parser.parse_args()
    failed = []
    for name in SCRIPTS:
        script = HERE / name
        if not script.is_file():
            print(f"== {name}: missing, skipped")
            continue
        print(f"== {name}", flush=True)
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
