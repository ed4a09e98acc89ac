"""The README stays true: every command, flag, make target and config key it names exists, and
every config key is documented in its config reference."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from lfpv_fast.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FILE_SUFFIXES = {"log", "jsonl", "json", "yaml", "pth", "png"}
CLI_MODULES = sorted(set(re.findall(r"python -m (lfpv_fast(?:\.\w+)+)", README)))


def all_config_keys() -> set[str]:
    from lfpv_fast.models import BACKBONES

    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    # The model section's flat keys of the first format (SNR-Aware options and three LFPV keys) stay valid.
    return keys | {f"model.{k}" for k in (*BACKBONES["snr_aware"].legacy_flat_keys, "bank_size", "patch_size",
                                          "updater_width")}


def test_readme_names_the_two_commands():
    assert "make test" in README and "python -m lfpv_fast.train" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_make_targets_named_in_readme_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"make ([\w-]+)", README))
    assert named and named <= targets, named - targets


@pytest.mark.parametrize("module", CLI_MODULES)
def test_cli_modules_and_their_flags_exist(module):
    mod = importlib.import_module(module)
    assert callable(getattr(mod, "main", None)), f"{module} has no main()"
    parser = mod.build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    # Every --flag on a README line that runs this module must be one the module accepts.
    for line in README.splitlines():
        if f"-m {module} " in line or line.rstrip().endswith(f"-m {module}"):
            used = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line.split(f"-m {module}", 1)[1]))
            assert used <= flags, f"{module}: README uses unknown flags {used - flags}"


def test_config_keys_named_in_readme_exist_and_all_are_documented():
    keys = all_config_keys()
    named = set(re.findall(r"`((?:model|data|train|val|logging)\.[a-z0-9_]+)`", README))
    named = {k for k in named if k.rsplit(".", 1)[1] not in FILE_SUFFIXES}  # train.log is a file, not a key
    assert named - keys == set(), f"README names config keys that do not exist: {named - keys}"
    undocumented = {k for k in keys if f"`{k}`" not in README}
    assert not undocumented, f"config keys missing from the README's reference: {sorted(undocumented)}"


def test_bench_scripts_named_in_readme_exist():
    for path in set(re.findall(r"(bench/[\w/]+\.py)", README)):
        assert (ROOT / path).is_file(), path


def test_entry_points_named_in_readme_exist_and_accept_the_flags_used():
    scripts = dict(re.findall(r'^(lfpv-[\w-]+) = "([\w.]+):main"', (ROOT / "pyproject.toml").read_text(), flags=re.M))
    named = set(re.findall(r"`(lfpv-[a-z]+)`", README))
    assert named == set(scripts), (named, set(scripts))  # every entry point documented, none invented
    for command, module in scripts.items():
        assert f"`python -m {module}`" in README
        flags = {opt for action in importlib.import_module(module).build_parser()._actions
                 for opt in action.option_strings}
        for line in README.splitlines():
            if line.lstrip().startswith(command + " "):
                used = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line.split(command, 1)[1]))
                assert used <= flags, f"{command}: README uses unknown flags {used - flags}"


def test_tests_named_in_readme_exist():
    # The reliability promises name the tests that back them (tests/<file>.py::<test>).
    named = set(re.findall(r"`(tests/\w+\.py)::(\w+)`", README))
    assert len(named) >= 8
    for path, name in sorted(named):
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"README names {path}::{name}, which is not there"
