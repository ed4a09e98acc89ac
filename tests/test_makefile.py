"""The Makefile's two virtual environments: `make demo` installs the core and [demo] only (no triton, DALI,
gradio or selenium, nor through torch: the CPU build), `make test` installs [dev]. Read from `make -n -B`
(what make would run on a fresh clone), with each `pip install -e '.[extras]'` expanded through pyproject.toml.
Where PyTorch's CPU wheel index cannot be reached, `make demo` says so and takes pip's default index at once
(bench/torch_index.py); a local server stands for a reachable index."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import requirement_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = {"triton", "nvidia-dali-cuda120", "gradio", "gradio_client", "selenium"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def project_packages(extras: list[str]) -> set[str]:
    """Every package the project's core and `extras` name, following `lfpv_fast[...]` into other extras."""
    names = {requirement_name(r) for r in PROJECT["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in PROJECT["optional-dependencies"][extra]:
            if requirement_name(req) == "lfpv_fast":
                todo += [e.strip() for e in re.search(r"\[(.*)\]", req).group(1).split(",")]
            else:
                names.add(requirement_name(req))
    return names


# Without the MAKEFLAGS of an enclosing `make test`, whose child makes would say where they are.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}


def make_dry_run(target: str, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "-B", "-C", str(ROOT), target, *variables], env=MAKE_ENV,
                          capture_output=True, text=True, check=True, timeout=60)


def dry_run_commands(target: str, *variables: str) -> list[list[str]]:
    """The commands `make TARGET` runs on a fresh clone (-B: every target out of date), split into words."""
    done = make_dry_run(target, *variables)
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip() and not line.startswith("make")]


class _TorchIndex(http.server.BaseHTTPRequestHandler):
    """Answers every page with an empty project page, as an index that has torch does."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        body = b"<!DOCTYPE html><html><body></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def reachable_index() -> Iterator[str]:
    """The URL of a torch index on this machine that answers (a local stand-in for PyTorch's CPU index)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TorchIndex)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_install(installs: list[tuple[str, list[str]]]) -> list[str]:
    return next(args for _, args in installs if any(a.startswith("torch") for a in args))


def pip_installs(commands: list[list[str]]) -> list[tuple[str, list[str]]]:
    """(the pip's venv folder, the arguments) of each `<venv>/bin/pip install ...`."""
    return [(Path(c[0]).parent.parent.name, c[2:]) for c in commands
            if len(c) > 2 and Path(c[0]).name == "pip" and c[1] == "install"]


def installed_packages(installs: list[tuple[str, list[str]]]) -> set[str]:
    names: set[str] = set()
    for _, args in installs:
        for arg in args:
            if arg.startswith(".["):
                names |= project_packages(arg[2:-1].split(","))
            elif arg == ".":
                names |= project_packages([])
            elif not arg.startswith("-") and arg != CPU_INDEX and not arg.startswith("http"):
                names.add(requirement_name(arg))
    return names


def test_make_demo_installs_the_core_and_demo_only_in_its_own_venv(reachable_index):
    # The index make demo installs torch from is PyTorch's CPU index unless told otherwise ...
    printed = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval", "print-index: ; @echo $(DEMO_TORCH_INDEX)",
                              "print-index"], env=MAKE_ENV, capture_output=True, text=True, check=True, timeout=60)
    assert printed.stdout.strip() == CPU_INDEX
    # ... which this machine may not reach: a local server stands for it.
    commands = dry_run_commands("demo", f"DEMO_TORCH_INDEX={reachable_index}")
    installs = pip_installs(commands)
    assert {venv for venv, _ in installs} == {".venv-demo"}, installs  # not the test venv
    editable = [args for _, args in installs if "-e" in args]
    assert editable == [["-e", ".[demo]"]]
    torch_args = torch_install(installs)
    assert torch_args[-2:] == ["--index-url", reachable_index]  # the CPU build: PyPI's Linux wheel brings triton
    packages = installed_packages(installs)
    assert "scikit-image" in packages and "torch" in packages
    assert not packages & HEAVY, packages & HEAVY
    assert commands[-1] == [".venv-demo/bin/python", "-m", "lfpv_fast.train"]


def test_make_test_installs_dev_everything():
    commands = dry_run_commands("test")
    installs = pip_installs(commands)
    assert {venv for venv, _ in installs} == {".venv"}
    assert [args for _, args in installs if "-e" in args] == [["--no-compile", "-e", ".[dev]"]]
    assert HEAVY <= installed_packages(installs)
    # pip compiles nothing (one core); compileall compiles the whole venv on every core once the venv's packages
    # are in, before any test imports them (where PYTHONDONTWRITEBYTECODE is set, a module without bytecode
    # would be compiled again by every process that imports it).
    venv_installs = [i for i, c in enumerate(commands) if c[:2] == [".venv/bin/pip", "install"] and "--target" not in c]
    assert all("--no-compile" in commands[i] for i in venv_installs if "--upgrade" not in commands[i])
    compiles = [i for i, c in enumerate(commands) if c[:4] == [".venv/bin/python", "-m", "compileall", "-q"]]
    assert len(compiles) == 1 and compiles[0] > max(venv_installs), commands
    assert commands[compiles[0]][4:7] == ["-j", "0", ".venv/lib"]
    assert compiles[0] < next(i for i, c in enumerate(commands) if "pytest" in c)


def test_make_demo_takes_the_default_index_at_once_where_the_torch_index_cannot_be_reached():
    unreachable = f"http://127.0.0.1:{closed_port()}/whl/cpu"
    done = make_dry_run("demo", f"DEMO_TORCH_INDEX={unreachable}")
    said = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith(f"make demo: cannot reach the torch index {unreachable} ("), said
    assert "installing torch from pip's default index instead" in said[0]
    installs = pip_installs([shlex.split(line) for line in done.stdout.splitlines() if line.strip()])
    torch_args = torch_install(installs)
    assert len(torch_args) == 1 and torch_args[0].startswith("torch=="), torch_args  # no --index-url
    # An empty DEMO_TORCH_INDEX asks for pip's default index: nothing is probed, nothing said.
    done = make_dry_run("demo", "DEMO_TORCH_INDEX=")
    assert done.stderr.strip() == ""
    assert len(torch_install(pip_installs([shlex.split(line) for line in done.stdout.splitlines()]))) == 1


def test_the_index_probe_waits_no_longer_than_its_timeout():
    """An index that accepts the connection and never answers is given up after the probe's timeout."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import torch_index
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert torch_index.TIMEOUT_S <= 5
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        reason = torch_index.unreachable_reason(f"http://127.0.0.1:{silent.getsockname()[1]}/whl/cpu", timeout_s=0.5)
    assert reason is not None and "timed out" in reason, reason
