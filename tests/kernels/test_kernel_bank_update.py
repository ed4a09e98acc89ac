"""The Triton bank-update ops against their reference twins (CPU: under TRITON_INTERPRET=1).

Gathers and the updaters' inputs are copies, so they must match the reference bit for bit in every
dtype; their backward passes are sums, checked against the float64 reference of the same inputs.
On a GPU the same holds: copies are exact on any device, and the sums and LayerNorms (float32
accumulation, approximate division and square root there) stay within 1e-5 of their scale.
Outputs are poisoned with NaN, so an element a kernel fails to write fails the test.
"""

from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, assert_close
from lfpv_fast.kernels import _common
from lfpv_fast.kernels import bank_update as bu
from lfpv_fast.ops import reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# float32 accumulation, one rounding to 16 bits: at most one unit in the last place (the CPU
# interpreter truncates float32 -> bfloat16 where GPUs round to nearest), plus float32 arithmetic.
ULP = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def draw(*size, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Drawn in float64 with a CPU generator (the same values on every device), then put on DEVICE."""
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(DEVICE)


def index(values) -> torch.Tensor:
    return torch.tensor(values, device=DEVICE)


def grads_of(fn, leaves: list[torch.Tensor], weights: list[torch.Tensor]):
    """Outputs of fn(*leaves) and the grads of sum(output_i * weights_i) w.r.t. the leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True))
    return outs, torch.autograd.grad(loss, leaves)


