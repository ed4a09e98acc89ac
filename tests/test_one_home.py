"""Each decision of issue 26's list is made in one file: checked on the source (AST, nothing imported).

- a run folder's file names: only lfpv_fast/training/run_folder.py spells them;
- the published formats: their key names only in their backbone module (lfpv_fast/models/snr_aware.py,
  lfpv_fast/models/retinexformer.py), DataParallel's `module.` prefix only in lfpv_fast/models/backbone.py;
- backends: TRITON_INTERPRET read only in kernels/runtime.py; nothing outside kernels/ imports a private
  kernels module or looks one up in sys.modules; only lfpv_fast/ops/backends.py asks kernels.runtime whether
  Triton takes CPU tensors (the rest asks resolve_backend);
- tests: a helper is defined once (tests/helpers.py, a conftest, or one test module).

Each finding is `file:line: what`; every check is shown to fail on a violation planted in a temporary tree.
Strings in docstrings do not count (they describe, they decide nothing); strings in code and messages do.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("lfpv_fast", "kernels", "pipelines")  # the package's source (kernels/, pipelines/ install into it)


def python_files(root: Path, folders: tuple[str, ...]) -> list[Path]:
    return sorted(p for folder in folders if (root / folder).is_dir() for p in (root / folder).rglob("*.py"))


def code_strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string in code: plain strings, and f-strings as written (`f'step_{n:08d}.pth'`, so
    that a pattern sees the literal parts and the format together); docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    inside_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                       for part in ast.walk(node) if part is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and id(node) not in inside_fstrings:
            yield node.lineno, ast.unparse(node)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in inside_fstrings):
            yield node.lineno, node.value


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) of every import; `from package import name` also gives package.name (it may be a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


@dataclass(frozen=True)
class Rule:
    """One decision: where it lives, and how a second spelling of it is found in one file's AST."""

    name: str
    home: str  # what the message says the one place is
    folders: tuple[str, ...]
    allowed: tuple[str, ...]  # files (relative to the root) that may spell it
    find: Callable[[ast.AST], Iterator[tuple[int, str]]] = field(repr=False)

    def violations(self, root: Path) -> list[str]:
        found = []
        for path in python_files(root, self.folders):
            relative = path.relative_to(root).as_posix()
            if relative in self.allowed:
                continue
            for line, what in self.find(ast.parse(path.read_text(), filename=str(path))):
                found.append(f"{relative}:{line}: {what} ({self.name}: only in {self.home})")
        return found


def strings_matching(pattern: str) -> Callable[[ast.AST], Iterator[tuple[int, str]]]:
    regex = re.compile(pattern)

    def find(tree: ast.AST) -> Iterator[tuple[int, str]]:
        for line, text in code_strings(tree):
            if regex.search(text):
                yield line, f"spells {text!r}"
    return find


