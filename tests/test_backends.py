"""Backend selection, and the guard against compiling interpreted Triton kernels."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from helpers import TINY
from lfpv_fast import LFPVNet
from lfpv_fast.config import ConfigError, TrainConfig, load_config
from lfpv_fast.ops import backends, cpu_ops, reference
from lfpv_fast.ops.backends import (
    BACKENDS,
    BackendName,
    BackendUnavailable,
    Resolved,
    attention_is_memory_linear,
    resolve_backend,
    select_ops,
    triton_interpreting,
)


def test_auto_picks_the_cpu_op_set_on_cpu_tensors():
    assert select_ops("auto", torch.zeros(1)) is cpu_ops
    assert select_ops("reference", torch.zeros(1)) is reference
    with pytest.raises(ValueError, match="unknown backend"):
        select_ops("fast", torch.zeros(1))


@pytest.mark.skipif(torch.cuda.is_available() or not triton_interpreting(), reason="CPU interpreter only")
def test_compiling_interpreted_triton_ops_is_a_clear_error():
    """Under TRITON_INTERPRET the kernels cannot be traced: compiling must refuse, not drop them."""
    ops = select_ops("triton", torch.zeros(1))
    compiled = torch.compile(ops.snr_mask, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="torch.compile of the Triton backend needs a GPU"):
        compiled(torch.rand(1, 3, 8, 8))
    # Eagerly, the same op runs (interpreted) and matches its reference twin.
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.snr_mask(x), reference.snr_mask(x), rtol=0, atol=1e-12)


def test_model_backend_is_chosen_per_input():
    net = LFPVNet(TINY)
    assert net.ops_for(torch.zeros(1)) is cpu_ops
    assert LFPVNet(net.config, backend="reference").ops_for(torch.zeros(1)) is reference


class _CudaLike:
    """Stands for a CUDA tensor where only `device` is read (this machine may have no GPU)."""

    device = torch.device("cuda")


MISSING = "the triton backend is not available here: ModuleNotFoundError('triton')"


def _triton_missing(monkeypatch):
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda: MISSING)
    monkeypatch.setattr(backends, "_warned_fallback", False)


def test_auto_on_cuda_without_triton_warns_naming_the_import(monkeypatch):
    _triton_missing(monkeypatch)
    with pytest.warns(RuntimeWarning, match="reference ops on CUDA.*ModuleNotFoundError"):
        assert select_ops("auto", _CudaLike()) is reference
    with pytest.raises(BackendUnavailable, match="ModuleNotFoundError"):  # asked for by name: an error
        select_ops("triton", _CudaLike())


def test_resolve_backend_answers_per_device(monkeypatch):
    """The op set each backend runs as, and why when it is not what was asked for."""
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda: None)
    assert resolve_backend("auto", "cuda") == Resolved("auto", "triton")
    assert resolve_backend("auto", "cpu") == Resolved("auto", "cpu_ops")
    assert resolve_backend("auto", "cpu", training=True) == Resolved("auto", "reference")
    assert resolve_backend("reference", "cuda") == Resolved("reference", "reference")
    assert resolve_backend("triton", "cuda") == Resolved("triton", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == Resolved("triton", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    on_cpu = resolve_backend("triton", "cpu")
    assert on_cpu.name is None and "TRITON_INTERPRET=1" in on_cpu.reason
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        _ = on_cpu.ops
    _triton_missing(monkeypatch)
    assert resolve_backend("auto", "cuda") == Resolved("auto", "reference", MISSING)
    assert resolve_backend("triton", "cuda") == Resolved("triton", None, MISSING)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resolve_backend("fast", "cpu")


def test_asking_about_triton_on_the_cpu_does_not_import_it():
    """Triton decides at import whether it interprets: a question that imported it (with TRITON_INTERPRET=0,
    say) would fix the kernels' mode for the rest of the process."""
    code = ("import sys; from lfpv_fast.ops.backends import resolve_backend; "
            "resolved = resolve_backend('triton', 'cpu'); print(resolved.name, 'triton' in sys.modules)")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "False"]


