"""The folders import downwards only: kernels/ (installed as lfpv_fast.kernels) imports nothing from
lfpv_fast above it, so the kernels, their tests and their tools can be read, built and moved on their own;
the package and the tools (bench/) import the kernels, never the other way round. Checked on the source
(every import statement, module level or inside a function), without importing anything."""

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
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
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


# pipelines/ still reads the data layer and the config (issue 26, item 1 moves these): the list may only
# shrink. A new import from lfpv_fast into pipelines/ fails here.
PIPELINES_IMPORTS_TO_MOVE = {
    "pipelines/__init__.py": {"lfpv_fast.config", "lfpv_fast.data.source"},
    "pipelines/dali.py": {"lfpv_fast.data.errors", "lfpv_fast.data.source"},
    "pipelines/loader.py": {"lfpv_fast.data.errors", "lfpv_fast.data.source"},
    "pipelines/torch_loader.py": {"lfpv_fast.data.errors", "lfpv_fast.data.smid", "lfpv_fast.data.source",
                                  "lfpv_fast.io.imageio"},
}


def test_pipelines_import_nothing_new_above_them():
    found = imports_above("pipelines", "lfpv_fast.pipelines")
    for path, names in found.items():
        extra = names - PIPELINES_IMPORTS_TO_MOVE.get(path, set())
        assert not extra, f"{path} imports {sorted(extra)} from lfpv_fast: pipelines/ must not import above it"


def test_the_data_layer_imports_only_the_io_room_above_it():
    """lfpv_fast/data/ reads files through lfpv_fast.io and imports nothing else of the package: the run config
    (lfpv_fast/config.py) imports the data section (lfpv_fast/data/config.py), never the reverse, so that the table
    of dataset kinds can hold the data layer's resolvers without an import loop."""
    found = imports_above("lfpv_fast/data", "lfpv_fast.data")
    for path, names in found.items():
        assert all(n.startswith("lfpv_fast.io.") for n in names), f"{path} imports {sorted(names)}"


@pytest.mark.parametrize("source, expected", [
    ("import lfpv_fast.model", {"lfpv_fast.model"}),
    ("def f():\n    from lfpv_fast import reference", {"lfpv_fast", "lfpv_fast.reference"}),
    ("from lfpv_fast.kernels._common import launch", set()),
    ("import torch", set()),
])
def test_the_check_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / "k.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports_above("kernels", "lfpv_fast.kernels") == ({"kernels/k.py": expected} if expected else {})
