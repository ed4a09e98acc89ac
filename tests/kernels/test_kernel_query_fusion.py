"""The Triton query-and-fusion op against its reference twin (CPU: under TRITON_INTERPRET=1).

Truth is the reference computed in float64 from the very inputs the kernel gets (rounded to the
tested dtype first), so the only differences left are the kernel's own arithmetic and its final
rounding. Outputs are poisoned with NaN, so an element a kernel fails to write fails the test.

Tolerances on a GPU are the same as on the interpreter, by the error analysis: in float32 the GPU's
approximate exp2 (ex2.approx, 2^-22 relative), division and reciprocal square root (2 ulps) move each
softmax weight and LayerNorm statistic by a few 1e-7 relative, against a tolerance of 1e-5 of the
tensor's scale; 16-bit results get one ulp (round to nearest on the GPU: half an ulp) on top. float64
dots may fuse multiply-adds on a GPU: 1e-10 still leaves 1e5 ulps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import DEVICE, assert_close
from lfpv_fast.kernels import _common
from lfpv_fast.kernels import query_fusion as qf
from lfpv_fast.ops import reference

# (B, C, H, W, N, p). Odd batches, non-square maps, padded channels (8, 12 -> 16) and banks (8, 10 -> 16),
# several patch tiles per patch row and masked patches in a tile (forward: W=24, C=64 gives 6 patches in
# tiles of 4; backward: W=6, C=12, p=2 gives 3 in a tile of 4), p = 4, 2, 1.
SHAPES = [
    (1, 32, 4, 8, 16, 4),
    (3, 64, 8, 24, 8, 4),
    (3, 32, 12, 8, 32, 4),
    (3, 8, 6, 36, 8, 2),
    (1, 12, 4, 6, 10, 2),
    (1, 16, 3, 5, 4, 1),
]
# SHAPES[1] with one image: the published C=64 with its ragged patch tiles, for the float32 and 16-bit tests.
# Odd batches are float64's (every shape above) and float32's (SHAPES[3]); a third of the interpreter's time.
C64_ONE_IMAGE = (1, *SHAPES[1][1:])
NAMES = ["features", "bank_vectors", "bank_patches", "pixel_w", "pixel_b", "vkey_w", "vkey_b",
         "patch_w", "patch_b", "pkey_w", "pkey_b"]
# The key LayerNorms' biases shift every score of a query by the same amount, which the softmax
# ignores: their true gradient is exactly 0. They are held to the scale of the key weights' grads.
ZERO_GRAD_SCALE = {"vkey_b": "vkey_w", "pkey_b": "pkey_w"}


def query_fusion_inputs(shape, seed: int = 0) -> list[torch.Tensor]:
    """float64 leaves on DEVICE in NAMES order (drawn on the CPU, then moved). The LayerNorm weights are
    scaled by dim**-0.25 so that the scores are O(1): softmaxes neither saturate nor flatten, and their
    gradients are exercised."""
    b, c, h, w, n, p = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    d = c * p * p
    leaves = [rand(b, c, h, w), rand(n, c), rand(n, c, p, p)]
    for dim in (c, c, d, d):
        leaves += [(1 + 0.1 * rand(dim)) * dim ** -0.25, 0.1 * rand(dim)]
    return [t.to(DEVICE) for t in leaves]


def run_with_grads(fn, leaves: list[torch.Tensor], grad_weights: torch.Tensor):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    f, bv, bp, *norms = leaves
    out = fn(f, bv, bp, (norms[0], norms[1]), (norms[2], norms[3]), (norms[4], norms[5]), (norms[6], norms[7]))
    grads = torch.autograd.grad((out * grad_weights.to(out.dtype)).sum(), leaves)
    return out, dict(zip(NAMES, grads, strict=True))


def check(shape, dtype: torch.dtype, rel: float, ulp: float = 0.0) -> None:
    leaves = [t.to(dtype) for t in query_fusion_inputs(shape)]
    grad_weights = torch.randn(shape[:4], generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64).to(dtype).to(DEVICE)
    truth_out, truth_grads = run_with_grads(reference.query_fusion, [t.double() for t in leaves], grad_weights.double())
    out, grads = run_with_grads(qf.query_fusion, leaves, grad_weights)
    assert out.dtype == dtype
    assert_close(out, truth_out, rel, ulp, what="output")
    for name in NAMES:
        assert grads[name].dtype == dtype, name
        scale = truth_grads[ZERO_GRAD_SCALE[name]].abs().max() if name in ZERO_GRAD_SCALE else None
        assert_close(grads[name], truth_grads[name], rel, ulp, scale=scale, what=f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference(shape):
    check(shape, torch.float64, rel=1e-10)


@pytest.mark.parametrize("shape", [SHAPES[0], C64_ONE_IMAGE, SHAPES[3]])
def test_float32_matches_reference(shape):
    check(shape, torch.float32, rel=1e-5)


def test_float16_matches_reference():
    # Exact float32 dots and accumulation, one rounding of each result to float16: at most one unit in
    # the last place (2^-10), plus float32-level arithmetic error. (One ulp, not half: the CPU
    # interpreter truncates where GPUs round to nearest.)
    check(C64_ONE_IMAGE, torch.float16, rel=1e-5, ulp=2.0 ** -10)


# bf16 features (bf16 training): every dot but the scores takes bf16 operands (tensor cores; the CPU
# interpreter rounds them exactly so, see _mm_values), the scores stay exact float32. Stated tolerance:
# one bf16 unit (2^-7) of each tensor's largest value, on top of the final rounding of each element (one
# unit here: the interpreter truncates; a GPU rounds to nearest). The error model (bench/dot_precision.py,
# round-to-nearest) puts the whole op at 0.8 units at most; bf16 scores too would reach 5.
BF16_DOTS_TOLERANCE = 2.0 ** -7


@pytest.mark.parametrize("shape", [C64_ONE_IMAGE, (2, 16, 8, 12, 16, 4)], ids=["C=64", "demo C=16"])
def test_bf16_tensor_core_dots_stay_within_their_tolerance(shape):
    check(shape, torch.bfloat16, rel=BF16_DOTS_TOLERANCE, ulp=2.0 ** -7)


# The channel counts LFPVs attach at besides the published 64 (issue 22): Retinexformer's bottleneck (160)
# and first level (40), another network's 144; none a power of two, 40 and 144 no multiple of 16. The
# forward's passes take 16 channels a chunk (a ragged last chunk at 40 and 144), the backward's 8, the
# pixel-branch backward's 16 too (a ragged last chunk of 8 at 40).
# Small maps: a few patch tiles each.
PLUGIN_SHAPES = [(2, 160, 4, 8, 16, 4), (2, 40, 8, 8, 16, 4), (1, 144, 4, 8, 8, 4), (2, 40, 6, 4, 16, 2)]


@pytest.mark.parametrize("shape", PLUGIN_SHAPES, ids=lambda s: f"C={s[1]},N={s[4]},p={s[5]}")
def test_any_channel_count_float64(shape):
    check(shape, torch.float64, rel=1e-10)


# float32 at these channel counts: the build whose pixel-branch backward spilled kilobytes when it held
# whole (pixels, C) blocks (compile gate), now chunked.
@pytest.mark.parametrize("shape", PLUGIN_SHAPES[:3], ids=lambda s: f"C={s[1]}")
def test_any_channel_count_float32(shape):
    check(shape, torch.float32, rel=1e-5)


@pytest.mark.parametrize("shape", PLUGIN_SHAPES[:2], ids=lambda s: f"C={s[1]}")
def test_any_channel_count_bf16(shape):
    check(shape, torch.bfloat16, rel=BF16_DOTS_TOLERANCE, ulp=2.0 ** -7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_only_bf16_features_take_bf16_dots(dtype):
    """Which kernels get bf16 dots: all four that multiply, for bf16 features only."""
    leaves = [t.to(dtype).requires_grad_(True) for t in query_fusion_inputs(SHAPES[4])]
    f, bv, bp, *norms = leaves
    with _common.record_launches(_common.TARGETS["sm_90"]) as records:
        qf.query_fusion(f, bv, bp, *zip(norms[::2], norms[1::2], strict=True)).sum().backward()
    flags = {r.name: r.kwargs["BF16_DOTS"] for r in records if "BF16_DOTS" in r.kwargs}
    assert flags == dict.fromkeys(["query_fusion_fwd", "query_fusion_bwd_pixel", "query_fusion_bwd_patch",
                                   "query_fusion_bwd_patch_params"], dtype == torch.bfloat16)


def test_kernels_ran_and_backward_is_deterministic():
    leaves = query_fusion_inputs(SHAPES[3])
    grad_weights = torch.randn(SHAPES[3][:4], dtype=torch.float64).to(DEVICE)
    _common.reset_launches()
    out, grads = run_with_grads(qf.query_fusion, leaves, grad_weights)
    # Forward: the keys, the fused op. Backward: the keys again, the pixel branch, the patch branch,
    # the patch parameters, the two reductions of partial sums, the keys' LayerNorm backward.
    assert dict(_common.LAUNCHES) == {"query_fusion_keys": 2, "query_fusion_fwd": 1, "query_fusion_bwd_pixel": 1,
                                      "query_fusion_bwd_patch": 1, "query_fusion_bwd_patch_params": 1,
                                      "sum_rows": 2, "query_fusion_keys_bwd": 1}
    out2, grads2 = run_with_grads(qf.query_fusion, leaves, grad_weights)
    assert torch.equal(out, out2)
    for name in NAMES:  # fixed-order sums, no atomics: bitwise reproducible
        assert torch.equal(grads[name], grads2[name]), name


def recorded_launches(shape, target: _common.Target) -> dict[str, _common.LaunchRecord]:
    """The launches one forward + backward makes at `shape` configured for `target`, by name."""
    leaves = [t.requires_grad_(True) for t in query_fusion_inputs(shape)]
    f, bv, bp, *norms = leaves
    with _common.record_launches(target) as records:
        out = qf.query_fusion(f, bv, bp, *zip(norms[::2], norms[1::2], strict=True))
        out.sum().backward()
    return {r.name: r for r in records}


# The sm_90 configuration (every block size, chunk and warp count: all that is compiled) on a card of 4 SMs
# instead of 132. The SM count only sizes the grids of the kernels that loop over work, so with it the loops
# below run several steps and end ragged at two 12x44 maps where an H100 needs 33x the pixels.
SM90_WITH_4_SMS = dataclasses.replace(_common.TARGETS["sm_90"], sm_count=4)


@pytest.mark.slow
def test_sm90_configuration_with_multi_step_loops():
    """The sm_90 configuration at a shape where every loop runs several steps and ends ragged:
    several pixel tiles per program of the pixel-branch backward with an out-of-range tail tile and
    channel chunks with a ragged last one,
    several patch steps per program of the patch-parameter kernel with a ragged last step, several
    channel chunks per pass, several patch tiles per patch row with missing patches in the last."""
    shape = (2, 40, 12, 44, 16, 4)  # two images: a program's run of pixel tiles crosses from one to the next
    launches = recorded_launches(shape, SM90_WITH_4_SMS)
    pixel = launches["query_fusion_bwd_pixel"]
    hw, tiles_per_image, total_tiles, per_program = pixel.args[8:12]
    assert per_program >= 2 and pixel.grid[0] * per_program > total_tiles, "no multi-tile run with a tail"
    assert total_tiles > tiles_per_image and tiles_per_image % per_program, "no program's run crosses two images"
    # Several tiles of one program add to its partial-sum row chunk by chunk, the last chunk ragged.
    assert pixel.kwargs["C"] > pixel.kwargs["CC"] and pixel.kwargs["C"] % pixel.kwargs["CC"], "no ragged chunk"
    params = launches["query_fusion_bwd_patch_params"]
    patches_per_program = params.args[-1]
    assert patches_per_program > qf._PATCH_BLOCK and patches_per_program % qf._PATCH_BLOCK, "no ragged multi-step"
    fwd = launches["query_fusion_fwd"].kwargs
    assert fwd["C"] > fwd["CC"] and fwd["C"] % fwd["CC"], "no multi-chunk pass with a ragged last chunk"
    assert (shape[3] // 4) % fwd["G"], "no ragged tile"
    assert shape[3] // 4 > fwd["G"], "one patch tile per patch row"
    # The compiled configuration is sm_90's: the same constexprs as on a 132-SM H100.
    h100 = recorded_launches(shape, _common.TARGETS["sm_90"])
    assert {name: r.kwargs for name, r in launches.items()} == {name: r.kwargs for name, r in h100.items()}
    with _common.use_target(SM90_WITH_4_SMS):
        check(shape, torch.float64, rel=1e-10)


def test_a100_configuration():
    """sm_80 has fewer SMs: more pixel tiles per program at the same shape."""
    with _common.use_target(_common.TARGETS["sm_80"]):
        check((2, 16, 36, 28, 16, 4), torch.float64, rel=1e-10)


def test_registered_custom_op():
    args = (*(t.requires_grad_(True) for t in query_fusion_inputs(SHAPES[4])), 1e-5)
    # The AOT-dispatch check needs compiled Triton kernels in a traced graph: GPU only.
    torch.library.opcheck(torch.ops.lfpv.query_fusion.default, args,
                          test_utils=["test_schema", "test_autograd_registration", "test_faketensor"])


def test_rejects_patch_size_that_is_not_a_power_of_two():
    f, bv, _, *norms = query_fusion_inputs((1, 8, 6, 6, 4, 2))
    bp = torch.randn(4, 8, 3, 3, dtype=torch.float64).to(DEVICE)

    def norm72():
        return torch.ones(72, dtype=torch.float64, device=DEVICE), torch.zeros(72, dtype=torch.float64, device=DEVICE)

    with pytest.raises(NotImplementedError, match="power-of-two"):
        qf.query_fusion(f, bv, bp, (norms[0], norms[1]), (norms[2], norms[3]), norm72(), norm72())
