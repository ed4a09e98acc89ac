"""Whole-image Retinexformer by strips: equal to the untiled forward (float64 to ~1e-12, float32 to 1e-5) for odd
sizes and strips smaller than the receptive field, the LFPV hook at the bottleneck, no full-resolution feature
map ever held, the input checks, the memory estimate's shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lfpv_fast.inference.retinexformer_strips import (
    estimate_retinexformer_peak_bytes,
    retinexformer_whole_image_forward,
)
from lfpv_fast.models import RetinexFormer

CASE_PATH = Path(__file__).parent / "data" / "retinexformer_case.pt"


def small_net(seed: int = 0, **config) -> RetinexFormer:
    """A small float64 network with weights away from the defaults (attention scales, norms, biases all vary)."""
    torch.manual_seed(seed)
    net = RetinexFormer(**{"n_feat": 8, "num_blocks": [1, 2, 2], **config}).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# 4 rows: one bottleneck row per strip, far below the receptive field; 12, 24: strips that do not divide the image.
@pytest.mark.parametrize("config, hw, strip_rows", [
    ({}, (36, 52), (4, 12, 64)),
    ({}, (64, 40), (8, 24)),
    ({}, (8, 12), (4, 16)),
    ({"stage": 2, "num_blocks": [2, 1, 1]}, (20, 28), (12,)),
], ids=["36x52", "64x40", "8x12", "two-stages"])
def test_strips_equal_the_untiled_forward_in_float64(config, hw, strip_rows):
    net = small_net(**config)
    x = torch.rand(2, 3, *hw, dtype=torch.float64) * 0.3
    with torch.no_grad():
        expected = net(x)
    for rows in strip_rows:
        for low_memory in (False, True):
            out = retinexformer_whole_image_forward(net, x, rows, low_memory=low_memory)
            assert out.shape == expected.shape and out.dtype == torch.float64
            assert max_rel_err(out, expected) < 1e-12, (rows, low_memory)


class NewEmptyShapes(TorchFunctionMode):
    """Records the shape of every tensor made by Tensor.new_empty: the maps the strip path keeps whole."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.new_empty:
            self.shapes.append(tuple(out.shape))
        return out


def test_low_memory_keeps_no_level2_illumination_and_the_same_result():
    """Kept whole: the level-2 map and illumination, the bottleneck map, the output; low_memory drops the level-2
    illumination (recomputed from the image rows wherever read) and changes no value."""
    net = small_net()
    x = torch.rand(1, 3, 32, 16, dtype=torch.float64) * 0.3
    level2 = (1, 2 * net.n_feat, 16, 8)
    kept = {}
    for low_memory in (False, True):
        with NewEmptyShapes() as record:
            out = retinexformer_whole_image_forward(net, x, 16, low_memory=low_memory)
        kept[low_memory] = (record.shapes, out)
    assert kept[False][0].count(level2) == 2 and kept[True][0].count(level2) == 1
    assert sorted(set(kept[False][0]) - {level2}) == sorted(set(kept[True][0]) - {level2})
    assert max_rel_err(kept[True][1], kept[False][1]) < 1e-13


def test_independent_tiles_would_differ():
    """The case above is one where strips must share the attention statistics: running each strip as its own
    image (what cutting a photo into tiles does) gives another result."""
    net = small_net()
    x = torch.rand(1, 3, 32, 24, dtype=torch.float64) * 0.3
    with torch.no_grad():
        tiled = torch.cat([net(x[:, :, a:a + 16]) for a in (0, 16)], dim=2)
        assert max_rel_err(tiled, net(x)) > 1e-3
    assert max_rel_err(retinexformer_whole_image_forward(net, x, 16), net(x)) < 1e-12


