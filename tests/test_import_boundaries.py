"""The folders import downwards only: kernels/ and pipelines/ (installed as lfpv_fast.kernels and
lfpv_fast.pipelines) import nothing from lfpv_fast above them, so the kernels, the data loaders, their tests and
their tools can be read, built and moved on their own; the package and the tools (bench/) import them, never the
other way round. Checked on the source (every import statement, module level or inside a function), without
importing anything."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_above(folder: str, own_package: str) -> dict[str, set[str]]:
    """Per file under `folder`, the lfpv_fast modules it imports that are not inside `own_package`."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for guard in ast.walk(tree):  # imports under `if TYPE_CHECKING:` are for annotations: never run
            if isinstance(guard, ast.If) and ast.unparse(guard.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                guard.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"  # (the package-dir map needs absolute ones)
                names.add(node.module or "")
                if node.module == "lfpv_fast":  # `from lfpv_fast import x`: x may be a module
                    names |= {f"lfpv_fast.{alias.name}" for alias in node.names}
        above = {n for n in names if (n == "lfpv_fast" or n.startswith("lfpv_fast."))
                 and n != own_package and not n.startswith(own_package + ".")}
        if above:
            found[str(path.relative_to(ROOT))] = above
    return found


def test_kernels_import_nothing_above_them():
    assert imports_above("kernels", "lfpv_fast.kernels") == {}


def test_pipelines_import_nothing_above_them():
    # The loaders take plain inputs (a pair list, a reader, sizes); lfpv_fast.data.loaders turns a RunConfig
    # into one of them.
    assert imports_above("pipelines", "lfpv_fast.pipelines") == {}


def test_the_data_layer_imports_only_the_io_room_and_the_loaders_above_it():
    """lfpv_fast/data/ reads files through lfpv_fast.io, builds loaders from pipelines/ (which imports nothing of the
    package) and imports nothing else of the package: the run config (lfpv_fast/config.py) imports the data section
    (lfpv_fast/data/config.py), never the reverse, so that the table of dataset kinds can hold the data layer's
    resolvers without an import loop."""
    found = imports_above("lfpv_fast/data", "lfpv_fast.data")
    for path, names in found.items():
        allowed = [n == "lfpv_fast.pipelines" or n.startswith(("lfpv_fast.io.", "lfpv_fast.pipelines.")) for n in names]
        assert all(allowed), f"{path} imports {sorted(names)}"


@pytest.mark.parametrize("source, expected", [
    ("import lfpv_fast.model", {"lfpv_fast.model"}),
    ("def f():\n    from lfpv_fast import reference", {"lfpv_fast", "lfpv_fast.reference"}),
    ("from lfpv_fast.kernels._common import launch", set()),
    ("import torch", set()),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lfpv_fast.config import RunConfig", set()),
])
def test_the_check_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / "k.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports_above("kernels", "lfpv_fast.kernels") == ({"kernels/k.py": expected} if expected else {})