def test_triton_takes_cpu_tensors_while_the_compile_gate_records_launches(monkeypatch):
    pytest.importorskip("triton")
    from lfpv_fast.kernels._common import TARGETS, record_launches  # imported under the tests' interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("triton", "cpu").name is None
    with record_launches(TARGETS["sm_90"]):
        assert resolve_backend("triton", "cpu") == Resolved("triton", "triton")
    assert resolve_backend("triton", "cpu").name is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_tools_refuse_a_backend_that_cannot_run_here_in_one_line(monkeypatch, tmp_path, capsys, tiny_checkpoint):
    from PIL import Image

    from helpers import assert_one_line_error, run
    from lfpv_fast import enhance, evaluate

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    image = tmp_path / "a.png"
    Image.new("RGB", (24, 16)).save(image)
    code, err = run(enhance.main, [image, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out", "--device", "cpu",
                                   "--backend", "triton"], capsys)
    assert_one_line_error(code, err, "--backend triton cannot run on cpu", "TRITON_INTERPRET=1")
    assert not (tmp_path / "out").exists()
    code, err = run(evaluate.main, ["-c", "demo", "--checkpoint", tiny_checkpoint, "--device", "cpu",
                                    "--backend", "triton", "--out", tmp_path / "eval"], capsys)
    assert_one_line_error(code, err, "--backend triton cannot run on cpu", "TRITON_INTERPRET=1")


def test_attention_is_memory_linear_except_the_reference(monkeypatch):
    assert attention_is_memory_linear("auto", "cpu")  # cpu_ops
    assert not attention_is_memory_linear("reference", "cpu")
    assert attention_is_memory_linear("triton", "cuda")
    _triton_missing(monkeypatch)
    assert not attention_is_memory_linear("auto", "cuda")  # falls back to the reference ops


def test_backend_names_are_listed_once():
    assert typing.get_args(BackendName) == BACKENDS
    assert typing.get_type_hints(TrainConfig)["backend"] is BackendName


def test_kernels_do_not_import_the_module_that_selects_them():
    """The dependency goes one way: lfpv_fast.ops.backends imports the kernels, never the reverse."""
    import lfpv_fast.kernels

    kernels = Path(lfpv_fast.kernels.__path__[0])
    importers = []
    for source in sorted(kernels.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if "lfpv_fast.ops.backends" in names:
                importers.append(source.name)
    assert importers == []


def test_trainer_features_name_the_backend_actually_used(monkeypatch):
    from lfpv_fast.training import fast_path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _triton_missing(monkeypatch)
    cfg = load_config("demo", ["train.bf16=off", "train.compile=off", "train.fused_adam=off"])
    with pytest.warns(RuntimeWarning, match="train.backend=auto runs the reference ops.*ModuleNotFoundError"):
        features = fast_path.resolve_features(cfg)
    assert (features.backend, features.ops) == ("reference", "reference")
    assert "backend reference (Triton unavailable: " in features.describe()
    with pytest.raises(ConfigError, match="train.backend=triton: .*ModuleNotFoundError"):
        fast_path.resolve_features(load_config("demo", ["train.backend=triton", "train.bf16=off"]))


def test_a_resolved_backend_says_whether_cuda_would_help_and_which_name_pins_its_op_set(monkeypatch):
    """`needs_cuda`: the CPU is the obstacle (not a missing Triton); `pinned_backend`: the backend name that runs
    the chosen op set on every call (what a training run builds its network with), never an op-set name."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    on_cpu = resolve_backend("triton", "cpu")
    assert on_cpu.name is None and on_cpu.needs_cuda
    with pytest.raises(BackendUnavailable, match="need a CUDA device"):
        on_cpu.pinned_backend  # noqa: B018 - the property raises
    assert resolve_backend("auto", "cpu").pinned_backend == "auto"  # the CPU op set: only "auto" selects it
    assert resolve_backend("auto", "cpu", training=True).pinned_backend == "reference"
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda: None)
    assert resolve_backend("auto", "cuda").pinned_backend == "triton"
    _triton_missing(monkeypatch)
    missing = resolve_backend("triton", "cuda")
    assert missing.name is None and not missing.needs_cuda  # Triton is not installed: a GPU would not help
    assert resolve_backend("auto", "cuda").pinned_backend == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_training_triton_on_the_cpu_without_the_interpreter_is_a_gpu_only_feature(monkeypatch):
    from lfpv_fast.training import fast_path

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"GPU-only features; change train.backend=triton -> 'reference' or 'auto'"):
        fast_path.resolve_features(load_config("demo", ["train.backend=triton", "train.compile=off"]))
    features = fast_path.resolve_features(load_config("demo", ["train.device=cpu"]))
    assert (features.backend, features.ops) == ("reference", "reference")  # "auto" trains on the reference ops
