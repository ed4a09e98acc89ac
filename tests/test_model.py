"""The reference model's public contract: configs, shapes, banks, draws, published-checkpoint I/O."""

from __future__ import annotations

import pytest
import torch

from golden import golden_net, load_case, original_keys, recipe_state_dict, rel_err
from helpers import TINY
from lfpv_fast import BankDraws, LFPVNet, ModelConfig, snr_mask
from lfpv_fast.training.checkpoint import atomic_save, load_model, weights_only_checkpoint


def test_default_config_is_published_smid_model():
    cfg = ModelConfig()
    assert (cfg.nf, cfg.front_blocks, cfg.back_blocks, cfg.bank_size, cfg.patch_size) == (64, 1, 1, 16, 4)
    assert (cfg.layers, cfg.heads, cfg.head_dim, cfg.ffn_dim, cfg.d_model) == (6, 8, 64, 2048, 1024)
    net = LFPVNet()
    shapes = {k: list(v.shape) for k, v in net.to_original_state_dict().items()}
    assert shapes == original_keys()
    # The golden README counts 45,966,979 parameters: everything but the BatchNorm statistics.
    assert sum(v.numel() for k, v in net.to_original_state_dict().items()
               if "running_" not in k and "num_batches" not in k) == 45_966_979


def test_banks_are_buffers_not_parameters():
    net = LFPVNet(TINY)
    assert net.bank_vectors.shape == (4, 8) and net.bank_patches.shape == (4, 8, 4, 4)
    param_names = {n for n, _ in net.named_parameters()}
    assert "bank_vectors" not in param_names and "bank_patches" not in param_names
    assert "bank_vectors" in net.state_dict() and "bank_patches" in net.state_dict()


@pytest.mark.parametrize("hw", [(16, 16), (37, 53), (64, 48)])
def test_any_size_keeps_input_size(hw):
    torch.manual_seed(0)
    net = LFPVNet(TINY).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        out = net(x, snr_mask(x))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_small_inputs_and_bad_shapes_are_refused():
    net = LFPVNet(TINY).eval()
    with pytest.raises(ValueError, match="H, W >= 16"):
        net(torch.rand(1, 3, 15, 32), torch.rand(1, 1, 15, 32))
    with pytest.raises(ValueError, match="snr_mask"):
        net(torch.rand(1, 3, 32, 32), torch.rand(1, 1, 16, 32))
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        net(torch.rand(1, 4, 32, 32), torch.rand(1, 1, 32, 32))


def test_training_forward_updates_banks_and_returns_two_outputs():
    torch.manual_seed(0)
    net = LFPVNet(TINY).train()
    net.seed_draws(3)
    x = torch.rand(3, 3, 32, 32)
    before = net.bank_vectors.clone()
    out, without_lfpv = net(x, snr_mask(x))
    assert out.shape == without_lfpv.shape == x.shape
    assert not torch.equal(before, net.bank_vectors)
    assert not net.bank_vectors.requires_grad
    # The banks learn through the updaters: their MLPs get gradients from the main output.
    out.sum().backward()
    assert net.lfpv.sample_vector_mlp[0].weight.grad.abs().sum() > 0
    assert net.lfpv.mutual_patch_mlp[0].weight.grad.abs().sum() > 0


def test_seeded_draws_are_reproducible_and_validated():
    a = BankDraws.sample((8, 8), 16, 4, torch.Generator().manual_seed(5))
    b = BankDraws.sample((8, 8), 16, 4, torch.Generator().manual_seed(5))
    assert all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("vector_pos", "patch_pos", "vector_partner", "patch_partner"))
    assert 0 <= a.patch_pos.min() and a.patch_pos.max() <= 4
    with pytest.raises(ValueError, match="patch_pos"):
        BankDraws([0, 0], [6, 0], list(range(16)), list(range(16))).check((8, 8), 16, 4)
    with pytest.raises(ValueError, match="vector_partner"):
        BankDraws([0, 0], [0, 0], [16] * 16, list(range(16))).check((8, 8), 16, 4)

    torch.manual_seed(0)
    net1, x = LFPVNet(TINY).train(), torch.rand(2, 3, 32, 32)
    net2 = LFPVNet(TINY).train()
    net2.load_state_dict(net1.state_dict())
    net1.seed_draws(11)
    net2.seed_draws(11)
    torch.testing.assert_close(net1(x, snr_mask(x))[0], net2(x, snr_mask(x))[0], rtol=0, atol=0)


def test_original_state_dict_round_trip_is_exact():
    sd = recipe_state_dict(seed=2)
    net = LFPVNet.from_original_state_dict({"module." + k: v.float() for k, v in sd.items()})
    back = net.to_original_state_dict()
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back[k], v.to(back[k].dtype)), k


def test_bad_original_checkpoints_name_the_key():
    sd = {k: v.float() for k, v in recipe_state_dict(seed=2).items()}
    missing = dict(sd)
    del missing["norm_query3.bias"]
    with pytest.raises(KeyError, match="missing keys: norm_query3.bias"):
        LFPVNet.from_original_state_dict(missing)
    extra = dict(sd, **{"decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected keys: decoder.extra.weight"):
        LFPVNet.from_original_state_dict(extra)
    wrong = dict(sd, **{"upconv1.weight": torch.zeros(256, 64, 3, 3)})
    with pytest.raises(ValueError, match=r"upconv1.weight.*\(256, 64, 3, 3\).*\(256, 128, 3, 3\)"):
        LFPVNet.from_original_state_dict(wrong)


def test_checkpoint_files_load_both_formats(tmp_path):
    torch.manual_seed(0)
    net = LFPVNet(TINY)
    net.bank_vectors.normal_()
    atomic_save(weights_only_checkpoint(net), tmp_path / "ours.pth")
    loaded = load_model(tmp_path / "ours.pth")
    assert loaded.config == TINY
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values(), strict=True))

    published = LFPVNet()
    torch.save(published.to_original_state_dict(), tmp_path / "SMID.pth")
    assert torch.equal(load_model(tmp_path / "SMID.pth").bank_patches, published.bank_patches)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_model(tmp_path / "junk.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*neither"):
        load_model(tmp_path / "other.pth")


def test_float32_agrees_with_float64_on_eval():
    case = load_case()
    net64 = golden_net(case).eval()
    net32 = LFPVNet().eval()
    net32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in net64.state_dict().items()})
    with torch.no_grad():
        out64 = net64(case["input"], case["net_mask"])
        out32 = net32(case["input"].float(), case["net_mask"].float())
    assert out32.dtype == torch.float32
    # The golden README measures the published code's own float32 eval error at ~5e-7.
    assert rel_err(out32.double(), out64) < 5e-6


def test_float32_training_forward_backward_runs():
    torch.manual_seed(0)
    net = LFPVNet(ModelConfig(nf=32, layers=2, heads=2, head_dim=32, ffn_dim=64)).train()
    x = torch.rand(2, 3, 48, 40, requires_grad=True)
    out, without_lfpv = net(x, snr_mask(x))
    (out.mean() + without_lfpv.mean()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    net = LFPVNet(TINY, backend="triton").eval()
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        net(x, torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="backend"):
        LFPVNet(TINY, backend="cuda")


def test_atomic_save_gives_files_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pth")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # no temporary file left behind
