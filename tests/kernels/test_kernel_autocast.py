"""The Triton ops under autocast (bf16 and fp16) against their reference twins under the same autocast.

Autocast makes mixes of dtypes that no plain-dtype test sees: 16-bit features, q/k/v and updater outputs
beside float32 banks, LayerNorm weights and embeddings. Each op must give the dtypes the reference
gives under the same autocast (outputs, gradients, and the banks an update returns), and values at
least as close to the float64 truth of the same inputs as 16-bit rounding allows: the kernels compute
in float32 and round once, where the reference under autocast rounds its matmul inputs to 16 bits.

On the CPU this runs CPU autocast through the interpreter; on a GPU, CUDA autocast, whose rules differ
(CUDA autocast runs LayerNorm and softmax in float32): the dtypes are compared with the reference's on
the same device, so each device checks its own rules.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import DEVICE, assert_close
from lfpv_fast.kernels import ops
from lfpv_fast.model import BankDraws, LFPVModule, LFPVNet, ModelConfig
from lfpv_fast.ops import reference

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def autocast(dtype: torch.dtype):
    return torch.autocast(DEVICE, dtype=dtype)


def draw_scaled(*size, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*size, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)


def out_and_grads(fn, leaves: list[torch.Tensor], dtype: torch.dtype | None, seed: int = 9):
    """fn(*leaves) under autocast(dtype) (None: no autocast), and the grads of a weighted sum of its
    output with respect to every leaf."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    with autocast(dtype) if dtype is not None else torch.autocast(DEVICE, enabled=False):
        out = fn(*leaves)
    weights = draw_scaled(*out.shape, seed=seed, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), leaves)
    return out, grads


# ---------------------------------------------------------------------------------------------


def query_fusion_leaves(dtype: torch.dtype, c: int = 16) -> list[torch.Tensor]:
    """16-bit features (a conv output under autocast), float32 banks and LayerNorm parameters."""
    b, n, p = 2, 16, 4
    h, w = (8, 12) if c <= 64 else (4, 8)  # fewer pixels at wide C: seconds under the interpreter
    d = c * p * p
    leaves = [draw_scaled(b, c, h, w, seed=1, dtype=dtype), draw_scaled(n, c, seed=2), draw_scaled(n, c, p, p, seed=3)]
    for i, dim in enumerate((c, c, d, d)):
        leaves += [(1 + 0.1 * draw_scaled(dim, seed=10 + i)) * dim ** -0.25, 0.1 * draw_scaled(dim, seed=20 + i)]
    return leaves


def query_fusion_with(op_set):
    def fn(f, bv, bp, *norms):
        return op_set.query_fusion(f, bv, bp, *zip(norms[::2], norms[1::2], strict=True))
    return fn


# C=16: the demo model; 160 and 40: Retinexformer's bottleneck and first level (issue 22), bf16 only.
@pytest.mark.parametrize("dtype, channels", [*((d, 16) for d in AUTOCAST_DTYPES), (torch.bfloat16, 160),
                                             (torch.bfloat16, 40)], ids=lambda v: str(v))
def test_query_fusion(dtype, channels):
    leaves = query_fusion_leaves(dtype, channels)
    out, grads = out_and_grads(query_fusion_with(ops), leaves, dtype)
    ref_out, ref_grads = out_and_grads(query_fusion_with(reference), leaves, dtype)
    truth, truth_grads = out_and_grads(query_fusion_with(reference), [t.double() for t in leaves], None)
    assert out.dtype == ref_out.dtype == dtype
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] == [t.dtype for t in leaves]
    # One rounding of a float32 result to the 16-bit output (the interpreter truncates: up to 1 ulp).
    assert_close(out, truth, 1 * ULP[dtype], what="output")
    for i, (g, t) in enumerate(zip(grads, truth_grads, strict=True)):
        # The key LayerNorms' biases (leaves 6 and 10) shift all scores of a query alike: their true
        # gradient is 0, so they are held to the scale of their weights' gradients (leaves 5 and 9).
        scale = truth_grads[i - 1].abs().max().item() if i in (6, 10) else None
        assert_close(g, t, 1 * ULP[dtype], what=f"grad {i}", scale=scale)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("leaf_dtype", [torch.float32, "autocast"], ids=["float32 q/k/v", "16-bit q/k/v"])
