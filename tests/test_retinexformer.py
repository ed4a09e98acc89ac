"""Retinexformer written here: float64 parity with the published network, published state dicts and checkpoint
files both ways, the LFPV seam (encode/decode at every site), input checks, the IG-MSA op seam."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import lfpv_fast.ops.cpu_ops
import lfpv_fast.ops.reference
from golden import rel_err
from lfpv_fast.models import Backbone, RetinexFormer, Site
from lfpv_fast.models.retinexformer import (
    ig_msa_op,
    published_checkpoint,
    save_published_checkpoint,
    state_dict_from_published_checkpoint,
)

CASE_PATH = Path(__file__).parent / "data" / "retinexformer_case.pt"
SMALL = {"n_feat": 8, "num_blocks": [1, 1, 1]}  # fast nets for the structural tests


@pytest.fixture(scope="module")
def retinexformer_case() -> dict:
    return torch.load(CASE_PATH, weights_only=True)


def golden_retinexformer(retinexformer_case: dict) -> RetinexFormer:
    net = RetinexFormer(**retinexformer_case["config"], backend="reference").double()
    net.load_published_state_dict(retinexformer_case["state_dict"])
    return net


def test_float64_parity_with_the_published_network(retinexformer_case):
    net = golden_retinexformer(retinexformer_case)
    x = retinexformer_case["x"].clone().requires_grad_(True)
    y = net(x)
    (y * retinexformer_case["grad_weight"]).sum().backward()
    assert y.dtype == torch.float64 and y.shape == retinexformer_case["y"].shape
    assert rel_err(y.detach(), retinexformer_case["y"]) < 1e-10
    assert rel_err(x.grad, retinexformer_case["dx"]) < 1e-10


def test_default_constructor_is_the_published_configuration(retinexformer_case):
    net = RetinexFormer()
    assert retinexformer_case["config"] == {"in_channels": 3, "out_channels": 3, "n_feat": 40, "stage": 1,
                                            "num_blocks": [1, 2, 2]}
    shapes = {k: tuple(v.shape) for k, v in net.published_state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in retinexformer_case["state_dict"].items()}
    assert sum(p.numel() for p in net.parameters()) == 1_605_701  # the golden README's count


def test_published_state_dict_round_trip(retinexformer_case):
    net = golden_retinexformer(retinexformer_case)
    exported = net.published_state_dict()
    assert list(exported) == list(retinexformer_case["state_dict"])  # same keys, same order
    for key, value in retinexformer_case["state_dict"].items():
        assert torch.equal(exported[key], value), key
    again = RetinexFormer(**retinexformer_case["config"]).double()
    again.load_published_state_dict(exported)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values(), strict=True))


def test_module_prefix_is_stripped(retinexformer_case):
    net = RetinexFormer(**retinexformer_case["config"]).double()
    net.load_published_state_dict({"module." + k: v for k, v in retinexformer_case["state_dict"].items()})
    assert torch.equal(net.published_state_dict()["body.0.denoiser.mapping.weight"],
                       retinexformer_case["state_dict"]["body.0.denoiser.mapping.weight"])


def test_strict_loading_names_a_missing_key(retinexformer_case):
    sd = dict(retinexformer_case["state_dict"])
    del sd["body.0.denoiser.bottleneck.blocks.1.0.rescale"]
    with pytest.raises(ValueError, match=r"missing key 'body\.0\.denoiser\.bottleneck\.blocks\.1\.0\.rescale'"):
        RetinexFormer().load_published_state_dict(sd)


def test_strict_loading_names_an_unexpected_key(retinexformer_case):
    sd = dict(retinexformer_case["state_dict"])
    sd["body.0.denoiser.lrelu.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key 'body\.0\.denoiser\.lrelu\.weight'"):
        RetinexFormer().load_published_state_dict(sd)


def test_strict_loading_names_a_wrong_shape(retinexformer_case):
    sd = dict(retinexformer_case["state_dict"])
    sd["body.0.estimator.depth_conv.weight"] = torch.zeros(40, 1, 5, 5)  # groups=n_feat instead of 4
    expected = r"'body\.0\.estimator\.depth_conv\.weight'.*\(40, 1, 5, 5\).*\(40, 10, 5, 5\)"
    with pytest.raises(ValueError, match=expected):
        RetinexFormer().load_published_state_dict(sd)


def test_strict_loading_refuses_another_configuration(retinexformer_case):
    with pytest.raises(ValueError, match=r"unexpected key 'body\.0\.denoiser\.encoder_layers\.1\.0\.blocks\.1\."):
        RetinexFormer(num_blocks=[1, 1, 2]).load_published_state_dict(retinexformer_case["state_dict"])


def test_loading_does_not_change_weights_on_failure(retinexformer_case):
    net = RetinexFormer()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sd = dict(retinexformer_case["state_dict"])
    sd["body.0.denoiser.mapping.weight"] = torch.zeros(3, 40, 1, 1)
    with pytest.raises(ValueError, match="mapping.weight"):
        net.load_published_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_published_checkpoint_reader(retinexformer_case):
    sd = retinexformer_case["state_dict"]
    other = {k: v + 1 for k, v in sd.items()}
    # The published test script reads 'params'; a file with both gives 'params'.
    assert state_dict_from_published_checkpoint({"params": sd, "params_ema": other}) is not sd
    read = state_dict_from_published_checkpoint({"params": sd, "params_ema": other})
    assert all(torch.equal(read[k], sd[k]) for k in sd)
    read = state_dict_from_published_checkpoint({"params": sd, "params_ema": other}, entry="params_ema")
    assert all(torch.equal(read[k], other[k]) for k in sd)
    read = state_dict_from_published_checkpoint({"params_ema": other})
    assert all(torch.equal(read[k], other[k]) for k in sd)
    read = state_dict_from_published_checkpoint({"module." + k: v for k, v in sd.items()})
    assert list(read) == list(sd)
    with pytest.raises(ValueError, match=r"ckpt\.pth: not a Retinexformer checkpoint.*'params'.*found keys net, epoch"):
        state_dict_from_published_checkpoint({"net": sd, "epoch": 3}, source="ckpt.pth")
    with pytest.raises(ValueError, match=r"no entry 'params_ema'"):
        state_dict_from_published_checkpoint({"params": sd}, entry="params_ema")
    with pytest.raises(ValueError, match="expected a Retinexformer checkpoint"):
        state_dict_from_published_checkpoint([1, 2])


def test_published_checkpoint_file_round_trip(retinexformer_case, tmp_path):
    net = golden_retinexformer(retinexformer_case)
    path = tmp_path / "net_g_latest.pth"
    save_published_checkpoint(net, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["params"] and list(loaded["params"]) == list(retinexformer_case["state_dict"])
    again = RetinexFormer().double()
    again.load_published_state_dict(state_dict_from_published_checkpoint(loaded, str(path)))
    assert all(torch.equal(again.published_state_dict()[k], v) for k, v in retinexformer_case["state_dict"].items())
    assert list(published_checkpoint(net)) == ["params"]


def test_declares_the_backbone_seam():
    net = RetinexFormer()
    assert isinstance(net, Backbone)
    assert net.default_site == "bottleneck" and net.align == 4
    assert net.sites == {"level1": Site("level1", 40, 1), "level2": Site("level2", 80, 2),
                         "bottleneck": Site("bottleneck", 160, 4)}


@pytest.mark.parametrize("stage", [1, 2])
def test_encode_decode_equals_forward_at_every_site(stage):
    torch.manual_seed(0)
    net = RetinexFormer(stage=stage, **SMALL).eval()
    x = torch.rand(2, 3, 16, 24) * 0.3
    with torch.no_grad():
        expected = net(x)
        for name, site in net.sites.items():
            features, state = net.encode(x, name)
            assert features.shape == (2, site.channels, 16 // site.stride, 24 // site.stride), name
            assert torch.equal(net.decode(features, state), expected), name


def test_decode_uses_the_given_features():
    torch.manual_seed(0)
    net = RetinexFormer(**SMALL).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        for name in net.sites:
            features, state = net.encode(x, name)
            assert not torch.equal(net.decode(features + 0.1, state), net(x)), name


def test_unknown_site():
    with pytest.raises(ValueError, match=r"no site 'level3'; its sites are level1, level2, bottleneck"):
        RetinexFormer(**SMALL).encode(torch.rand(1, 3, 8, 8), "level3")


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 18, 16), r"multiples of 4.*got 18x16"),
    ((1, 3, 16, 10), r"multiples of 4.*got 16x10"),
    ((1, 4, 16, 16), r"shape \(B, 3, H, W\), got \(1, 4, 16, 16\)"),
    ((3, 16, 16), r"shape \(B, 3, H, W\), got \(3, 16, 16\)"),
])
def test_bad_input_shape(shape, message):
    net = RetinexFormer(**SMALL)
    with pytest.raises(ValueError, match=message):
        net(torch.rand(shape))
    if len(shape) == 4:
        with pytest.raises(ValueError, match=message):
            net.encode(torch.rand(shape), "bottleneck")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="out_channels"):
        RetinexFormer(out_channels=1)
    with pytest.raises(ValueError, match="n_feat=30 must be a positive multiple of in_channels \\+ 1 = 4"):
        RetinexFormer(n_feat=30)
    with pytest.raises(ValueError, match="num_blocks"):
        RetinexFormer(num_blocks=[1, 2])
    with pytest.raises(ValueError, match="unknown backend"):
        RetinexFormer(backend="cuda")


def test_ig_msa_runs_through_the_op_set(monkeypatch):
    """Every IG-MSA layer calls the selected op set's ig_msa (where a fused kernel plugs in)."""
    calls = []

    def counting_ig_msa(*args, **kwargs):
        calls.append(args[0].shape)
        return lfpv_fast.ops.reference.ig_msa(*args, **kwargs)

    monkeypatch.setattr(lfpv_fast.ops.cpu_ops, "ig_msa", counting_ig_msa)
    net = RetinexFormer(**SMALL, backend="auto").eval()  # auto on the CPU: lfpv_fast.ops.cpu_ops
    with torch.no_grad():
        net(torch.rand(1, 3, 8, 12))
    # level 1, level 2, bottleneck, decoder level 2, decoder level 1: one block each.
    assert calls == [(1, 96, 8), (1, 24, 16), (1, 6, 32), (1, 24, 16), (1, 96, 8)]
    assert ig_msa_op(types.ModuleType("an_op_set_without_ig_msa")) is lfpv_fast.ops.reference.ig_msa
