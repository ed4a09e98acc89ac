"""What every benchmark shares: the one timing helper, the machine and versions, the results files.

Timing rules (all benchmarks): warm-up runs first, then at least MIN_REPS timed repetitions; a row
reports min / median / max seconds. Rows that are compared run interleaved (round r times every
row once) so that a load change on a shared machine hits all of them alike; `os.getloadavg()` is
recorded before and after. On CUDA a repetition is timed with events around the call; on the CPU
with perf_counter.

Scripts import this as `common` (they run as `python bench/<script>.py`, so bench/ is on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MIN_REPS = 5
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Seconds of the timed repetitions of one row."""

    seconds: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    def summary(self, scale: float = 1.0) -> dict:
        """min/median/max (times `scale`, e.g. 1e3 for ms) and the repetition count."""
        return {"min": self.min * scale, "median": self.median * scale, "max": self.max * scale,
                "reps": len(self.seconds)}

    def rate(self, amount: float) -> dict:
        """amount per second at the fastest, median and slowest repetition (note: min rate is at max time)."""
        return {"min": amount / self.max, "median": amount / self.median, "max": amount / self.min,
                "reps": len(self.seconds)}


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: dict[str, Callable[[], object]], reps: int = MIN_REPS, warmup: int = 1,
              device: torch.device | str = "cpu") -> dict[str, Timing]:
    """Time every row `reps` times after `warmup` untimed runs each, interleaved: round by round.

    reps below MIN_REPS is raised to MIN_REPS: no row reports fewer.
    """
    device = torch.device(device)
    reps = max(reps, MIN_REPS)
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    sync(device)
    timings = {name: Timing() for name in rows}
    for _ in range(reps):
        for name, fn in rows.items():
            timings[name].seconds.append(_time_once(fn, device))
    return timings


def time_fn(fn: Callable[[], object], reps: int = MIN_REPS, warmup: int = 1,
            device: torch.device | str = "cpu") -> Timing:
    """One row: `time_rows` with a single entry."""
    return time_rows({"row": fn}, reps, warmup, device)["row"]


def device_label(device: torch.device | str | None = None) -> str:
    """The device in words: the GPU's name, or the CPU model and core count."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def device_slug(device: torch.device | str | None = None) -> str:
    """File-name form of the device: the GPU's name, or 'cpu'."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
    except Exception:  # not installed, or broken on this platform
        return None
    return getattr(mod, "__version__", None)


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, device and machine state, recorded with every result."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_label(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "command": " ".join(["python", *sys.argv]),
    }


def finish(doc: dict, name: str, out: str | Path | None) -> Path:
    """Add the end-of-run load average and write the JSON (default bench/results/<date>-<device>-<name>.json)."""
    doc.setdefault("environment", environment())
    doc["environment"]["loadavg_end"] = list(os.getloadavg())
    path = Path(out) if out else RESULTS / f"{datetime.date.today()}-{doc['environment']['device_slug']}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    print(f"wrote {path}")
    return path


def _jsonable(obj):
    if isinstance(obj, Timing):
        return obj.summary()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def fmt_spread(summary: dict, spec: str = ".2f") -> str:
    """'median (min-max)' of a min/median/max dict."""
    return f"{summary['median']:{spec}} ({summary['min']:{spec}}-{summary['max']:{spec}})"


def machine_note(env: dict) -> str:
    """One line on the machine's load during a run."""
    start, end = env.get("loadavg_start"), env.get("loadavg_end")
    load = f"load average {start[0]:.1f} at start" + (f", {end[0]:.1f} at end" if end else "") if start else ""
    return f"{env['device']}; torch {env['torch']}, triton {env['triton']}, DALI {env['dali']}; {load}"


def status_mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes: what new allocations can use now without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM: peak resident, VmRSS: resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")