def test_masked_attention(dtype, leaf_dtype):
    """float32 q, k, v are cast to the autocast dtype as the reference's matmuls cast them; the result
    has that dtype and the gradients their leaves'."""
    leaf_dtype = dtype if leaf_dtype == "autocast" else leaf_dtype
    b, h, length, d = 2, 2, 70, 64
    leaves = [draw_scaled(b, h, length, d, seed=s, dtype=leaf_dtype) for s in (1, 2, 3)]
    keep = torch.rand(b, length, generator=torch.Generator().manual_seed(4)) > 0.4
    keep[0] = False  # a row that keeps no key: uniform weights
    keep = keep.to(DEVICE)
    out, grads = out_and_grads(lambda q, k, v: ops.masked_attention(q, k, v, keep), leaves, dtype)
    rounded = [t.to(dtype).double() for t in leaves]
    truth, truth_grads = out_and_grads(lambda q, k, v: reference.masked_attention(q, k, v, keep), rounded, None)
    if dtype == torch.bfloat16:  # in fp16 the reference's masked_fill(-1e9) overflows half and raises
        ref_out, ref_grads = out_and_grads(lambda q, k, v: reference.masked_attention(q, k, v, keep), leaves, dtype)
        assert out.dtype == ref_out.dtype
        assert [g.dtype for g in grads] == [g.dtype for g in ref_grads]
    assert out.dtype == dtype and [g.dtype for g in grads] == [leaf_dtype] * 3
    # as tests/kernels/test_kernel_masked_attention.py: 5 ulps out, 10 for gradients (16-bit P and dS)
    assert_close(out, truth, 5 * 2 * ULP[dtype], what="output")
    for name, g, t in zip("qkv", grads, truth_grads, strict=True):
        assert_close(g, t, 10 * 2 * ULP[dtype], what=f"d{name}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_snr_mask(dtype):
    """The map of a float32 batch stays float32 under autocast, on both backends."""
    x = draw_scaled(2, 3, 17, 33, seed=5).abs().clamp(max=1)
    with autocast(dtype):
        out = ops.snr_mask(x)
        expected = reference.snr_mask(x)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# Not helpers.TINY (8 channels, updater width 4): test_bank_update's bounds come from measurements of this model.
def small_model_config(nf: int = 16) -> ModelConfig:
    return ModelConfig(nf=nf, light_blocks=1, layers=1, heads=2, head_dim=16, ffn_dim=32, bank_size=16,
                       updater_width=1)


def update_banks_and_sample_banks(module: LFPVModule, op_set, dtype: torch.dtype | None, *args):
    """module.update_banks(*args, op_set) under autocast(dtype) (None: no autocast), and the banks the
    sample-updater made (the first C channels of the mutual-updater MLPs' inputs): the new banks, then those."""
    sample_banks = []
    mlps = (module.mutual_vector_mlp, module.mutual_patch_mlp)

    def keep_own_entry(_, inputs):  # the inputs are [entry, partner, embedding, partner's embedding]
        sample_banks.append(inputs[0][:, :inputs[0].shape[1] // 4])

    hooks = [mlp.register_forward_pre_hook(keep_own_entry) for mlp in mlps]
    try:
        with autocast(dtype) if dtype is not None else torch.autocast(DEVICE, enabled=False):
            new_banks = module.update_banks(*args, op_set)
    finally:
        for hook in hooks:
            hook.remove()
    return new_banks, sample_banks


# C=16: the demo model; 160 and 40: Retinexformer's bottleneck and first level (issue 22), bf16 only.
@pytest.mark.parametrize("dtype, channels", [*((d, 16) for d in AUTOCAST_DTYPES), (torch.bfloat16, 160),
                                             (torch.bfloat16, 40)], ids=lambda v: str(v))
def test_bank_update(dtype, channels):
    """The sample- and mutual-updaters with 16-bit features and float32 banks: both backends return new
    banks of the same dtype (the reference's LayerNorm decides it: the MLP output's dtype under CPU
    autocast, float32 under CUDA autocast), and values as close to the float64 truth as the reference's.

    The kernels compute in the sample-updater's batch-mean LayerNorm: there the backends differ by where
    they round (the reference rounds the batch mean to 16 bits, the kernel keeps it in float32; the
    interpreter truncates its 16-bit store), about one rounding (bf16, C=16, 300 module seeds: at most
    1.0 ulp of the banks' scale for vectors, 1.16 for patches, where each backend is up to 5.0 and 2.2
    ulps from float64): held to 2 ulps. The mutual-updater then runs those banks through seven 16-bit
    convs, each followed by train-mode BatchNorm (batch statistics of only 16 bank entries, recomputed
    from the slightly different inputs) and re-rounded, and a LayerNorm per entry, which divides an entry
    by its own spread (entries spread 5-20x less than the tensor's largest value occur): a 1-ulp
    difference at its input comes out at up to 30 ulps of the new vectors' scale. E.g. module seed 164:
    entry 4's LayerNorm input has std 0.21 against the tensor's max 1.38; the backends' inputs there
    differ by 0.048 (4.4 ulps of 1.38), their outputs by 0.24 against the old bound 8 ulps x 2.34 = 0.146
    (the flake, 0.22 > 0.14); the reference itself is 13.6 ulps from float64 there, the kernel 13.8.
    Over 500 module seeds (bf16, C=16, these inputs), in ulps of the new vectors' scale: the kernel
    against the reference median 4.4, p99 14, max 30 (the old 8-ulp bound failed 10% of seeds); the
    reference against float64 median 8.1, p99 28, max 40; the kernel against float64 median 8.0, p99
    28.5, max 39. So the new banks are held to the float64 truth: the kernel's error at most 4x the
    reference's own (the ratio over those seeds: median 1.0, p99 2.2, max 2.9 for vectors; max 1.6 for
    patches; 1.14 and 1.06 at seed 0)."""
    cfg = small_model_config(channels)
    with torch.random.fork_rng(devices=[]):  # the weights of seed 0, whatever ran before
        torch.manual_seed(0)
        module = LFPVModule(cfg).to(DEVICE).train()
    features = draw_scaled(3, cfg.nf, 12, 16, seed=6, dtype=dtype)
    banks = draw_scaled(cfg.bank_size, cfg.nf, seed=7), draw_scaled(cfg.bank_size, cfg.nf, 4, 4, seed=8)
    draws = BankDraws.sample((12, 16), cfg.bank_size, cfg.patch_size, torch.Generator().manual_seed(0)).to(DEVICE)

    new_banks, sample_banks = update_banks_and_sample_banks(module, ops, dtype, features, *banks, draws)
    ref_banks, ref_sample_banks = update_banks_and_sample_banks(module, reference, dtype, features, *banks, draws)
    with torch.no_grad():
        truth_banks, _ = update_banks_and_sample_banks(copy.deepcopy(module).double(), reference, None,
                                                       features.double(), *(b.double() for b in banks), draws)
    assert [t.dtype for t in new_banks] == [t.dtype for t in ref_banks]
    for what, kernel, ref in zip(("vectors", "patches"), sample_banks, ref_sample_banks, strict=True):
        assert_close(kernel, ref, 2 * ULP[dtype], what=f"sample-updater {what}")
    for what, kernel, ref, truth in zip(("vectors", "patches"), new_banks, ref_banks, truth_banks, strict=True):
        kernel_error = (kernel.double() - truth).abs().max().item()
        ref_error = (ref.double() - truth).abs().max().item()
        assert kernel_error <= 4 * ref_error, (f"new {what}: {kernel_error:.3e} from float64, more than 4x the "
                                               f"reference's {ref_error:.3e}")
    vectors, patches = new_banks
    (vectors.float().sum() + patches.float().sum()).backward()  # the backward kernels take the mix too


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_model_training_step(dtype):
    """A whole training forward and backward of a small model through the Triton ops under autocast:
    outputs of the reference's dtypes, finite gradients, banks replaced. (Under fp16 autocast the
    reference cannot run, as the published code cannot: its masked_fill(-1e9) overflows half.)"""
    results = {}
    for backend in ("triton", "reference") if dtype == torch.bfloat16 else ("triton",):
        torch.manual_seed(0)
        net = LFPVNet(small_model_config(), backend=backend).to(DEVICE).train()
        x = draw_scaled(2, 3, 32, 32, seed=9).abs().clamp(max=1)
        draws = BankDraws.sample((8, 8), 16, 4, torch.Generator().manual_seed(1))
        with autocast(dtype):
            out, without_lfpv = net(x, net.snr_mask(x), draws)
        (out.float().mean() + without_lfpv.float().mean()).backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None), backend
        results[backend] = (out.dtype, without_lfpv.dtype, net.bank_vectors.clone())
    # The decoder adds the float32 input to its last (16-bit) conv: float32 outputs.
    assert results["triton"][:2] == results.get("reference", (torch.float32, torch.float32))[:2]
    assert not torch.equal(results["triton"][2], torch.zeros_like(results["triton"][2]))