def private_kernel_lookups(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Imports of a private kernels module (lfpv_fast.kernels._name), and sys.modules lookups naming kernels."""
    for line, module in imported_modules(tree):
        if re.match(r"lfpv_fast\.kernels\._", module):
            yield line, f"imports the private {module}"
    for node in ast.walk(tree):
        looked_up = None
        if isinstance(node, ast.Subscript):
            looked_up = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            looked_up = node.func.value
        is_sys_modules = (isinstance(looked_up, ast.Attribute) and looked_up.attr == "modules"
                          and isinstance(looked_up.value, ast.Name) and looked_up.value.id == "sys")
        if is_sys_modules and "kernels" in ast.unparse(node):
            yield node.lineno, f"looks a kernels module up in sys.modules: {ast.unparse(node)}"


CPU_RULE_NAMES = {"interpreting", "takes_cpu_tensors", "triton_interpreting", "triton_takes_cpu_tensors"}


def asks_where_kernels_run(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Uses of the kernels' "where do we run" answers (kernels.runtime, re-exported by backends)."""
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in CPU_RULE_NAMES:
            yield node.lineno, f"applies the Triton-on-CPU rule itself ({name}); ask resolve_backend"
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in CPU_RULE_NAMES:
                    yield node.lineno, f"imports {alias.name}; ask resolve_backend"


RUN_FOLDER = "lfpv_fast/training/run_folder.py"
SNR_AWARE = "lfpv_fast/models/snr_aware.py"
RETINEXFORMER = "lfpv_fast/models/retinexformer.py"
BACKBONE_SEAM = "lfpv_fast/models/backbone.py"
RUNTIME = "kernels/runtime.py"
BACKENDS = "lfpv_fast/ops/backends.py"

RULES = [
    Rule("a run folder's file names", RUN_FOLDER + " (RunFolder and its constants)", PACKAGE, (RUN_FOLDER,),
         strings_matching(r"\b(final_weights|final_original_format|best)\.pth\b|\bstep_(\{|\*|\(|%|\\d|<)"
                          r"|\bmetrics\.jsonl\b|\bval\.jsonl\b|\btrain\.log\b|\bconfig\.yaml\b"
                          r"|^\.(damaged|abandoned|lock)$")),
    Rule("a published format's key names", f"{SNR_AWARE} and {RETINEXFORMER}", PACKAGE, (SNR_AWARE, RETINEXFORMER),
         strings_matching(r"common_feature|conv_first_\d|update_feature|recon_trunk|layer_stack|"
                          r"body\.\d+\.estimator|params_ema")),
    Rule("DataParallel's 'module.' prefix", BACKBONE_SEAM + " (without_data_parallel_prefix)", PACKAGE,
         (BACKBONE_SEAM,), strings_matching(r"^module\.")),
    Rule("reading TRITON_INTERPRET", RUNTIME + " (interpreting)", PACKAGE, (RUNTIME,),
         strings_matching(r"^TRITON_INTERPRET$")),
    Rule("reaching into the kernels' private modules", "kernels/ itself", ("lfpv_fast", "pipelines"), (),
         private_kernel_lookups),
    Rule("whether Triton takes CPU tensors", f"{RUNTIME}, asked by {BACKENDS} (resolve_backend)",
         ("lfpv_fast", "pipelines"), (BACKENDS,), asks_where_kernels_run),
]


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_each_decision_lives_in_one_place(rule: Rule):
    found = rule.violations(ROOT)
    assert not found, "\n".join(found)


# A violation of each rule, planted in a temporary tree: (rule, file, source, line of the violation).
PLANTED = [
    (RULES[0], "lfpv_fast/app.py", "x = 1\nWEIGHTS = 'final_weights.pth'\n", 2),
    (RULES[0], "lfpv_fast/training/trainer.py", "def f(step):\n    return f'step_{step:08d}.pth'\n", 2),
    (RULES[0], "lfpv_fast/training/trainer.py", "import re\nCHECKPOINT = re.compile(r'^step_(\\d+)\\.pth$')\n", 2),
    (RULES[0], "lfpv_fast/training/trainer.py", "def f(p):\n    return p.with_name(p.name + '.damaged')\n", 2),
    (RULES[0], "lfpv_fast/evaluate.py", "def f(run):\n    return run / 'checkpoints' / 'best.pth'\n", 2),
    (RULES[1], "lfpv_fast/training/checkpoint.py", "def f(keys):\n    return 'common_feature' in keys\n", 2),
    (RULES[1], "lfpv_fast/training/checkpoint.py", "def f(k):\n    return k.startswith('body.0.estimator.')\n", 2),
    (RULES[2], "lfpv_fast/models/snr_aware.py", "def f(k):\n    return k.removeprefix('module.')\n", 2),
    (RULES[3], "lfpv_fast/ops/backends.py", "import os\nON = os.environ.get('TRITON_INTERPRET') == '1'\n", 2),
    (RULES[4], "lfpv_fast/ops/backends.py", "import sys\nC = sys.modules['lfpv_fast.kernels._common']\n", 2),
    (RULES[4], "lfpv_fast/ops/backends.py", "import sys\nC = sys.modules.get('lfpv_fast.kernels._common')\n", 2),
    (RULES[4], "lfpv_fast/ops/backends.py", "\nfrom lfpv_fast.kernels import _common\n", 2),
    (RULES[5], "lfpv_fast/training/fast_path.py",
     "from lfpv_fast.ops import backends\n\nok = backends.triton_takes_cpu_tensors()\n", 3),
    (RULES[5], "lfpv_fast/training/fast_path.py", "\nfrom lfpv_fast.kernels.runtime import interpreting\n", 2),
]


@pytest.mark.parametrize("rule, file, source, line", PLANTED,
                         ids=[f"{rule.name}-{k}" for k, (rule, *_) in enumerate(PLANTED)])
def test_each_check_catches_a_planted_violation(tmp_path: Path, rule: Rule, file: str, source: str, line: int):
    (tmp_path / file).parent.mkdir(parents=True)
    (tmp_path / file).write_text(source)
    found = rule.violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{file}:{line}: "), found
    if rule.allowed:  # the same text in the decision's home is no violation
        (tmp_path / file).unlink()
        (tmp_path / rule.allowed[0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rule.allowed[0]).write_text(source)
        assert rule.violations(tmp_path) == []


def test_docstrings_and_other_names_are_no_violation(tmp_path: Path):
    source = ('"""Writes DIR/final_weights.pth and checkpoints/step_<n>.pth; TRITON_INTERPRET=1 interprets."""\n'
              "HELP = 'set TRITON_INTERPRET=1 to interpret'\nKEY = 'train.logging.every'\nNAME = 'SMID.pth'\n")
    (tmp_path / "lfpv_fast").mkdir()
    (tmp_path / "lfpv_fast" / "tool.py").write_text(source)
    assert [found for rule in RULES for found in rule.violations(tmp_path)] == []


# ---------------------------------------------------------------------------------------------
# Tests share their helpers

SHARED_HELPERS = ("tests/helpers.py", "tests/golden.py", "tests/app_server.py")  # imported by test modules


def definitions_under_tests(root: Path) -> dict[str, list[str]]:
    """name -> ['file:line', ...] of every module-level function, class and upper-case constant under tests/
    (test functions and test classes left out: pytest needs their names, and they are never shared)."""
    found: dict[str, list[str]] = {}
    for path in python_files(root, ("tests",)):
        relative = path.relative_to(root).as_posix()
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [] if node.name.startswith(("test_", "Test")) else [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()]
            else:
                names = []
            for name in names:
                found.setdefault(name, []).append(f"{relative}:{node.lineno}")
    return found


# Upper-case names that each test module has its own of, by design: where it is, what it tests.
OWN_CONSTANTS = {"ROOT", "REPO", "BENCH", "README", "DEVICE"}


def duplicated_helpers(root: Path) -> list[str]:
    """A function or class defined in two files under tests/, or a constant defined in a shared helper module and
    again in a test module: one line each, naming every place."""
    problems = []
    for name, places in sorted(definitions_under_tests(root).items()):
        files = [place.rsplit(":", 1)[0] for place in places]
        if len(set(files)) < 2:
            continue
        constant = name.isupper()
        if constant and (name in OWN_CONSTANTS or not any(f in SHARED_HELPERS for f in files)):
            continue
        problems.append(f"{places[0]}: {name} is defined again in {', '.join(places[1:])}: keep one (in "
                        "tests/helpers.py or a conftest fixture) and import it")
    return problems


def test_tests_define_each_helper_once():
    problems = duplicated_helpers(ROOT)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("files, expected", [
    ({"tests/helpers.py": "def write_png(path):\n    pass\n",
      "tests/test_a.py": "import os\n\ndef write_png(p):\n    pass\n"},
     "tests/helpers.py:1: write_png is defined again in tests/test_a.py:3"),
    ({"tests/test_a.py": "def free_port():\n    return 0\n", "tests/test_b.py": "\n\ndef free_port():\n    return 0\n"},
     "tests/test_a.py:1: free_port is defined again in tests/test_b.py:3"),
    ({"tests/helpers.py": "TINY = 1\n", "tests/kernels/test_k.py": "TINY = 2\n"},
     "tests/helpers.py:1: TINY is defined again in tests/kernels/test_k.py:1"),
    ({"tests/conftest.py": "import pytest\n\n@pytest.fixture\ndef demo_root():\n    pass\n",
      "tests/test_a.py": "import pytest\n\n@pytest.fixture\ndef demo_root():\n    pass\n"},
     "tests/conftest.py:4: demo_root is defined again in tests/test_a.py:4"),
    ({"tests/test_a.py": "def test_x():\n    pass\nLOCAL = 1\n",
      "tests/test_b.py": "def test_x():\n    pass\nLOCAL = 2\n"},
     None),
])
def test_the_helper_check_catches_a_planted_copy(tmp_path: Path, files: dict[str, str], expected: str | None):
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    problems = duplicated_helpers(tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(expected), problems
