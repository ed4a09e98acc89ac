"""Whole photos through Retinexformer on the CPU: the exact strip path against the untiled forward.

For each size (default 1 megapixel; --megapixels 1 12 24) and each path ("strips" with --rows rows per strip,
"untiled" = net(x)), a fresh subprocess builds the published configuration (n_feat 40, stage 1, num_blocks
[1, 2, 2]; random weights, seed 0: memory and time do not depend on the values), runs it once on a fixed
random image in [0, 0.3] (float32, batch 1) without gradients and reports the seconds, the peak RSS above the
RSS before the call (VmHWM of /proc/self/status), and estimate_retinexformer_peak_bytes. The untiled row is
skipped where its estimate exceeds --untiled-limit-gib (the row says so, with the estimate). The max absolute
difference between the two outputs is computed where both ran. One run per row (a whole photo is minutes at
24 MP): the load average before and after is recorded.

--low-memory runs the strip path with low_memory (the level-2 illumination recomputed, not kept).
--enhance-cli SIZE_MP instead runs the user's command on a photo of that size: it writes a published-format
Retinexformer checkpoint (the published configuration, random weights) and a PNG photo, runs
`python -m lfpv_fast.enhance --device cpu --max-memory M` on them in a child process and reports its wall time,
the whole process's peak RSS (ru_maxrss: interpreter, weights, decoding, the network, encoding the PNG), the plan
it chose and, where the untiled forward fits (--untiled-limit-gib), the max difference from net(x) on the same
decoded input.

    python bench/bench_retinexformer_whole.py [--megapixels 1] [--rows 64] [--low-memory] [--out FILE]
    python bench/bench_retinexformer_whole.py --enhance-cli 24 [--max-memory 6G]
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
import numpy as np
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
    low_memory = bool(spec.get("low_memory")) and rows is not None
    estimate = estimate_retinexformer_peak_bytes(CONFIG["n_feat"], CONFIG["num_blocks"], 1, height, width, 4,
                                                 rows=rows, low_memory=low_memory)
    before = common.status_bytes("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = retinexformer_whole_image_forward(net, x, rows, low_memory=low_memory) if rows else net(x)
    seconds = time.perf_counter() - t0
    peak = common.status_bytes("VmHWM")
    torch.save(out, spec["save"])
    return {**{k: v for k, v in spec.items() if k != "save"}, "seconds": seconds,
            "peak_rss_above_start_bytes": peak - before, "estimate_bytes": estimate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=int, nargs="+", default=[1], choices=sorted(SIZES_MP))
    parser.add_argument("--rows", type=int, default=64, help="rows per strip (multiple of 4)")
    parser.add_argument("--low-memory", action="store_true", help="strips with low_memory")
    available_gib = round(0.8 * common.status_mem_available() / 2**30, 1)
    parser.add_argument("--untiled-limit-gib", type=float, default=available_gib,
                        help="skip the untiled forward where its estimate exceeds this (default: 80%% of MemAvailable)")
    parser.add_argument("--enhance-cli", type=int, default=None, choices=sorted(SIZES_MP), metavar="MP",
                        help="run python -m lfpv_fast.enhance on a photo of this many megapixels instead")
    parser.add_argument("--max-memory", default="6G", help="--max-memory given to enhance (with --enhance-cli)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: bench/results/DATE-cpu-retinexformer-whole.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    if args.enhance_cli is not None:
        return enhance_cli(args)
    load_before = os.getloadavg()
    rows_out = []
    print(f"{'MP':>3} {'size':>10} {'path':>14} {'s':>8} {'peak GiB':>9} {'estimate':>9} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.megapixels:
            height, width = SIZES_MP[mp]
            outputs = {}
            for path in ("strips", "untiled"):
                spec = {"megapixels": mp, "hw": [height, width], "path": path, "rows": args.rows,
                        "low_memory": args.low_memory and path == "strips", "save": str(Path(tmp) / f"{mp}-{path}.pt")}
                label = (f"strips/{args.rows}{' low' if args.low_memory else ''}" if path == "strips"
                         else "untiled")
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
           "low_memory": args.low_memory,
           "environment": common.environment("cpu"), "load_before": load_before, "load_after": os.getloadavg(),
           "rows": rows_out}
    common.finish(doc, "retinexformer-whole", args.out)
    return 0


def write_photo(path: Path, height: int, width: int) -> None:
    """A dark 8-bit RGB photo-like PNG: smooth gradients plus noise, values below 80 (built in row blocks: a
    float copy of a whole 24 MP photo would be 288 MB)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    color = np.array([1.0, 0.8, 0.6], np.float32)
    xs = np.linspace(0, 15, width, dtype=np.float32)[None, :, None]
    image = np.empty((height, width, 3), np.uint8)
    for a in range(0, height, 500):
        b = min(a + 500, height)
        ys = np.linspace(a / height, b / height, b - a, endpoint=False, dtype=np.float32)[:, None, None]
        block = 20 + 40 * ys * color + xs + rng.normal(0, 4, (b - a, width, 3)).astype(np.float32)
        image[a:b] = np.clip(block, 0, 79).astype(np.uint8)
    Image.fromarray(image).save(path, compress_level=1)


