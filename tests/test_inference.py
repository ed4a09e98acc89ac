"""Exact whole-image inference, the whole-or-tiles plan, and the precision/compile switches of the tools."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY
from lfpv_fast import LFPVNet
from lfpv_fast.enhance import enhance_image, main, parse_size, plan_enhancement
from lfpv_fast.inference.whole_image import (
    check_precision,
    estimate_peak_bytes,
    prepare_for_inference,
    whole_image_forward,
)
from lfpv_fast.training.checkpoint import atomic_save, weights_only_checkpoint


def random_bank_net(backend: str) -> LFPVNet:
    torch.manual_seed(0)
    net = LFPVNet(TINY, backend=backend).eval()
    with torch.no_grad():  # non-zero banks, so that the LFPV fusion takes part
        net.bank_vectors.normal_()
        net.bank_patches.normal_()
    return net


def dark_input(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(1, 3, h, w, generator=g)
    x[:, :, : h // 2, : w // 3] = 0.1  # flat: a high SNR there, so the attention keeps some keys
    return x


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("size", [(96, 160), (70, 99)])
def test_whole_image_forward_is_the_forward(backend, size):
    """Strips with real-data halos give the whole-image convs' rows: the same output as net(x, snr)."""
    net = random_bank_net(backend)
    x = torch.cat([dark_input(*size, seed=1), dark_input(*size, seed=2)])
    snr = net.snr_mask(x)
    with torch.no_grad():
        expected = net(x, snr)
    for strip_rows in (16, 32, 4096):
        torch.testing.assert_close(whole_image_forward(net, x, snr, strip_rows=strip_rows), expected,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("prepared", [False, True], ids=["nchw", "as-the-cli-runs-it"])
def test_untiled_enhance_equals_the_reference_forward_of_the_whole_image(prepared):
    """backend auto (memory-linear attention, strips; channels_last as the CLI prepares it) against the
    plain reference forward of the whole image."""
    reference_net, auto_net = random_bank_net("reference"), random_bank_net("auto")
    if prepared:
        prepare_for_inference(auto_net, torch.device("cpu"))
        assert auto_net.backbone.encoder.conv_full.weight.is_contiguous(memory_format=torch.channels_last)
    x = dark_input(208, 320)
    snr = reference_net.snr_mask(x)
    with torch.no_grad():
        expected = reference_net(x, snr).clamp(0, 1)
    plan = plan_enhancement(auto_net, 1, 208, 320, max_memory=2**30)
    assert not plan.tiled and "whole image" in plan.describe()
    got = enhance_image(auto_net, x, plan=plan)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_plan_tiles_only_when_the_whole_image_does_not_fit():
    from lfpv_fast.inference.enhancement import STRIP_SETTINGS

    net = random_bank_net("auto")
    need = estimate_peak_bytes(TINY, 1, 600, 800).total
    plan = plan_enhancement(net, 1, 600, 800, max_memory=need)
    assert not plan.tiled and (plan.strip_rows, plan.low_memory) == STRIP_SETTINGS[0]
    # Below the default strips' estimate: still the whole image, in smaller strips, while one fits.
    leanest = min(estimate_peak_bytes(TINY, 1, 600, 800, strip_rows=rows, low_memory=low).total
                  for rows, low in STRIP_SETTINGS)
    assert leanest < need
    smaller = plan_enhancement(net, 1, 600, 800, max_memory=need - 1)
    assert not smaller.tiled and smaller.strip_rows < STRIP_SETTINGS[0][0]
    tight = plan_enhancement(net, 1, 600, 800, max_memory=leanest - 1)
    assert tight.tiled and "more than" in tight.reason and tight.tile in (256, 512, 1024)
    assert plan_enhancement(net, 1, 600, 800, tile=256).tiled
    assert not plan_enhancement(net, 1, 200, 200, tile=256).tiled  # fits one tile
    assert plan_enhancement(net, 1, 600, 800, max_pixels=1000).tiled
    # Linear in the pixels with a memory-linear attention; the reference op's L x L scores are not.
    one, two, three = (estimate_peak_bytes(TINY, 1, 1024 * k, 1024).whole_image for k in (1, 2, 3))
    assert three - two == pytest.approx(two - one, rel=1e-6) and two < 2 * one
    quadratic = (estimate_peak_bytes(TINY, 1, 1024 * k, 1024, linear_attention=False).attention for k in (1, 2, 3))
    q1, q2, q3 = quadratic
    assert q3 - q2 > 1.5 * (q2 - q1)
    assert "reference" in plan_enhancement(random_bank_net("reference"), 1, 4000, 3000, max_memory=2**31).reason


def test_parse_size():
    assert parse_size("6G") == 6 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("1000") == 1000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    for bad in ("", "-1G", "six", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    atomic_save(weights_only_checkpoint(random_bank_net("auto")), path)
    return path


def test_cli_says_whole_or_tiled(tmp_path, checkpoint, capsys):
    pixels = (dark_input(120, 200)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert main([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "-o", str(tmp_path / "w")]) == 0
    assert "whole image, untiled" in capsys.readouterr().err
    assert main([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "-o", str(tmp_path / "t"),
                 "--max-memory", "1K", "--tile-overlap", "16"]) == 0
    err = capsys.readouterr().err
    assert "tiled" in err and "--max-memory" in err
    whole = np.asarray(Image.open(tmp_path / "w" / "a.png"))
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    net = prepare_for_inference(random_bank_net("auto"), torch.device("cpu"))  # as the CLI runs it
    expected = np.round(enhance_image(net, x, max_memory=2**30).permute(1, 2, 0).numpy() * 255)
    np.testing.assert_array_equal(whole, expected)


def test_cpu_precision_refused_where_slower(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="slower than fp32"):
        check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "-o", str(tmp_path / "o"),
              "--precision", "bf16"])
    assert exit_info.value.code == 2 and "slower than fp32" in capsys.readouterr().err
    assert not (tmp_path / "o" / "a.png").exists()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    check_precision("bf16", torch.device("cpu"))


def test_bf16_enhance_is_close_to_fp32():
    net = random_bank_net("auto")
    x = dark_input(64, 96)
    fp32 = enhance_image(net, x)
    bf16 = enhance_image(net, x, precision="bf16")
    assert bf16.dtype == torch.float32
    mse = float(((bf16 - fp32) ** 2).mean())
    assert 0 < mse and 10 * np.log10(1 / mse) > 30  # bf16 differs, but not by much


def test_enhance_compile_gives_the_eager_result(tmp_path, checkpoint, monkeypatch):
    # Inductor's C++ compile takes minutes on 2 shared cores: the plumbing is checked through aot_eager.
    compiled_calls = []
    real_compile = torch.compile

    def aot_eager_compile(fn, **kwargs):
        compiled_calls.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    pixels = (dark_input(48, 64)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        assert main([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "-o", str(tmp_path / name), "-q",
                     *extra]) == 0
    assert len(compiled_calls) == 3  # the three stages of whole_image_forward
    eager = np.asarray(Image.open(tmp_path / "eager" / "a.png")).astype(int)
    compiled = np.asarray(Image.open(tmp_path / "compiled" / "a.png")).astype(int)
    assert np.abs(eager - compiled).max() <= 1  # fused kernels round differently, by at most one level


def test_evaluate_refuses_a_slower_cpu_precision(checkpoint, capsys, monkeypatch):
    from lfpv_fast.evaluate import main as evaluate_main

    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    assert evaluate_main(["-c", "demo", "--checkpoint", str(checkpoint), "--device", "cpu",
                          "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --precision fp16 on this CPU would be slower than fp32")
