"""Backend selection, and the guard against compiling interpreted Triton kernels."""

from __future__ import annotations

import pytest
import torch

from lfpv_fast import LFPVNet, ModelConfig, backends, cpu_ops, reference
from lfpv_fast.backends import select_ops, triton_interpreting
from lfpv_fast.config import ConfigError, load_config


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
    net = LFPVNet(ModelConfig(nf=8, light_blocks=1, layers=1, heads=2, head_dim=8, ffn_dim=16, bank_size=4))
    assert net.ops_for(torch.zeros(1)) is cpu_ops
    assert LFPVNet(net.config, backend="reference").ops_for(torch.zeros(1)) is reference


class _CudaLike:
    """Stands for a CUDA tensor where only `is_cuda` is read (this machine may have no GPU)."""

    is_cuda = True


def _triton_missing(monkeypatch):
    def fail():
        raise NotImplementedError("the triton backend is not available here: ModuleNotFoundError('triton')")

    monkeypatch.setattr(backends, "triton_ops", fail)
    monkeypatch.setattr(backends, "_warned_fallback", False)


def test_auto_on_cuda_without_triton_warns_naming_the_import(monkeypatch):
    _triton_missing(monkeypatch)
    with pytest.warns(RuntimeWarning, match="reference ops on CUDA.*ModuleNotFoundError"):
        assert select_ops("auto", _CudaLike()) is reference
    with pytest.raises(NotImplementedError, match="ModuleNotFoundError"):  # asked for by name: an error
        select_ops("triton", _CudaLike())


def test_trainer_features_name_the_backend_actually_used(monkeypatch):
    from lfpv_fast import fast_path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fast_path, "triton_ops", lambda: backends.triton_ops())
    _triton_missing(monkeypatch)
    cfg = load_config("demo", ["train.bf16=off", "train.compile=off", "train.fused_adam=off"])
    with pytest.warns(RuntimeWarning, match="train.backend=auto runs the reference ops.*ModuleNotFoundError"):
        features = fast_path.resolve_features(cfg)
    assert features.backend == "reference"
    assert "backend reference (Triton unavailable: " in features.describe()
    with pytest.raises(ConfigError, match="train.backend=triton: .*ModuleNotFoundError"):
        fast_path.resolve_features(load_config("demo", ["train.backend=triton", "train.bf16=off"]))
