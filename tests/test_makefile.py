"""The Makefile's two virtual environments: `make demo` installs the core and [demo] only (no triton, DALI,
gradio or selenium, nor through torch: the CPU build), `make test` installs [dev]. Read from `make -n -B`
(what make would run on a fresh clone), with each `pip install -e '.[extras]'` expanded through pyproject.toml."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = {"triton", "nvidia-dali-cuda120", "gradio", "gradio_client", "selenium"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()


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


def dry_run(target: str) -> list[list[str]]:
    """The commands `make TARGET` runs on a fresh clone (-B: every target out of date), split into words."""
    done = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), target], capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip() and not line.startswith("make")]


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


def test_make_demo_installs_the_core_and_demo_only_in_its_own_venv():
    commands = dry_run("demo")
    installs = pip_installs(commands)
    assert {venv for venv, _ in installs} == {".venv-demo"}, installs  # not the test venv
    editable = [args for _, args in installs if "-e" in args]
    assert editable == [["-e", ".[demo]"]]
    torch_args = next(args for _, args in installs if any(a.startswith("torch") for a in args))
    assert torch_args[-2:] == ["--index-url", CPU_INDEX]  # the CPU build: PyPI's Linux wheel brings triton
    packages = installed_packages(installs)
    assert "scikit-image" in packages and "torch" in packages
    assert not packages & HEAVY, packages & HEAVY
    assert commands[-1] == [".venv-demo/bin/python", "-m", "lfpv_fast.train"]


def test_make_test_installs_dev_everything():
    installs = pip_installs(dry_run("test"))
    assert {venv for venv, _ in installs} == {".venv"}
    assert [args for _, args in installs if "-e" in args] == [["-e", ".[dev]"]]
    assert HEAVY <= installed_packages(installs)
