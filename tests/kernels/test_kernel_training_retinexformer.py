"""A training step of Retinexformer + LFPVs with train.backend=triton runs the fused kernels (the IG-MSA of
every transformer block, forward and backward, and the LFPV ops), and its loss and gradients equal those of
train.backend=reference.

The step is the trainer's own (`Trainer.train_step`: forward in training mode, the loss on both outputs,
backward, Adam) on a tiny network (n_feat 8, one block per level, LFPVs with 4 bank entries of 2x2 patches at the
bottleneck) and a batch of two 16x16 crops: seconds under the Triton interpreter.

Float64 (the trainer's network and batch cast to float64 after it is built): the interpreter's float64 is exact
IEEE arithmetic, so the two backends differ only by the order of the sums (measured: loss bit-identical, every
gradient within 3e-13 of its tensor's largest value). Tolerance per gradient tensor: 1e-9 of its largest value.
Except for the parameters whose gradient is zero in exact arithmetic (the biases of the convolutions in front of
the updaters' BatchNorms; the key LayerNorms' biases, which shift every score of a softmax row alike): theirs is
rounding noise of the gradients that flow past them (measured <= 1e-17 of the network's largest gradient), so no
relative bound holds; they are held to 1e-12 of the largest gradient. A wrong kernel gradient is off by far more
than 1e-9 (a wrong scale, norm or softmax term: >= 1e-3; checked: the IG-MSA backward's dq scaled by 1 + 1e-6
fails it).
"""

from __future__ import annotations

from collections import Counter

import torch

from helpers import DEVICE
from lfpv_fast.config import load_config
from lfpv_fast.kernels import _common
from lfpv_fast.ops import reference
from lfpv_fast.training.trainer import Trainer

BATCH, CROP = 2, 16
# Below this fraction of the network's largest gradient, a gradient tensor is zero in exact arithmetic (measured:
# those are <= 1e-17 of it; the smallest real one, an attention temperature's, is 1.7e-7 of it).
ZERO_GRADIENT = 1e-12
OVERRIDES = ["model.options.n_feat=8", "model.options.num_blocks=[1, 1, 1]", "model.lfpv.bank_size=4",
             "model.lfpv.patch_size=2", "model.lfpv.updater_width=8", "model.lfpv.site=bottleneck",
             f"data.batch_size={BATCH}", f"data.crop={CROP}", f"train.device={DEVICE}", "train.compile=off",
             "train.bf16=off", "train.fused_adam=off", "train.cuda_graphs=false", "train.perceptual_weight=0",
             "logging.progress=false", "logging.tensorboard=false", "data.num_workers=0"]
# IG-MSA calls of one training forward: encode to the bottleneck (level 1, level 2, bottleneck: one block each),
# then the decoder twice (the output without the LFPV fusion and the fused one), two levels of one block each.
IG_MSA_CALLS = 3 + 2 * 2
IG_MSA_KERNELS = ("ig_msa_gram", "ig_msa_attention", "ig_msa_apply",  # forward
                  "ig_msa_bwd_reduce", "ig_msa_bwd_stats", "ig_msa_bwd_apply")  # backward
# The LFPV ops of one training step (kernels/ops.py), forward then backward: query-and-fusion once (its keys for the
# vector and the patch bank), the sample-updater's inputs once and its two batch-mean layer norms (vectors and
# patches), the mutual-updater's inputs once; the backward of each (sum_rows: the layer norms' and the fusion's
# parameter gradients summed over rows).
LFPV_KERNELS = {"query_fusion_keys": 2, "query_fusion_fwd": 1, "sample_updater_inputs": 1,
                "batch_mean_layer_norm": 2, "mutual_updater_inputs": 1,
                "query_fusion_bwd_pixel": 1, "query_fusion_bwd_patch": 1, "query_fusion_bwd_patch_params": 1,
                "query_fusion_keys_bwd": 1, "sum_rows": 4, "mutual_updater_inputs_bwd": 1,
                "batch_mean_layer_norm_bwd": 2, "sample_updater_inputs_bwd": 1, "gather_samples_bwd": 1}


def one_step(backend: str, tmp_path, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Trainer.train_step in float64: the loss it returns and the gradients Adam stepped on."""
    cfg = load_config("demo_retinexformer", [*OVERRIDES, f"train.backend={backend}"])
    trainer = Trainer(cfg, tmp_path / backend, train_loader=[batch], val_loader=[batch])
    try:
        assert trainer.features.backend == backend
        trainer.net.double()  # in place: the optimizer holds the same parameters
        grads: dict[str, torch.Tensor] = {}

        def keep_gradients(_optimizer, _args, _kwargs) -> None:
            grads.update({n: p.grad.clone() for n, p in trainer.net.named_parameters() if p.grad is not None})

        trainer.optimizer.register_step_pre_hook(keep_gradients)
        loss = trainer.train_step(batch)
        assert trainer.applied_steps == 1
        return loss.detach(), grads
    finally:
        trainer.close()


def test_retinexformer_lfpv_training_step_runs_the_triton_kernels_and_matches_reference(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    batch = {"lq": (0.2 * torch.rand(BATCH, 3, CROP, CROP, generator=gen)).double().to(DEVICE),
             "gt": torch.rand(BATCH, 3, CROP, CROP, generator=gen).double().to(DEVICE)}

    reference_calls = Counter()
    reference_ig_msa = reference.ig_msa

    def counted_ig_msa(*args, **kwargs):
        reference_calls["ig_msa"] += 1
        return reference_ig_msa(*args, **kwargs)

    monkeypatch.setattr(reference, "ig_msa", counted_ig_msa)  # what Retinexformer calls with backend reference
    ref_loss, ref_grads = one_step("reference", tmp_path, batch)
    assert reference_calls["ig_msa"] == IG_MSA_CALLS and not _common.LAUNCHES

    _common.reset_launches()
    loss, grads = one_step("triton", tmp_path, batch)
    assert reference_calls["ig_msa"] == IG_MSA_CALLS  # the Triton run never fell back to the reference twin
    expected = {name: IG_MSA_CALLS for name in IG_MSA_KERNELS} | LFPV_KERNELS
    assert dict(_common.LAUNCHES) == expected

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys()
    largest = max(g.abs().max().item() for g in ref_grads.values())
    zero_in_exact_arithmetic = []
    for name, ref in ref_grads.items():
        error = (grads[name] - ref).abs().max().item()
        scale = ref.abs().max().item()
        if scale < ZERO_GRADIENT * largest:
            zero_in_exact_arithmetic.append(name)
            assert error <= ZERO_GRADIENT * largest, f"{name}: max |triton - reference| {error:.3g} (a zero gradient)"
        else:
            assert error <= 1e-9 * scale, f"{name}: max |triton - reference| {error:.3g} > 1e-9 * {scale:.3g}"
    # Only LFPV parameters have zero gradients (updater biases in front of BatchNorms, key norm biases); every
    # backbone parameter, the attention's temperatures included, got a real gradient through the kernels.
    assert zero_in_exact_arithmetic and all(n.startswith("lfpv.") for n in zero_in_exact_arithmetic)
    assert sum(n.endswith("attention.head_scale") for n in ref_grads) == 5
