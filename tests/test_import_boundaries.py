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


def runtime_tree(path: Path) -> ast.Module:
    """The file's syntax tree without the bodies of `if TYPE_CHECKING:` (imports for annotations never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for guard in ast.walk(tree):
        if isinstance(guard, ast.If) and ast.unparse(guard.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            guard.body = [ast.Pass()]
    return tree


def imports_above(folder: str, own_package: str) -> dict[str, set[str]]:
    """Per file under `folder`, the lfpv_fast modules it imports that are not inside `own_package`."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(runtime_tree(path)):
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


# ---------------------------------------------------------------------------------------------
# The rooms, in layers: every import goes to an earlier layer or stays in its own room.

# Lowest first. A module belongs to the layer of the longest prefix that names it (so a module can be placed apart
# from its folder: e.g. ("config", ("lfpv_fast.config", "lfpv_fast.data.config"))). kernels/ and pipelines/ install
# as lfpv_fast.kernels and lfpv_fast.pipelines. Moving a room is moving its line; nothing else here changes.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("lfpv_fast.kernels",)),
    ("pipelines", ("lfpv_fast.pipelines",)),  # plain inputs: nothing of the package above it
    ("ops", ("lfpv_fast.ops",)),
    ("io", ("lfpv_fast.io",)),
    ("models", ("lfpv_fast.models",)),
    ("data", ("lfpv_fast.data",)),  # the data section and the table of datasets: lfpv_fast.config imports them
    ("config", ("lfpv_fast.config",)),
    ("inference", ("lfpv_fast.inference",)),
    ("training", ("lfpv_fast.training",)),
    ("entry points and cli", ("lfpv_fast",)),  # lfpv_fast itself, train, evaluate, enhance, prepare, app, cli, model
]

SOURCE_FOLDERS = {"lfpv_fast": "lfpv_fast", "kernels": "lfpv_fast.kernels", "pipelines": "lfpv_fast.pipelines"}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (kernels/ and pipelines/ under their installed names)."""
    found = {}
    for folder, package in SOURCE_FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest prefix naming `module`; None for a module outside the package."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def upward_imports(root: Path) -> list[str]:
    """`file:line: import M (layer) from layer`, for every import of the package's own modules that goes to a
    later layer than the importing file's."""
    modules = module_names(root)
    problems = []
    for module, path in modules.items():
        own = layer_of(module)
        for node in ast.walk(runtime_tree(path)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from package import name`: the module package.name where it is one, else the package.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            for target in targets:
                layer = layer_of(target)
                if layer is not None and layer > own:
                    problems.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: imports {target} "
                                    f"({LAYERS[layer][0]}), a later layer than its own ({LAYERS[own][0]})")
    return problems


def test_every_import_goes_to_an_earlier_layer_or_its_own_room():
    problems = upward_imports(ROOT)
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer():
    assert all(layer_of(module) is not None for module in module_names(ROOT))


@pytest.mark.parametrize("file, source, expected", [
    ("lfpv_fast/io/files.py", "\n\ndef f():\n    from lfpv_fast.training.checkpoint import load_model\n",
     "lfpv_fast/io/files.py:4: imports lfpv_fast.training.checkpoint (training), a later layer than its own (io)"),
    ("kernels/k.py", "import lfpv_fast.ops.reference\n",
     "kernels/k.py:1: imports lfpv_fast.ops.reference (ops), a later layer than its own (kernels)"),
    ("pipelines/p.py", "from lfpv_fast import cli\n",
     "pipelines/p.py:1: imports lfpv_fast.cli (entry points and cli), a later layer than its own (pipelines)"),
    ("lfpv_fast/models/m.py", "from lfpv_fast.models import snr_aware\nfrom lfpv_fast.ops import backends\n"
     "import torch\n", None),
])
def test_the_layer_check_catches_a_planted_upward_import(tmp_path, file, source, expected):
    for package in ("lfpv_fast", "kernels", "pipelines"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "lfpv_fast" / "cli.py").write_text("")
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(source)
    assert upward_imports(tmp_path) == ([expected] if expected else [])
