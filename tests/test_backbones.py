"""The backbone seam: configs (nested and the first flat format), LFPVNet on Retinexformer with and without
LFPVs, first-format checkpoints, and train -> enhance/evaluate with a Retinexformer checkpoint of each kind
(ours with LFPVs, ours without, and a published BasicSR file)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, assert_one_line_error, run
from lfpv_fast import LFPVNet, ModelConfig
from lfpv_fast import enhance as enhance_cli
from lfpv_fast import evaluate as evaluate_cli
from lfpv_fast import train as train_cli
from lfpv_fast.config import ConfigError, load_config
from lfpv_fast.inference.enhancement import enhance_image, plan_enhancement
from lfpv_fast.models import LFPVConfig, RetinexFormer
from lfpv_fast.models.retinexformer import save_published_checkpoint
from lfpv_fast.training.checkpoint import atomic_save, load_model, upgrade_first_format, weights_only_checkpoint

SMALL_RETINEXFORMER = {"n_feat": 8, "num_blocks": [1, 1, 1]}
# A run of a few seconds: the model keys first (the first 8 items), then the data, train and logging keys.
TRAIN_SMALL = ["--set", "model.options.n_feat=8", "--set", "model.options.num_blocks=[1, 1, 1]",
               "--set", "model.lfpv.bank_size=4", "--set", "model.lfpv.updater_width=16",
               "--set", "data.resize=[64, 48]", "--set", "data.crop=32", "--set", "data.batch_size=2",
               "--set", "data.num_workers=0", "--set", "data.test_frames=1", "--set", "train.iterations=2",
               "--set", "train.checkpoint_every=2", "--set", "val.every=100", "--set", "val.save_images=0",
               "--set", "logging.progress=false", "--set", "logging.tensorboard=false"]


def retinexformer_net(enabled: bool = True, seed: int = 0) -> LFPVNet:
    torch.manual_seed(seed)
    config = ModelConfig("retinexformer", SMALL_RETINEXFORMER, {"enabled": enabled, "bank_size": 4,
                                                                 "updater_width": 16})
    net = LFPVNet(config, backend="reference")
    if enabled:
        with torch.no_grad():
            net.bank_vectors.normal_()
            net.bank_patches.normal_()
    return net


# ---------------------------------------------------------------------------------------------
# Configs


def test_flat_and_nested_model_configs_are_the_same():
    nested = ModelConfig("snr_aware", {"nf": 8, "hr_nf": 8, "light_blocks": 1, "layers": 1, "heads": 2,
                                       "head_dim": 8, "ffn_dim": 32}, {"bank_size": 4})
    assert nested == TINY
    assert TINY.nf == 8 and TINY.bank_size == 4 and TINY.d_model == 8 * 16 and TINY.align == 16
    # The first format's updater_width counted multiples of nf; 4 is the published width (null today).
    assert ModelConfig(nf=8, updater_width=2).lfpv.updater_width == 16
    assert ModelConfig(updater_width=4) == ModelConfig()
    assert dataclasses.replace(TINY, heads=1).options.heads == 1


def test_model_overrides_nested_keys_and_errors():
    cfg = load_config("demo", ["model.lfpv.enabled=false", "model.nf=8"])
    assert not cfg.model.lfpv.enabled and cfg.model.options.nf == 8
    cfg = load_config("demo_retinexformer", ["model.options.n_feat=12", "model.lfpv.site=level2"])
    assert cfg.model.site.channels == 24 and cfg.model.site.stride == 2 and cfg.model.align == 8
    with pytest.raises(ConfigError, match="model.lfpv.site 'nowhere'"):
        load_config("demo_retinexformer", ["model.lfpv.site=nowhere"])
    with pytest.raises(ConfigError, match="unknown key 'n_fet'.*'n_feat'"):
        load_config("demo_retinexformer", ["model.options.n_fet=12"])
    with pytest.raises(ConfigError, match="model.backbone 'resnet'"):
        load_config("demo", ["model.backbone=resnet"])


def test_updater_width_does_not_grow_with_channels():
    def updater_params(n_feat: int) -> int:
        net = LFPVNet(ModelConfig("retinexformer", {"n_feat": n_feat, "num_blocks": [1, 1, 1]},
                                  {"updater_width": 32}), backend="reference")
        return sum(p.numel() for name, p in net.lfpv.named_parameters() if "_mlp." in name)

    small, large = updater_params(8), updater_params(16)
    # Inputs and outputs of the stacks grow with C, the hidden layers (most of the weights) do not.
    assert large < 2 * small


# ---------------------------------------------------------------------------------------------
# The network


def test_retinexformer_backbone_halves_compose_to_the_network():
    net = retinexformer_net(enabled=False).eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(net(x), net.backbone(x))
        net.train()
        out, without = net(x)
    assert without is None and out.shape == x.shape


def test_retinexformer_with_lfpvs_trains_banks_and_fuses_in_eval():
    net = retinexformer_net(enabled=True).train()
    x = torch.rand(2, 3, 32, 32)
    before = net.bank_vectors.clone()
    out, without = net(x)
    (out.sum() + without.sum()).backward()
    assert not torch.equal(before, net.bank_vectors)
    assert net.lfpv.sample_vector_mlp[0].weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        fused = net(x)
        plain = net.backbone(x)
    assert fused.shape == x.shape and not torch.allclose(fused, plain)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_shows_the_example_module_as_it_is():
    """The README's "LFPVs on your own network" code is examples/own_backbone.py, which the tests below run."""
    text = README.read_text()
    section = text[text.index("## LFPVs on your own network"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    assert block[:block.index("```")] == (EXAMPLES / "own_backbone.py").read_text()


def test_lfpvs_attach_to_a_module_of_your_own(monkeypatch):
    """README, "LFPVs on your own network": the example module, attached and trained one step."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from own_backbone import SmallUNet

    net = LFPVNet.attach(SmallUNet(), LFPVConfig(bank_size=4, updater_width=16), backend="reference").train()
    out, without = net(torch.rand(2, 3, 32, 32))
    assert out.shape == without.shape == (2, 3, 32, 32)
    assert net.site.channels == 32 and net.align == 16


def test_train_cli_trains_a_module_of_your_own(monkeypatch, tmp_path):
    """The README's command: python -m lfpv_fast.train with model.backbone=own_backbone:SmallUNet."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    code = train_cli.main(["--config", "configs/demo.yaml", "--set", "model.backbone=own_backbone:SmallUNet",
                           "--set", "model.options.width=8", "--set", "model.lfpv.updater_width=16",
                           "--set", "model.lfpv.bank_size=4", *TRAIN_SMALL[8:],
                           "--set", f"data.demo_root={tmp_path / 'demo'}", "--out", str(tmp_path / "run")])
    assert code == 0
    net = load_model(tmp_path / "run" / "final_weights.pth")
    assert type(net.backbone).__name__ == "SmallUNet" and net.site.channels == 16


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_first_format_checkpoint_loads_as_before(tmp_path):
    """A file written before backbones (flat model_config, encoder.*/decoder.* keys) gives the same network."""
    torch.manual_seed(0)
    net = LFPVNet(TINY, backend="reference").eval()
    state = {k.removeprefix("backbone."): v for k, v in net.state_dict().items()}
    flat = {**dataclasses.asdict(TINY.options), "bank_size": 4, "patch_size": 4, "updater_width": 4}
    atomic_save({"format": "lfpv_fast", "model_config": flat, "model": state}, tmp_path / "old.pth")
    loaded = load_model(tmp_path / "old.pth", backend="reference").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_first_format_optimizer_state_is_renumbered():
    net = LFPVNet(TINY, backend="reference")
    old_names = [k.removeprefix("backbone.") for k, _ in net.named_parameters()]
    group = {"encoder": 0, "lfpv": 1, "decoder": 2}
    old_names.sort(key=lambda k: group[k.split(".")[0]])  # the first format's parameter order
    # ... and state-dict order: the banks, then encoder, lfpv, decoder.
    state = {k.removeprefix("backbone."): v for k, v in net.state_dict().items()}
    state = dict(sorted(state.items(), key=lambda kv: -1 if kv[0].startswith("bank_") else group[kv[0].split(".")[0]]))
    optimizer = {"state": {i: {"exp_avg": torch.full((1,), float(i))} for i in range(len(old_names))},
                 "param_groups": [{"params": list(range(len(old_names)))}]}
    obj = upgrade_first_format({"model_config": {"nf": 8}, "model": state, "optimizer": optimizer})
    new_names = [k for k, _ in net.named_parameters()]
    for i, name in enumerate(old_names):
        j = new_names.index(name if name.startswith("lfpv") else "backbone." + name)
        assert obj["optimizer"]["state"][j]["exp_avg"].item() == i
    assert set(obj["model"]) == set(net.state_dict())


