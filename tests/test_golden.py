"""Parity with the published code: the golden case (tests/data/model_case.pt), in float64.

Tolerances are the golden README's: relative L2 error below 1e-9 on outputs, banks and the SNR map,
1e-8 on dL/dx and 1e-7 on the per-parameter gradient fingerprints.
"""

from __future__ import annotations

import pytest
import torch

from golden import fingerprint, golden_draws, golden_net, load_case, rel_err
from lfpv_fast import snr_mask
from lfpv_fast.ops.reference import box_blur5


@pytest.fixture(scope="module")
def case() -> dict:
    return load_case()


def run_training_step(net, case):
    """One training forward with the recorded draws and the golden loss; returns outputs and x."""
    net.train()
    x = case["input"].clone().requires_grad_(True)
    out, without_lfpv = net(x, case["net_mask"], golden_draws(case))
    n = out.numel()
    w1 = torch.sin(torch.arange(n, dtype=torch.float64)).reshape(out.shape).to(out.device)
    w2 = torch.cos(torch.arange(n, dtype=torch.float64)).reshape(out.shape).to(out.device)
    ((out * w1).sum() + (without_lfpv * w2).sum()).backward()
    return out, without_lfpv, x


def check_golden_training(net, case) -> None:
    assert rel_err(net.bank_vectors, case["train_bank_vectors_before"]) == 0
    out, without_lfpv, x = run_training_step(net, case)
    assert rel_err(out, case["train_output"]) < 1e-9
    assert rel_err(without_lfpv, case["train_output_no_lfpv"]) < 1e-9
    assert rel_err(net.bank_vectors, case["train_bank_vectors_after"]) < 1e-9
    assert rel_err(net.bank_patches, case["train_bank_patches_after"]) < 1e-9
    assert rel_err(x.grad, case["train_grad_input"]) < 1e-8
    check_fingerprints(net, case["train_grad_fingerprints"])


def check_fingerprints(net, golden: dict) -> None:
    names = net.original_name_map()
    params = dict(net.named_parameters())
    # Every trainable published parameter has a counterpart, except the banks (buffers here).
    assert {names[k] for k in params} == {k for k in golden if not k.startswith("common_feature")}
    norms = torch.stack([v[0] for v in golden.values()])
    typical = norms.median()
    checked_exact = 0
    for ours, p in params.items():
        ref = golden[names[ours]]
        mine = fingerprint(p.grad)
        if ref[0] < 1e-9 * typical:
            # Mathematically zero gradients (biases right before a BatchNorm, LayerNorm biases that
            # only shift softmax scores): both sides hold rounding noise only, so compare sizes.
            assert mine[0] < 1e-9 * typical, f"{ours} ({names[ours]}): expected a zero gradient, got {mine}"
        else:
            assert rel_err(mine, ref) < 1e-7, f"{ours} ({names[ours]}): fingerprint {mine} vs {ref}"
            checked_exact += 1
    assert checked_exact > 180  # the zero-gradient branch must stay the exception


def test_snr_map_matches_published(case):
    assert rel_err(snr_mask(case["input"]), case["snr_mask"]) < 1e-9


def test_blur_is_opencv_reflect101(case):
    assert rel_err(box_blur5(case["input"]), case["blurred_input"]) < 1e-12


def test_eval_output_matches_published(case):
    net = golden_net(case).eval()
    with torch.no_grad():
        out = net(case["input"], case["net_mask"])
    assert out.dtype == torch.float64
    assert rel_err(out, case["eval_output"]) < 1e-9


def test_training_step_matches_published(case):
    check_golden_training(golden_net(case), case)


def test_bias_zero_gradient_rule_is_not_vacuous(case):
    """The fingerprint check must fail when a gradient is wrong (here: scaled by 1 + 1e-5)."""
    net = golden_net(case)
    run_training_step(net, case)
    p = net.backbone.encoder.conv_full.weight
    p.grad.mul_(1 + 1e-5)
    with pytest.raises(AssertionError):
        check_fingerprints(net, case["train_grad_fingerprints"])


def test_triton_backend_matches_published_and_runs_kernels(case):
    """The whole model through the Triton kernels (interpreted on the CPU) passes the golden case."""
    from lfpv_fast.kernels import _common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _common.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    case = {k: v.to(device) if torch.is_tensor(v) else v for k, v in case.items()}
    net = golden_net(case, backend="triton").to(device).eval()
    _common.reset_launches()
    with torch.no_grad():
        out = net(case["input"], case["net_mask"])
        mask = net.snr_mask(case["input"])
    assert rel_err(out, case["eval_output"]) < 1e-9
    assert rel_err(mask, case["snr_mask"]) < 1e-9
    eval_launches = dict(_common.LAUNCHES)
    # Query-and-fusion once, masked attention once per transformer layer, the SNR map in two launches.
    assert sum(n for k, n in eval_launches.items() if "attention" in k) >= net.config.layers
    assert any("fusion" in k for k in eval_launches), eval_launches
    assert sum(n for k, n in eval_launches.items() if "snr" in k) <= 2

    _common.reset_launches()
    check_golden_training(net, case)
    names = " ".join(_common.LAUNCHES)
    assert "bank" in names or "sample" in names or "gather" in names, _common.LAUNCHES
