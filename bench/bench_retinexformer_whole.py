"""Whole photos through Retinexformer on the CPU: the exact strip path against the untiled forward.

For each size (default 1 megapixel; --megapixels 1 12 24) and each path ("strips" with --rows rows per strip,
"untiled" = net(x)), a fresh subprocess builds the published configuration (n_feat 40, stage 1, num_blocks
[1, 2, 2]; random weights, seed 0: memory and time do not depend on the values), runs it once on a fixed
random image in [0, 0.3] (float32, batch 1) without gradients and reports the seconds, the peak RSS above the
RSS before the call (VmHWM of /proc/self/status), and estimate_retinexformer_peak_bytes. The untiled row is
skipped where its estimate exceeds --untiled-limit-gib (the row says so, with the estimate). The max absolute
difference between the two outputs is computed where both ran. One run per row (a whole photo is minutes at
24 MP): the load average before and after is recorded.

    python bench/bench_retinexformer_whole.py [--megapixels 1] [--rows 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from lfpv_fast.inference.retinexformer_strips import (
    estimate_retinexformer_peak_bytes,
    retinexformer_whole_image_forward,
)
from lfpv_fast.models import RetinexFormer

SIZES_MP = {1: (864, 1152), 4: (1728, 2304), 12: (3000, 4000), 24: (4000, 6000)}  # (height, width), 3:4
CONFIG = {"n_feat": 40, "stage": 1, "num_blocks": [1, 2, 2]}



def child(spec: dict) -> dict:
    """In a fresh process: one forward of one path, its seconds and peak RSS above the start."""
    torch.manual_seed(0)
    net = RetinexFormer(**CONFIG).eval()
    height, width = spec["hw"]
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1)) * 0.3
    rows = spec["rows"] if spec["path"] == "strips" else None
    estimate = estimate_retinexformer_peak_bytes(CONFIG["n_feat"], CONFIG["num_blocks"], 1, height, width, 4,
                                                 rows=rows)
    before = common.status_bytes("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = retinexformer_whole_image_forward(net, x, rows) if rows else net(x)
    seconds = time.perf_counter() - t0
    peak = common.status_bytes("VmHWM")
    torch.save(out, spec["save"])
    return {**{k: v for k, v in spec.items() if k != "save"}, "seconds": seconds,
            "peak_rss_above_start_bytes": peak - before, "estimate_bytes": estimate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=int, nargs="+", default=[1], choices=sorted(SIZES_MP))
    parser.add_argument("--rows", type=int, default=64, help="rows per strip (multiple of 4)")
    parser.add_argument("--untiled-limit-gib", type=float, default=48.0,
                        help="skip the untiled forward where its estimate exceeds this")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: bench/results/DATE-cpu-retinexformer-whole.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    load_before = os.getloadavg()
    rows_out = []
    print(f"{'MP':>3} {'size':>10} {'path':>14} {'s':>8} {'peak GiB':>9} {'estimate':>9} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.megapixels:
            height, width = SIZES_MP[mp]
            outputs = {}
            for path in ("strips", "untiled"):
                spec = {"megapixels": mp, "hw": [height, width], "path": path, "rows": args.rows,
                        "save": str(Path(tmp) / f"{mp}-{path}.pt")}
                label = f"strips/{args.rows}" if path == "strips" else "untiled"
                if path == "untiled":
                    estimate = estimate_retinexformer_peak_bytes(CONFIG["n_feat"], CONFIG["num_blocks"], 1, height,
                                                                 width, 4)
                    if estimate > args.untiled_limit_gib * 2**30:
                        row = {**spec, "skipped": f"estimate {estimate / 2**30:.1f} GiB > --untiled-limit-gib "
                                                  f"{args.untiled_limit_gib}", "estimate_bytes": estimate}
                        row.pop("save")
                        rows_out.append(row)
                        print(f"{mp:>3} {f'{width}x{height}':>10} {label:>14} skipped: {row['skipped']}")
                        continue
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
                    rows_out.append({"megapixels": mp, "hw": [height, width], "path": path, "failed": tail})
                    print(f"{mp:>3} {f'{width}x{height}':>10} {label:>14} failed: {tail}")
                    continue
                row = json.loads(lines[-1])
                outputs[path] = torch.load(spec["save"], weights_only=True)
                if len(outputs) == 2:
                    row["max_abs_diff_vs_untiled"] = float((outputs["strips"] - outputs["untiled"]).abs().max())
                rows_out.append(row)
                diff = f"{row['max_abs_diff_vs_untiled']:.2e}" if "max_abs_diff_vs_untiled" in row else "-"
                print(f"{mp:>3} {f'{width}x{height}':>10} {label:>14} {row['seconds']:>8.1f} "
                      f"{row['peak_rss_above_start_bytes'] / 2**30:>9.2f} {row['estimate_bytes'] / 2**30:>9.2f} "
                      f"{diff:>11}")
    doc = {"benchmark": "retinexformer_whole", "config": CONFIG, "rows_per_strip": args.rows,
           "environment": common.environment("cpu"), "load_before": load_before, "load_after": os.getloadavg(),
           "rows": rows_out}
    common.finish(doc, "retinexformer-whole", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