def test_published_configuration_in_float32():
    case = torch.load(CASE_PATH, weights_only=True)
    net = RetinexFormer(**case["config"]).eval()
    net.load_published_state_dict({k: v.float() for k, v in case["state_dict"].items()})
    x = case["x"][:1, :, :, :48].float()
    with torch.no_grad():
        expected = net(x)
    for rows in (8, 20, 64):
        out = retinexformer_whole_image_forward(net, x, rows)
        assert (out - expected).abs().max().item() < 1e-5, rows


def test_the_site_hook_equals_decoding_modified_bottleneck_features():
    net = small_net()
    x = torch.rand(2, 3, 36, 52, dtype=torch.float64) * 0.3  # bottleneck 9 x 13: the last strip is partial
    weight = torch.rand(1, 32, 1, 1, dtype=torch.float64)
    seen = []

    def at_site(features: torch.Tensor) -> torch.Tensor:
        seen.append(features.shape[-2])
        return features * weight + 0.05 * features.mean(dim=1, keepdim=True)  # per pixel

    with torch.no_grad():
        features, state = net.encode(x, "bottleneck")
        expected = net.decode(at_site(features), state)
    seen.clear()
    out = retinexformer_whole_image_forward(net, x, 16, at_site=at_site)
    assert seen == [4, 4, 1]  # 16 image rows = 4 bottleneck rows per strip, on the 4x4 patch grid
    assert max_rel_err(out, expected) < 1e-12
    assert max_rel_err(out, retinexformer_whole_image_forward(net, x, 16)) > 1e-6  # the hook did act


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates (elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_resolution_feature_map_is_ever_held():
    """The strip path's largest tensor is a stored level-2 map (C/2 elements per pixel): it never holds a
    level-1 map (C per pixel), which the untiled forward holds many of (and 4C ones)."""
    net = small_net()
    x = torch.rand(1, 3, 256, 8, dtype=torch.float64)
    level1_map = net.n_feat * 256 * 8
    with torch.no_grad(), LargestTensor() as untiled:
        net(x)
    assert untiled.largest >= 4 * level1_map
    with LargestTensor() as strips:
        retinexformer_whole_image_forward(net, x, 16)
    assert strips.largest <= level1_map // 2


def test_bad_arguments():
    net = small_net()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    for rows in (0, 6, -4, 8.0):
        with pytest.raises(ValueError, match=f"rows must be a positive multiple of 4.*got {rows!r}"):
            retinexformer_whole_image_forward(net, x, rows)
    with pytest.raises(ValueError, match="with at_site, rows must be a multiple of 16.*got 8"):
        retinexformer_whole_image_forward(net, x, 8, at_site=lambda f: f)
    with pytest.raises(ValueError, match=r"at_site returned shape \(1, 16, 4, 4\).*\(1, 32, 4, 4\)"):
        retinexformer_whole_image_forward(net, x, 16, at_site=lambda f: f[:, :16])
    with pytest.raises(ValueError, match="multiples of 4"):
        retinexformer_whole_image_forward(net, torch.rand(1, 3, 18, 16, dtype=torch.float64), 8)


def test_peak_estimate_is_linear_in_pixels_and_far_below_untiled():
    def estimate(height: int, width: int, rows: int | None) -> int:
        return estimate_retinexformer_peak_bytes(40, [1, 2, 2], 1, height, width, 4, rows=rows)

    untiled, strips = estimate(4000, 6000, None), estimate(4000, 6000, 64)
    assert strips < untiled / 5
    assert strips < 8 * 2**30  # a 24-megapixel photo in float32 within the 8 GiB
    # Linear in the height (the stored maps); the strip's working set does not grow with the image.
    assert estimate(8000, 6000, 64) - strips == estimate(12000, 6000, 64) - estimate(8000, 6000, 64)
    assert estimate(4000, 6000, 128) > strips
    # low_memory keeps n_feat / 2 fewer elements a pixel (the level-2 illumination).
    low = estimate_retinexformer_peak_bytes(40, [1, 2, 2], 1, 4000, 6000, 4, rows=64, low_memory=True)
    assert strips - low == 4 * 4000 * 6000 * 20