def enhance_cli(args: argparse.Namespace) -> int:
    """python -m lfpv_fast.enhance on a photo of --enhance-cli megapixels: its time and the process's peak RSS."""
    from lfpv_fast.io.imageio import read_image
    from lfpv_fast.models.retinexformer import save_published_checkpoint

    mp = args.enhance_cli
    height, width = SIZES_MP[mp]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        checkpoint = tmp / "retinexformer_published.pth"
        save_published_checkpoint(RetinexFormer(**CONFIG), checkpoint)
        photo = tmp / f"photo_{mp}mp.png"
        write_photo(photo, height, width)
        command = [sys.executable, "-m", "lfpv_fast.enhance", str(photo), "--checkpoint", str(checkpoint),
                   "-o", str(tmp / "out"), "--device", "cpu", "--max-memory", args.max_memory]
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        print(output.strip())
        row = {"megapixels": mp, "hw": [height, width], "command": " ".join(
            ["python", "-m", "lfpv_fast.enhance", "PHOTO.png", "--checkpoint", "PUBLISHED.pth", "-o", "OUT",
             "--device", "cpu", "--max-memory", args.max_memory]), "exit_code": code, "seconds": seconds,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "output": output.strip().splitlines()[-6:]}
        outputs = sorted((tmp / "out").glob("*.png"))
        if code == 0 and outputs:
            estimate = estimate_retinexformer_peak_bytes(CONFIG["n_feat"], CONFIG["num_blocks"], 1, height, width, 4)
            row["untiled_estimate_bytes"] = estimate
            if estimate <= args.untiled_limit_gib * 2**30:
                net = RetinexFormer(**CONFIG).eval()
                net.load_published_state_dict(torch.load(checkpoint, weights_only=True)["params"])
                x = torch.from_numpy(read_image(photo).rgb.transpose(2, 0, 1).copy())[None]
                with torch.no_grad():
                    expected = (net(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
                got = read_image(outputs[0]).rgb * 255
                row["max_abs_diff_vs_untiled_8bit"] = float(np.abs(got.round() - expected).max())
            else:
                row["untiled"] = f"not run: estimate {estimate / 2**30:.1f} GiB > {args.untiled_limit_gib} GiB"
    print(f"{mp} MP enhance: exit {code}, {seconds:.1f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")
    doc = {"benchmark": "retinexformer_whole_enhance_cli", "config": CONFIG,
           "environment": common.environment("cpu"), "load_before": load_before, "load_after": os.getloadavg(),
           "rows": [row]}
    common.finish(doc, f"retinexformer-enhance-{mp}mp", args.out)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