def check_against_reference(fast, ref, leaves: list[torch.Tensor], dtype: torch.dtype, exact_forward: bool,
                            names: list[str]) -> None:
    """Forward and backward of fast vs ref: the truth is ref in float64 on the same (rounded) inputs."""
    leaves = [t.to(dtype) for t in leaves]
    ref_outs = ref(*leaves)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    weights = [draw(o.shape, seed=7 + i) for i, o in enumerate(ref_outs)]
    truth_outs, truth_grads = grads_of(ref, [t.double() for t in leaves], [w.to(dtype).double() for w in weights])
    outs, grads = grads_of(fast, leaves, [w.to(dtype) for w in weights])
    for i, (o, r, t) in enumerate(zip(outs, ref_outs, truth_outs, strict=True)):
        assert o.dtype == dtype
        if exact_forward:  # copies: bit for bit, like the reference in the same dtype
            assert torch.equal(o, r), f"output {i}"
        else:
            assert_close(o, t, REL[dtype], ULP[dtype], what=f"output {i}")
    for name, g, t in zip(names, grads, truth_grads, strict=True):
        assert g.dtype == dtype, name
        assert_close(g, t, REL[dtype], ULP[dtype], what=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# gather_samples

# (B, C, H, W, p, vector_pos, patch_pos): corners, a window at the far corner, the sampled pixel inside
# the window (their grads add up), padded channels (12), a non-power-of-two window.
GATHER_CASES = [
    (1, 8, 4, 4, 4, (0, 0), (0, 0)),
    (3, 32, 6, 10, 4, (5, 9), (2, 6)),
    (3, 64, 8, 5, 2, (7, 0), (6, 3)),
    (1, 12, 5, 7, 3, (2, 3), (1, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATHER_CASES)
def test_gather_samples(case, dtype):
    b, c, h, w, p, vpos, ppos = case
    vpos, ppos = index(vpos), index(ppos)
    check_against_reference(
        lambda f: bu.gather_samples(f, vpos, ppos, p), lambda f: reference.gather_samples(f, vpos, ppos, p),
        [draw(b, c, h, w)], dtype, exact_forward=True, names=["features"])


# ---------------------------------------------------------------------------------------------
# sample_updater_inputs

# (N, B, C, p)
SAMPLE_CASES = [(16, 1, 32, 4), (8, 3, 64, 4), (32, 3, 8, 2), (5, 3, 12, 3)]


def sample_leaves(n, b, c, p):
    return [draw(n, c, seed=1), draw(n, c, p, p, seed=2), draw(b, c, seed=3), draw(b, c, p, p, seed=4),
            draw(n, c, seed=5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_sample_updater_inputs(case, dtype):
    check_against_reference(bu.sample_updater_inputs, reference.sample_updater_inputs, sample_leaves(*case), dtype,
                            exact_forward=True,
                            names=["bank_vectors", "bank_patches", "sample_vectors", "sample_patches", "embedding"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [GATHER_CASES[1], GATHER_CASES[3]])
def test_sample_updater_inputs_from_features(case, dtype):
    b, c, h, w, p, vpos, ppos = case
    vpos, ppos = index(vpos), index(ppos)
    n = 6
    leaves = [draw(b, c, h, w), draw(n, c, seed=1), draw(n, c, p, p, seed=2), draw(n, c, seed=5)]

    def composed(f, bv, bp, emb):
        return reference.sample_updater_inputs(bv, bp, *reference.gather_samples(f, vpos, ppos, p), emb)

    check_against_reference(lambda f, bv, bp, emb: bu.sample_updater_inputs_from_features(f, vpos, ppos, bv, bp, emb),
                            composed, leaves, dtype, exact_forward=True,
                            names=["features", "bank_vectors", "bank_patches", "embedding"])


# ---------------------------------------------------------------------------------------------
# mutual_updater_inputs

# (N, C, p, vector_partner, patch_partner): repeated and missing partners, self-pairs, one entry
# receiving every pair; the patch branch must take the VECTOR partner's embedding.
MUTUAL_CASES = [
    (5, 8, 4, [1, 1, 0, 4, 2], [3, 0, 0, 2, 2]),
    (8, 64, 4, [7, 7, 7, 7, 7, 7, 7, 7], [0, 1, 2, 3, 4, 5, 6, 7]),
    (16, 32, 2, [3, 9, 0, 15, 3, 3, 8, 1, 1, 12, 5, 14, 6, 2, 11, 0],
     [2, 2, 14, 7, 7, 0, 9, 9, 13, 1, 4, 6, 10, 3, 15, 5]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MUTUAL_CASES)
def test_mutual_updater_inputs(case, dtype):
    n, c, p, vp, pp = case
    vp, pp = index(vp), index(pp)
    check_against_reference(lambda bv, bp, emb: bu.mutual_updater_inputs(bv, bp, vp, pp, emb),
                            lambda bv, bp, emb: reference.mutual_updater_inputs(bv, bp, vp, pp, emb),
                            [draw(n, c, seed=1), draw(n, c, p, p, seed=2), draw(n, c, seed=5)], dtype,
                            exact_forward=True, names=["bank_vectors", "bank_patches", "embedding"])


# ---------------------------------------------------------------------------------------------
# batch_mean_layer_norm

# (N, B, normalised shape)
NORM_CASES = [(16, 1, (32,)), (8, 3, (64,)), (16, 3, (32, 4, 4)), (5, 3, (12, 3, 3))]


def all_reduce_stand_in(mean: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for DDP's average over ranks (any affine map shows the call order)."""
    return 0.5 * mean + 0.25


@pytest.mark.parametrize("reduce", [None, all_reduce_stand_in], ids=["fused", "all_reduce"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES)
def test_batch_mean_layer_norm(case, dtype, reduce):
    n, b, shape = case
    leaves = [draw(n * b, *shape, seed=1), 1 + 0.1 * draw(*shape, seed=2), 0.1 * draw(*shape, seed=3)]
    check_against_reference(lambda u, w, bias: bu.batch_mean_layer_norm(u, b, (w, bias), reduce),
                            lambda u, w, bias: reference.batch_mean_layer_norm(u, b, (w, bias), reduce),
                            leaves, dtype, exact_forward=False, names=["updates", "weight", "bias"])


# Retinexformer's bottleneck (C=160) and first level (C=40), patch sizes 4 and 2, banks of 16 and 8: every
# bank-update op, forward and backward, in float64 and float32 (not powers of two: masked channel blocks).
PLUGIN_CASES = [(16, 2, 160, 4), (8, 3, 40, 4), (16, 2, 40, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", PLUGIN_CASES, ids=lambda c: f"N={c[0]},C={c[2]},p={c[3]}")
def test_any_channel_count(case, dtype):
    n, b, c, p = case
    h, w = 3 * p, 2 * p + 1
    vpos, ppos = index((h - 1, 1)), index((p - 1, p + 1))
    names = ["features", "bank_vectors", "bank_patches", "embedding"]

    def composed(f, bv, bp, emb):
        return reference.sample_updater_inputs(bv, bp, *reference.gather_samples(f, vpos, ppos, p), emb)

    check_against_reference(lambda f, bv, bp, emb: bu.sample_updater_inputs_from_features(f, vpos, ppos, bv, bp, emb),
                            composed, [draw(b, c, h, w), draw(n, c, seed=1), draw(n, c, p, p, seed=2),
                                       draw(n, c, seed=5)], dtype, exact_forward=True, names=names)
    partners = [index([(3 * i + 1) % n for i in range(n)]), index([(5 * i + 2) % n for i in range(n)])]
    check_against_reference(lambda bv, bp, emb: bu.mutual_updater_inputs(bv, bp, *partners, emb),
                            lambda bv, bp, emb: reference.mutual_updater_inputs(bv, bp, *partners, emb),
                            [draw(n, c, seed=1), draw(n, c, p, p, seed=2), draw(n, c, seed=5)], dtype,
                            exact_forward=True, names=names[1:])
    for shape in [(c,), (c, p, p)]:
        leaves = [draw(n * b, *shape, seed=1), 1 + 0.1 * draw(*shape, seed=2), 0.1 * draw(*shape, seed=3)]
        check_against_reference(lambda u, wt, bias: bu.batch_mean_layer_norm(u, b, (wt, bias)),
                                lambda u, wt, bias: reference.batch_mean_layer_norm(u, b, (wt, bias)),
                                leaves, dtype, exact_forward=False, names=["updates", "weight", "bias"])


def test_all_reduce_mean_sees_the_batch_mean_once():
    n, b, shape = 4, 3, (8, 2, 2)
    updates = draw(n * b, *shape)
    w = torch.ones(shape, dtype=torch.float64, device=DEVICE)
    bias = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    seen = []

    def record(mean: torch.Tensor) -> torch.Tensor:
        seen.append(mean.clone())
        return mean

    _common.reset_launches()
    bu.batch_mean_layer_norm(updates, b, (w, bias), record)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], reference.batch_mean(updates, b), rtol=1e-12, atol=1e-12)
    assert dict(_common.LAUNCHES) == {"batch_mean": 1, "bank_layer_norm": 1}


def test_all_reduce_mean_gets_the_mean_unrounded():
    updates = draw(6, 8, dtype=torch.bfloat16)
    seen = []
    norm = (torch.ones(8, dtype=torch.bfloat16, device=DEVICE), torch.zeros(8, dtype=torch.bfloat16, device=DEVICE))
    out = bu.batch_mean_layer_norm(updates, 3, norm, lambda m: seen.append(m) or m)
    assert seen[0].dtype == torch.float32 and out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Launches, registration, the LFPV training step


def test_each_op_is_one_launch_forward():
    n, b, c, h, w, p = 4, 3, 8, 6, 6, 4
    f = draw(b, c, h, w)
    pos = index([1, 2])
    bv, bp, sv, sp, emb = sample_leaves(n, b, c, p)
    partners = index([1, 2, 3, 0])
    _common.reset_launches()
    bu.gather_samples(f, pos, pos, p)
    bu.sample_updater_inputs(bv, bp, sv, sp, emb)
    bu.sample_updater_inputs_from_features(f, pos, pos, bv, bp, emb)
    bu.mutual_updater_inputs(bv, bp, partners, partners, emb)
    norm = (torch.ones(c, dtype=torch.float64, device=DEVICE), torch.zeros(c, dtype=torch.float64, device=DEVICE))
    bu.batch_mean_layer_norm(draw(n * b, c), b, norm)
    assert dict(_common.LAUNCHES) == {"gather_samples": 1, "sample_updater_inputs": 2, "mutual_updater_inputs": 1,
                                      "batch_mean_layer_norm": 1}


def test_backward_launches():
    n, b, c, h, w, p = 4, 3, 8, 6, 6, 4
    f = draw(b, c, h, w).requires_grad_(True)
    bv, bp, _, _, emb = (t.requires_grad_(True) for t in sample_leaves(n, b, c, p))
    pos = index([1, 2])
    vin, pin = bu.sample_updater_inputs_from_features(f, pos, pos, bv, bp, emb)
    weight = torch.ones(c, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.zeros(c, dtype=torch.float64, device=DEVICE)
    out = bu.batch_mean_layer_norm(vin.flatten(1)[:, :c], b, (weight, bias))
    _common.reset_launches()
    (out.sum() + pin.sum()).backward()
    assert dict(_common.LAUNCHES) == {"batch_mean_layer_norm_bwd": 1, "sum_rows": 1,
                                      "sample_updater_inputs_bwd": 1, "gather_samples_bwd": 1}


@pytest.mark.parametrize("op, make_args", [
    ("gather_samples", lambda: (draw(2, 8, 5, 6), index([1, 2]), index([0, 3]), 2)),
    ("sample_updater_inputs", lambda: tuple(sample_leaves(4, 3, 8, 2))),
    ("sample_updater_inputs_from_features", lambda: (draw(3, 8, 5, 6), index([1, 2]), index([0, 3]),
                                                     *sample_leaves(4, 3, 8, 2)[:2], draw(4, 8))),
    ("mutual_updater_inputs", lambda: (*sample_leaves(4, 3, 8, 2)[:2], index([1, 1, 3, 0]),
                                       index([2, 0, 0, 1]), draw(4, 8))),
    ("batch_mean_layer_norm", lambda: (draw(12, 8, 2, 2), 3, draw(8, 2, 2), draw(8, 2, 2), 1e-5, torch.float64)),
    ("batch_mean", lambda: (draw(12, 8, 2, 2), 3)),
    ("bank_layer_norm", lambda: (draw(4, 8, 2, 2), draw(8, 2, 2), draw(8, 2, 2), 1e-5, torch.float64)),
])
def test_registered_custom_ops(op, make_args):
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in make_args())
    # The AOT-dispatch check needs compiled Triton kernels in a traced graph: GPU only.
    torch.library.opcheck(getattr(torch.ops.lfpv, op).default, args,
                          test_utils=["test_schema", "test_autograd_registration", "test_faketensor"])


def test_lfpv_training_step_matches_reference():
    """Sample- and mutual-update then query-and-fusion, as LFPVModule runs them, through each backend."""
    from types import SimpleNamespace

    from lfpv_fast.kernels.query_fusion import query_fusion
    from lfpv_fast.model import BankDraws, LFPVModule, ModelConfig

    # The ops LFPVModule uses, straight from this op's modules (independent of the other kernels).
    triton_ops = SimpleNamespace(gather_samples=bu.gather_samples, sample_updater_inputs=bu.sample_updater_inputs,
                                 sample_updater_inputs_from_features=bu.sample_updater_inputs_from_features,
                                 mutual_updater_inputs=bu.mutual_updater_inputs,
                                 batch_mean_layer_norm=bu.batch_mean_layer_norm, query_fusion=query_fusion)

    cfg = ModelConfig(nf=8, bank_size=4, patch_size=4, updater_width=1)
    torch.manual_seed(0)
    module = LFPVModule(cfg).double().to(DEVICE)
    features = draw(3, 8, 8, 12, seed=1)
    bank_vectors, bank_patches = draw(4, 8, seed=2), draw(4, 8, 4, 4, seed=3)
    draws = BankDraws(index([7, 11]), index([4, 8]), index([1, 0, 0, 2]), index([3, 3, 1, 0]))
    weights = draw(3, 8, 8, 12, seed=4)

    def step(ops):
        f = features.clone().requires_grad_(True)
        vectors, patches = module.update_banks(f, bank_vectors, bank_patches, draws, ops)
        out = module.fuse(f, vectors, patches, ops)
        params = list(module.parameters())
        grads = torch.autograd.grad((out * weights).sum(), [f, *params])
        return out, vectors, patches, grads

    ref = step(reference)
    fast = step(triton_ops)
    for what, a, r in zip(["output", "bank vectors", "bank patches"], fast[:3], ref[:3], strict=True):
        assert_close(a, r, REL[torch.float64], ULP[torch.float64], what=what)
    names = ["features"] + [name for name, _ in module.named_parameters()]
    truth = dict(zip(names, ref[3], strict=True))
    overall = max(float(t.abs().max()) for t in truth.values())
    for name, a in zip(names, fast[3], strict=True):
        if truth[name].abs().max() <= REL[torch.float64] * overall:
            # A gradient that is exactly 0 (only rounding noise in the reference): biases that a
            # train-mode BatchNorm removes, e.g. the updater convs' and the sample-updater norms'.
            assert a.abs().max() <= REL[torch.float64] * overall, f"grad {name} should be 0"
        else:
            assert_close(a, truth[name], REL[torch.float64], ULP[torch.float64], what=f"grad {name}")
