"""Charbonnier and VGG19 perceptual losses as published."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lfpv_fast.training.losses import SLICE_ENDS, PerceptualLoss, VGG19Features, charbonnier_loss, vgg19_feature_shapes

# torchvision vgg19().features: index -> (in, out) of each 3x3 conv; every other index is a ReLU or a max-pool.
TORCHVISION_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                     14: (256, 256), 16: (256, 256), 19: (256, 512), 21: (512, 512), 23: (512, 512),
                     25: (512, 512), 28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512)}
TORCHVISION_POOLS = {4, 9, 18, 27, 36}


def torchvision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-format vgg19 state dict with random values (scaled to keep activations O(1))."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (cin, cout) in TORCHVISION_CONVS.items():
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        state[f"features.{index}.bias"] = torch.randn(cout, generator=g) * 0.01
    # the classifier is ignored; small stand-ins keep the test light (the real ones are 120M values)
    state["classifier.0.weight"] = torch.zeros(4, 4)
    state["classifier.6.bias"] = torch.zeros(4)
    return state


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    return torchvision_state_dict()


def test_charbonnier_hand_computed_value_and_gradient() -> None:
    pred = torch.tensor([[0.0, 3.0], [1.5, -2.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.0, -1.0], [1.5, 1.0]], dtype=torch.float64)
    loss = charbonnier_loss(pred, target)
    # diffs 0, 4, 0, -3 -> 2 sqrt(1e-6) + sqrt(16 + 1e-6) + sqrt(9 + 1e-6); a sum, eps 1e-6 (published)
    expected = 2 * 1e-3 + math.sqrt(16 + 1e-6) + math.sqrt(9 + 1e-6)
    assert abs(loss.item() - expected) < 1e-12
    loss.backward()
    expected_grad = torch.tensor([[0.0, 4 / math.sqrt(16 + 1e-6)], [0.0, -3 / math.sqrt(9 + 1e-6)]],
                                 dtype=torch.float64)
    torch.testing.assert_close(pred.grad, expected_grad, rtol=0, atol=1e-12)
    assert abs(charbonnier_loss(pred, target, eps=1.0).item() - (2 + math.sqrt(17) + math.sqrt(10))) < 1e-12
    with pytest.raises(ValueError, match="same shape"):
        charbonnier_loss(pred, target[:1])


def test_vgg_stack_matches_torchvision_layout_and_published_slices() -> None:
    vgg = VGG19Features()
    layers = list(vgg.features)
    assert len(layers) == SLICE_ENDS[-1] == 30
    for index, layer in enumerate(layers):
        if index in TORCHVISION_CONVS:
            assert isinstance(layer, nn.Conv2d), index
            assert (layer.in_channels, layer.out_channels) == TORCHVISION_CONVS[index]
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1)
        elif index in TORCHVISION_POOLS:
            assert isinstance(layer, nn.MaxPool2d), index
        else:
            assert isinstance(layer, nn.ReLU), index
    # published slices: [0,2) [2,7) [7,12) [12,21) [21,30), each ending on relu1_1 .. relu5_1
    assert SLICE_ENDS == (2, 7, 12, 21, 30)
    assert all(isinstance(layers[end - 1], nn.ReLU) and isinstance(layers[end - 2], nn.Conv2d) for end in SLICE_ENDS)
    shapes = vgg19_feature_shapes()
    assert set(shapes) == {f"features.{i}.{p}" for i in TORCHVISION_CONVS for p in ("weight", "bias")}


def _manual_relu_outputs(state: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """relu1_1 .. relu5_1 computed directly from the state dict, walking torchvision's layer list."""
    outputs = []
    for index in range(30):
        if index in TORCHVISION_CONVS:
            x = F.conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1)
        elif index in TORCHVISION_POOLS:
            x = F.max_pool2d(x, 2)
        else:
            x = F.relu(x)
        if index in (1, 6, 11, 20, 29):
            outputs.append(x)
    return outputs


def test_weights_load_from_torchvision_file(tmp_path: Path, vgg_state: dict[str, torch.Tensor]) -> None:
    state = vgg_state
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    loss = PerceptualLoss.from_file(path)
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.vgg.training  # stays in eval mode
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = loss.vgg(x)
    expected = _manual_relu_outputs(state, x)
    assert [tuple(t.shape) for t in got] == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4),
                                             (1, 512, 2, 2)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_perceptual_loss_value_and_gradient(vgg_state: dict[str, torch.Tensor]) -> None:
    loss = PerceptualLoss()
    loss.load_vgg_weights(vgg_state)
    g = torch.Generator().manual_seed(4)
    target = torch.rand(2, 3, 32, 32, generator=g)
    assert loss(target.clone(), target).item() == 0.0
    pred = (target + 0.05 * torch.randn(2, 3, 32, 32, generator=g)).requires_grad_(True)
    value = loss(pred, target)
    assert value.item() > 0
    # the published weighting and reduction: sum_i w_i * sum |f_i(pred) - f_i(target)|
    fp, ft = loss.vgg(pred.detach()), loss.vgg(target)
    expected = sum(w * (a - b).abs().sum() for w, a, b in zip((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1), fp, ft, strict=True))
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=0)
    mean_loss = PerceptualLoss(reduction="mean")
    mean_loss.load_vgg_weights(vgg_state)
    expected_mean = sum(w * (a - b).abs().mean() for w, a, b in zip((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1), fp, ft,
                                                                    strict=True))
    torch.testing.assert_close(mean_loss(pred.detach(), target), expected_mean, rtol=1e-5, atol=0)
    # gradient reaches the prediction only (the target's features are detached)
    target_g = target.clone().requires_grad_(True)
    loss(pred, target_g).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target_g.grad is None
    assert all(p.grad is None for p in loss.parameters())


def test_bad_weights_raise_clear_errors(tmp_path: Path, vgg_state: dict[str, torch.Tensor]) -> None:
    loss = PerceptualLoss()
    state = vgg_state
    missing = dict(state)
    del missing["features.21.weight"]
    with pytest.raises(KeyError, match=r"missing keys \['features.21.weight'\]"):
        loss.load_vgg_weights(missing, source="my.pth")
    wrong = dict(state)
    wrong["features.5.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(ValueError, match=r"my.pth: key 'features.5.weight' has shape \(128, 64, 1, 1\)"):
        loss.load_vgg_weights(wrong, source="my.pth")
    unexpected = dict(state)
    unexpected["features.3.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected keys.*features.3.weight"):
        loss.load_vgg_weights(unexpected)
    ints = dict(state)
    ints["features.0.bias"] = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(TypeError, match="features.0.bias.*floating-point"):
        loss.load_vgg_weights(ints)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth is not a torch file"):
        PerceptualLoss.from_file(garbage)
    with pytest.raises(FileNotFoundError, match="nothing.pth does not exist"):
        PerceptualLoss.from_file(tmp_path / "nothing.pth")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing.pth.*features.21.weight"):  # from a file: an input error
        PerceptualLoss.from_file(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="reduction"):
        PerceptualLoss(reduction="none")
