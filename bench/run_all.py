"""Run every benchmark in bench/ and write one JSON and one markdown table for this device.

    python bench/run_all.py [--published PATH] [--quick] [--checkpoint PATH]
    python bench/run_all.py --collect bench/results/2026-11-25-cpu-*.json   # merge runs made one by one

Each script runs in its own process with --out into a scratch folder; their results are merged into
`bench/results/<date>-<device>.json` and `bench/results/<date>-<device>.md`, with the versions of
torch, Triton and DALI, the device name and the load average (common.environment). --published (or
$LFPV_PUBLISHED) is passed to every script, so their baseline rows run the published code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import published as pub_mod

HERE = Path(__file__).resolve().parent
# script -> extra arguments for --quick
SCRIPTS = {
    "bench_lfpv_kernels.py": ["--quick"],
    "bench_attention_snr.py": ["--quick"],
    "bench_ig_msa.py": ["--quick"],
    "bench_data.py": ["--quick"],
    "bench_train.py": ["--quick"],
    "bench_inference.py": ["--sizes", "1", "--parts", "frame,memory"],
}
LABEL_KEYS = ("name", "input", "op", "shape", "pass", "impl", "megapixels", "backend", "path", "status", "skipped")


def _is_spread(value) -> bool:
    return isinstance(value, dict) and {"min", "median", "max"} <= set(value)


def _cell(value) -> str:
    if value is None:
        return ""
    if _is_spread(value):
        return f"{value['median']:.4g} ({value['min']:.4g}-{value['max']:.4g})"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rows_of(doc: dict) -> list[dict]:
    """The result rows of one script's JSON (some nest them by part)."""
    rows = list(doc.get("rows", []))
    for part in ("frame", "memory"):
        if isinstance(doc.get(part), dict):
            rows += [{"part": part, **r} for r in doc[part].get("rows", [])]
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Label columns, then every min/median/max column and the scalar figures, as 'median (min-max)'."""
    if not rows:
        return "(no rows)\n"
    labels = [k for k in ("part", *LABEL_KEYS) if any(k in r for r in rows)]
    figures = []
    for r in rows:
        for k, v in r.items():
            if k not in labels and k not in figures and (_is_spread(v) or isinstance(v, (int, float))) \
                    and not isinstance(v, bool) and k not in ("dims", "hw", "bytes"):
                figures.append(k)
    header = labels + figures
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in header) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs of every script")
    parser.add_argument("--checkpoint", help="passed to bench_inference.py (bf16 against fp32 PSNR)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--collect", nargs="+", type=Path, metavar="JSON",
                        help="do not run anything: merge these scripts' JSON files into the device's JSON and table")
    pub_mod.add_argument(parser)
    args = parser.parse_args(argv)
    env = common.environment()
    out_dir = args.out or common.RESULTS
    results, failed = {}, []
    for path in args.collect or []:  # <date>-<device>-<name>.json
        doc = json.loads(path.read_text())
        slug = doc.get("environment", {}).get("device_slug", "cpu")
        results[path.stem.split(f"-{slug}-", 1)[-1]] = doc
    with tempfile.TemporaryDirectory(prefix="lfpv_bench_") as tmp:
        for name, quick_args in ({} if args.collect else SCRIPTS).items():
            print(f"== {name}", flush=True)
            json_path = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / name), "--out", str(json_path)] + (quick_args if args.quick else [])
            if args.published:
                cmd += ["--published", args.published]
            if name == "bench_inference.py" and args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
                if args.quick:
                    cmd[cmd.index("frame,memory")] = "frame,memory,precision"
            if subprocess.run(cmd, check=False).returncode != 0 or not json_path.is_file():
                failed.append(name)
                continue
            results[name.removesuffix(".py")] = json.loads(json_path.read_text())
    env["loadavg_end"] = list(os.getloadavg())
    stem = f"{datetime.date.today()}-{env['device_slug']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "quick": args.quick,
                                                      "failed": failed, "benchmarks": results}, indent=1) + "\n")
    md = [f"# Benchmarks on {env['device']}, {env['date']}", "",
          f"torch {env['torch']}, Triton {env['triton']}, DALI {env['dali']}, Python {env['python']}; "
          f"load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end"
          f" ({env['cpu_count']} cores). Command: `{env['command']}`.",
          "Baselines: " + ("runs collected from separate commands, see each section's command" if args.collect else
                           f"the published code at {args.published}" if args.published else pub_mod.REFERENCE_LABEL)
          + ".",
          "Times are median (min-max) of >= 5 repetitions after warm-up; see each script's docstring.", ""]
    for name, doc in results.items():
        run_env = doc.get("environment", {})
        md += [f"## {name}", "", f"`{run_env.get('command', '?')}` at {run_env.get('date', '?')}, load average "
               f"{run_env.get('loadavg_start', ['?'])[0]} at start; baseline: "
               f"{doc.get('published') or pub_mod.REFERENCE_LABEL}", "", markdown_table(rows_of(doc))]
    if failed:
        md += [f"Failed: {', '.join(failed)}", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