# ---------------------------------------------------------------------------------------------
# The tools with Retinexformer


def test_untiled_backbone_is_refused_when_it_does_not_fit():
    """LFPVs at Retinexformer's level2 site: no strip path there, so whole images run untiled or are refused."""
    torch.manual_seed(0)
    net = LFPVNet(ModelConfig("retinexformer", SMALL_RETINEXFORMER, {"bank_size": 4, "updater_width": 16,
                                                                     "site": "level2"}), backend="reference").eval()
    with pytest.raises(ValueError, match="retinexformer backbone runs a whole image untiled"):
        plan_enhancement(net, 1, 4000, 6000, max_memory=2**30)
    plan = plan_enhancement(net, 1, 64, 64, max_memory=2**30)
    assert not plan.tiled
    image = torch.rand(3, 40, 56)
    with torch.no_grad():
        expected = net(image[None]).clamp(0, 1)[0]
    assert torch.equal(enhance_image(net, image), expected)  # whole image, untiled: exactly the network


def test_retinexformer_whole_image_path_runs_strips_with_the_lfpv_fusion():
    """At the default site the whole-image path is the strip path, the LFPVs fused strip by strip."""
    from lfpv_fast.inference.whole_image import whole_image_forward

    net = retinexformer_net(enabled=True).double().eval()
    x = torch.rand(1, 3, 80, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
        strips = whole_image_forward(net, x, None, strip_rows=16)
        low_memory = whole_image_forward(net, x, None, strip_rows=16, low_memory=True)
    assert (strips - expected).abs().max() < 1e-10
    assert (low_memory - expected).abs().max() < 1e-10
    plain = retinexformer_net(enabled=False).double().eval()
    with torch.no_grad():
        assert (whole_image_forward(plain, x, None, strip_rows=32) - plain(x)).abs().max() < 1e-10


def test_the_plan_takes_smaller_strips_then_low_memory_before_tiles():
    """Between the estimates of the default strips and of the leanest setting, the plan stays whole-image with the
    first strip setting that fits (the leaner ones cost time), and enhance_image runs it: the network's result."""
    from lfpv_fast.inference.enhancement import STRIP_SETTINGS
    from lfpv_fast.inference.whole_image import estimate_peak_bytes

    net = retinexformer_net(enabled=True).eval()
    height, width = 96, 64
    estimates = [estimate_peak_bytes(net.config, 1, height, width, strip_rows=rows, low_memory=low).total
                 for rows, low in STRIP_SETTINGS]
    assert estimates[0] > min(estimates)  # each later setting is there because it can save memory
    for budget in sorted(set(estimates)):
        plan = plan_enhancement(net, 1, height, width, max_memory=budget)
        first = next(i for i, e in enumerate(estimates) if e <= budget)
        assert not plan.tiled and (plan.strip_rows, plan.low_memory) == STRIP_SETTINGS[first], budget
        assert plan.estimated_bytes == estimates[first]
    assert plan_enhancement(net, 1, height, width, max_memory=min(estimates) - 1).tiled
    lean = plan_enhancement(net, 1, height, width, max_memory=min(estimates))
    assert lean.low_memory and "low memory" in lean.describe()
    image = torch.rand(3, height, width)
    with torch.no_grad():
        expected = net(image[None]).clamp(0, 1)[0]
    assert (enhance_image(net, image, plan=lean) - expected).abs().max() < 1e-5




@pytest.fixture(scope="module")
def retinexformer_runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the done-when commands (with and without LFPVs) and a published Retinexformer file."""
    root = tmp_path_factory.mktemp("retinexformer")
    demo = root / "demo"
    files = {}
    for name, extra in (("lfpv", []), ("plain", ["--set", "model.lfpv.enabled=false"])):
        code = train_cli.main(["--config", "configs/demo_retinexformer.yaml", *TRAIN_SMALL, *extra,
                               "--set", f"data.demo_root={demo}", "--out", str(root / name)])
        assert code == 0
        files[name] = root / name / "final_weights.pth"
        assert (root / name / "checkpoints" / "step_00000002.pth").is_file()
    # The plain run also exports the published Retinexformer format.
    assert (root / "plain" / "final_original_format.pth").is_file()
    torch.manual_seed(1)
    save_published_checkpoint(RetinexFormer(), root / "published.pth")  # the published size, random weights
    files["published"] = root / "published.pth"
    files["demo"] = demo
    return files


def test_training_writes_checkpoints_that_load(retinexformer_runs):
    with_lfpv = load_model(retinexformer_runs["lfpv"])
    plain = load_model(retinexformer_runs["plain"])
    assert with_lfpv.lfpv_enabled and not plain.lfpv_enabled
    assert with_lfpv.config.backbone == plain.config.backbone == "retinexformer"
    published = torch.load(retinexformer_runs["published"], weights_only=True)
    net = load_model(retinexformer_runs["published"])
    assert not net.lfpv_enabled and net.config.options.n_feat == 40
    assert torch.equal(net.backbone.published_state_dict()["body.0.estimator.conv1.weight"],
                       published["params"]["body.0.estimator.conv1.weight"])


@pytest.mark.parametrize("which", ["lfpv", "plain", "published"])
def test_enhance_and_evaluate_run_with_each_checkpoint(retinexformer_runs, which, tmp_path, capsys):
    checkpoint = retinexformer_runs[which]
    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 60).astype(np.uint8)).save(photo)
    code, err = run(enhance_cli.main, ["--checkpoint", checkpoint, photo.parent,
                                       "--output", tmp_path / "out", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "no exact strip path" not in err  # the default site: the exact strip path
    assert Image.open(tmp_path / "out" / "photo.png").size == (56, 40)
    # A published file carries no config: the config's model section (a retinexformer backbone) describes it.
    model = ["--set", "model.options.n_feat=40", "--set", "model.options.num_blocks=[1, 2, 2]"] \
        if which == "published" else []
    out = tmp_path / "eval.json"
    code, err = run(evaluate_cli.main, ["--checkpoint", checkpoint, "--config", "configs/demo_retinexformer.yaml",
                                        "--set", f"data.demo_root={retinexformer_runs['demo']}",
                                        "--set", "data.resize=[64, 48]", "--set", "data.crop=32",
                                        "--set", "data.test_frames=1", *model,
                                        "--device", "cpu", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(out.read_text())
    assert np.isfinite(summary["psnr"]) and summary["model_config"]["backbone"] == "retinexformer"


def test_published_file_of_another_size_is_one_error(retinexformer_runs, tmp_path, capsys):
    small = tmp_path / "small.pth"
    save_published_checkpoint(RetinexFormer(**SMALL_RETINEXFORMER), small)
    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    code, err = run(enhance_cli.main, ["--checkpoint", small, "--output", tmp_path / "out", "--device", "cpu",
                                       photo.parent], capsys)
    assert_one_line_error(code, err, str(small), "Retinexformer state dict")


def test_weights_only_checkpoint_records_backbone_and_lfpv(tmp_path):
    net = retinexformer_net(enabled=True)
    obj = weights_only_checkpoint(net)
    assert obj["model_config"]["backbone"] == "retinexformer"
    assert obj["model_config"]["lfpv"]["bank_size"] == 4 and obj["model_config"]["options"]["n_feat"] == 8
    atomic_save(obj, tmp_path / "w.pth")
    loaded = load_model(tmp_path / "w.pth", backend="reference").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))


def test_init_from_takes_the_backbone_of_a_published_file_and_keeps_fresh_lfpvs(tmp_path):
    from lfpv_fast.training.checkpoint import init_backbone

    torch.manual_seed(3)
    source = RetinexFormer(**SMALL_RETINEXFORMER)
    save_published_checkpoint(source, tmp_path / "retinexformer.pth")
    net = retinexformer_net(enabled=True)
    lfpv_before = {k: v.clone() for k, v in net.lfpv.state_dict().items()}
    init_backbone(net, tmp_path / "retinexformer.pth")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.backbone.state_dict().items())
    assert all(torch.equal(v, lfpv_before[k]) for k, v in net.lfpv.state_dict().items())
    # A published LFPV file for an SNR-Aware backbone: its backbone part.
    published = LFPVNet(TINY, backend="reference")
    atomic_save(published.to_original_state_dict(), tmp_path / "smid.pth")
    fresh = LFPVNet(TINY, backend="reference")
    init_backbone(fresh, tmp_path / "smid.pth")
    assert all(torch.equal(v, published.backbone.state_dict()[k]) for k, v in fresh.backbone.state_dict().items())
    with pytest.raises(ValueError, match="not a checkpoint of the retinexformer backbone"):
        init_backbone(retinexformer_net(), tmp_path / "smid.pth")
