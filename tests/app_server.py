"""Run `python -m lfpv_fast.app` in a subprocess on a free port with a small random model (for the app tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


@dataclass
class AppServer:
    url: str
    log: Path
    checkpoint: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def app_server(folder: Path, *extra_args: str) -> Iterator[AppServer]:
    """The app serving a tiny random model from `folder`; its stdout and stderr go to folder/server.log."""
    checkpoint = write_tiny_checkpoint(folder / "runs" / "tiny" / "final_weights.pth")
    port = free_port()
    log = folder / "server.log"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(folder / "gradio"), PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lfpv_fast.app", "--checkpoint", str(checkpoint), "--port", str(port),
             "--device", "cpu", *extra_args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = AppServer(url=f"http://127.0.0.1:{port}/", log=log, checkpoint=checkpoint, process=process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with {process.returncode}:\n{server.log_text()}")
            try:
                with urllib.request.urlopen(server.url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not answer within {START_TIMEOUT_S} s:\n{server.log_text()}")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
