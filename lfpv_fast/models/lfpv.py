"""The LFPV plug-in (learnable feature patches and vectors) and LFPVNet, a backbone with LFPVs at one site.

The plug-in attaches to a (B, C, H, W) feature map that a backbone declares as a site
(lfpv_fast.models.backbone). LFPVNet runs the published recipe on any backbone:

    features f, state = backbone.encode(x, site)
      training:  without_lfpv = backbone.decode(f, state)        # the output without the LFPV fusion
                 banks' = mutual_update(sample_update(banks, f))
                 out = backbone.decode(query_fusion(f, banks'), state);  banks <- banks'
      eval:      out = backbone.decode(query_fusion(f, banks), state)

With LFPVs disabled (`LFPVConfig.enabled = False`) it is the plain backbone: no banks, no updaters; a
training forward returns (out, None) and the trainer's loss then has one term per output it has (the pixel
loss on `out`, and the perceptual loss on `out` in place of the output without LFPVs): the ablation.

Every op with a fast twin (query-and-fusion, bank-update glue) goes through `ops`, which is
`lfpv_fast.ops.reference` or the Triton kernels (`backend=`).

Differences from the published code, all deliberate:
- The banks are buffers, not parameters. The published code registers them as parameters, so after
  overwriting them in a training forward its optimizer also nudges them by one Adam step on their
  (stale) gradient; we don't. In eval the two agree exactly; checkpoints convert both ways.
- The draws of the sample- and mutual-updaters come from a torch.Generator (`seed_draws`) or from
  the caller (`BankDraws`), not from Python's global `random`, so that DDP ranks agree.
- The updaters' hidden width can be set (`LFPVConfig.updater_width`) instead of growing as 4 x C.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfpv_fast.models.config import LFPVConfig, ModelConfig
from lfpv_fast.ops.backends import check_backend, select_ops


@dataclass
class BankDraws:
    """The random choices of one training forward (see tests/data/README.md, "train_draws").

    vector_pos: (h, w) of the feature vector of every image that feeds the vector sample-updater.
    patch_pos: (h, w) top-left of the p x p window that feeds the patch sample-updater.
    vector_partner[i], patch_partner[i]: the bank entry paired with entry i in the mutual-updater.
    """

    vector_pos: torch.Tensor
    patch_pos: torch.Tensor
    vector_partner: torch.Tensor
    patch_partner: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("vector_pos", "patch_pos", "vector_partner", "patch_partner"):
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.long))
        if self.vector_pos.shape != (2,) or self.patch_pos.shape != (2,):
            raise ValueError("BankDraws.vector_pos and patch_pos must be (h, w) pairs")

    def to(self, device: torch.device | str) -> BankDraws:
        return BankDraws(*(t.to(device, non_blocking=True) for t in
                           (self.vector_pos, self.patch_pos, self.vector_partner, self.patch_partner)))

    def check(self, feature_hw: tuple[int, int], bank_size: int, patch_size: int) -> None:
        """Validate against a feature map size (host-side values only; skipped for device tensors, while
        tracing with fake tensors, which hold no values, and under torch.compile, where reading the values
        would break the graph and recompile it for every new position)."""
        if (torch.compiler.is_compiling() or self.vector_pos.device.type != "cpu"
                or torch._guards.detect_fake_mode() is not None):
            return
        hf, wf = feature_hw
        vh, vw = self.vector_pos.tolist()
        ph, pw = self.patch_pos.tolist()
        if not (0 <= vh < hf and 0 <= vw < wf):
            raise ValueError(f"BankDraws.vector_pos {(vh, vw)} is outside the {hf}x{wf} feature map")
        if not (0 <= ph <= hf - patch_size and 0 <= pw <= wf - patch_size):
            raise ValueError(f"BankDraws.patch_pos {(ph, pw)}: a {patch_size}x{patch_size} window "
                             f"does not fit the {hf}x{wf} feature map there")
        for name in ("vector_partner", "patch_partner"):
            t = getattr(self, name)
            if t.shape != (bank_size,) or t.min() < 0 or t.max() >= bank_size:
                raise ValueError(f"BankDraws.{name} must hold {bank_size} indices in [0, {bank_size}), got {t}")

    @classmethod
    def sample(cls, feature_hw: tuple[int, int], bank_size: int, patch_size: int,
               generator: torch.Generator | None = None) -> BankDraws:
        hf, wf = feature_hw

        def randint(high: int, size: int) -> torch.Tensor:
            return torch.randint(0, high, (size,), generator=generator)

        vector_pos = torch.cat([randint(hf, 1), randint(wf, 1)])
        patch_pos = torch.cat([randint(hf - patch_size + 1, 1), randint(wf - patch_size + 1, 1)])
        return cls(vector_pos, patch_pos, randint(bank_size, bank_size), randint(bank_size, bank_size))


def _updater_mlp(in_ch: int, hidden: int, out_ch: int, kernel: int) -> nn.Sequential:
    """conv-BN-ReLU x6 then a conv, with the published layer indices (0, 1, 2, 3, ...)."""
    pad = kernel // 2
    layers: list[nn.Module] = []
    widths = [in_ch] + [hidden] * 5 + [out_ch]
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, kernel, 1, pad), nn.BatchNorm2d(cout), nn.ReLU()]
    layers.append(nn.Conv2d(out_ch, out_ch, kernel, 1, pad))
    return nn.Sequential(*layers)


class LFPVModule(nn.Module):
    """The LFPV parts: position embedding, the sample- and mutual-updaters, query-and-fusion norms."""

    def __init__(self, config: LFPVConfig | ModelConfig, channels: int | None = None) -> None:
        """config: the plug-in's settings and `channels` the site's; or a whole ModelConfig (its lfpv and site)."""
        super().__init__()
        if isinstance(config, ModelConfig):
            config, channels = config.lfpv, config.site.channels
        if channels is None:
            raise ValueError("LFPVModule needs the channels of the site it attaches to")
        nf, p, hidden = channels, config.patch_size, config.hidden_width(channels)
        self.bank_size, self.patch_size = config.bank_size, p
        self.position_embedding = nn.Embedding(config.bank_size, nf)
        self.sample_vector_mlp = _updater_mlp(3 * nf, hidden, nf, 1)
        self.sample_patch_mlp = _updater_mlp(3 * nf, hidden, nf, 3)
        self.mutual_vector_mlp = _updater_mlp(4 * nf, hidden, nf, 1)
        self.mutual_patch_mlp = _updater_mlp(4 * nf, hidden, nf, 3)
        self.sample_vector_norm = nn.LayerNorm(nf)
        self.sample_patch_norm = nn.LayerNorm([nf, p, p])
        self.mutual_vector_norm = nn.LayerNorm(nf)
        self.mutual_patch_norm = nn.LayerNorm([nf, p, p])
        self.pixel_query_norm = nn.LayerNorm(nf)
        self.vector_key_norm = nn.LayerNorm(nf)
        self.patch_query_norm = nn.LayerNorm(nf * p * p)
        self.patch_key_norm = nn.LayerNorm(nf * p * p)

    @staticmethod
    def _norm(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        return norm.weight, norm.bias

    def fuse(self, features: torch.Tensor, bank_vectors: torch.Tensor, bank_patches: torch.Tensor,
             ops: ModuleType) -> torch.Tensor:
        """Query-and-fusion: every pixel and every patch attends over the banks; added to features."""
        return ops.query_fusion(
            features, bank_vectors, bank_patches,
            self._norm(self.pixel_query_norm), self._norm(self.vector_key_norm),
            self._norm(self.patch_query_norm), self._norm(self.patch_key_norm),
        )

    def update_banks(self, features: torch.Tensor, bank_vectors: torch.Tensor, bank_patches: torch.Tensor,
                     draws: BankDraws, ops: ModuleType,
                     all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample-updater then mutual-updater; returns the new banks (differentiable)."""
        batch = features.shape[0]
        embedding = self.position_embedding.weight
        vector_in, patch_in = ops.sample_updater_inputs_from_features(
            features, draws.vector_pos, draws.patch_pos, bank_vectors, bank_patches, embedding)
        vectors = ops.batch_mean_layer_norm(self.sample_vector_mlp(vector_in).flatten(1), batch,
                                            self._norm(self.sample_vector_norm), all_reduce_mean)
        patches = ops.batch_mean_layer_norm(self.sample_patch_mlp(patch_in), batch,
                                            self._norm(self.sample_patch_norm), all_reduce_mean)

        vector_in, patch_in = ops.mutual_updater_inputs(vectors, patches, draws.vector_partner,
                                                        draws.patch_partner, embedding)
        vectors = self.mutual_vector_norm(self.mutual_vector_mlp(vector_in).flatten(1))
        patches = self.mutual_patch_norm(self.mutual_patch_mlp(patch_in))
        return vectors, patches


class LFPVNet(nn.Module):
    """A backbone with the LFPV plug-in at one of its sites (or without it: `lfpv.enabled = False`).

    LFPVNet(config, backend): the backbone named in `config` (ModelConfig; default: the published SMID model).
    LFPVNet.attach(backbone, lfpv, site, backend): your own backbone module (see the README).

    forward(x, guide=None, draws=None): x (B,3,H,W) RGB in [0,1]; guide: the backbone's per-pixel guide map
    (the SNR map for SNR-Aware; computed from x when None; ignored by backbones without one). Inputs are
    resized (bilinear, as published) to a multiple of `align` and the output back. Eval returns the enhanced
    image; train mode returns (enhanced, enhanced_without_lfpv) and replaces the banks with the updated ones.
    """

    def __init__(self, config: ModelConfig | None = None, backend: str = "auto", *,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else ModelConfig()
        check_backend(backend)
        self.backend = backend
        if backbone is None:
            from lfpv_fast.models import build_backbone

            backbone = build_backbone(cfg, backend)
        self.backbone = backbone
        site_name = cfg.lfpv.site or backbone.default_site
        if site_name not in backbone.sites:
            raise ValueError(f"model.lfpv.site {site_name!r}: the backbone has sites {sorted(backbone.sites)}")
        self.site = backbone.sites[site_name]
        self.align = backbone.align
        self.lfpv: LFPVModule | None = None
        if cfg.lfpv.enabled:
            c, p = self.site.channels, cfg.lfpv.patch_size
            self.align = math.lcm(backbone.align, self.site.stride * p)  # whole bank patches at the site
            self.lfpv = LFPVModule(cfg.lfpv, c)
            self.register_buffer("bank_vectors", torch.zeros(cfg.lfpv.bank_size, c))
            self.register_buffer("bank_patches", torch.zeros(cfg.lfpv.bank_size, c, p, p))
        self._encode_takes_guide = "guide" in inspect.signature(backbone.encode).parameters
        # Source of the updaters' draws when forward() is not given any; seed it with seed_draws().
        self.draw_generator = torch.Generator()
        # Set by the trainer under DDP: averages the sample-updater's batch mean over ranks.
        self.bank_all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def attach(cls, backbone: nn.Module, lfpv: LFPVConfig | None = None, site: str | None = None,
               backend: str = "auto") -> LFPVNet:
        """LFPVs on a backbone module you built (anything with sites, default_site, align, encode, decode)."""
        lfpv = lfpv if lfpv is not None else LFPVConfig()
        if site is not None:
            lfpv = dataclasses.replace(lfpv, site=site)
        # The config names the module's class as "module:Class" (how a run config names it for the trainer), but
        # is not built through it: the module given is used as it is (its options are unknown here).
        config = ModelConfig.__new__(ModelConfig)
        config.backbone = f"{type(backbone).__module__}:{type(backbone).__qualname__}"
        config.options, config.lfpv, config.init_from = {}, lfpv, None
        return cls(config, backend, backbone=backbone)

    @property
    def lfpv_enabled(self) -> bool:
        return self.lfpv is not None

    def seed_draws(self, seed: int) -> None:
        self.draw_generator.manual_seed(seed)

    def ops_for(self, x: torch.Tensor) -> ModuleType:
        """The op implementations for this input (lfpv_fast.ops.backends.select_ops)."""
        return select_ops(self.backend, x)

    def guide(self, x: torch.Tensor) -> torch.Tensor | None:
        """The backbone's guide map of x (the SNR map for SNR-Aware), or None for a backbone without one."""
        make = getattr(self.backbone, "guide", None)
        return make(x) if make is not None else None

    snr_mask = guide  # the name from before backbones: the trainer and tools call net.snr_mask(x)

    def aligned_inputs(self, x: torch.Tensor, guide: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check x (B,3,H,W) and guide (B,1,H,W) or None; as published, resize both (bilinear) to a multiple of
        the alignment. `_restore_size` takes the output back to H x W."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LFPVNet expects x of shape (B,3,H,W), got {tuple(x.shape)}")
        if guide is not None and (guide.dim() != 4 or guide.shape[1] != 1 or guide.shape[0] != x.shape[0]
                                  or guide.shape[-2:] != x.shape[-2:]):
            raise ValueError(f"snr_mask must be (B,1,H,W) matching x {tuple(x.shape)}, got {tuple(guide.shape)}")
        height, width = x.shape[-2:]
        a = self.align
        if height < a or width < a:
            raise ValueError(f"LFPVNet needs H, W >= {a}, got {height}x{width}")
        aligned = [height // a * a, width // a * a]
        if aligned != [height, width]:
            x = F.interpolate(x, size=aligned, mode="bilinear", align_corners=False)
            if guide is not None:
                guide = F.interpolate(guide, size=aligned, mode="bilinear", align_corners=False)
        return x, guide

    def encode(self, x: torch.Tensor, guide: torch.Tensor | None):
        """The backbone's first half on aligned inputs: (features at the site, the state decode needs)."""
        if self._encode_takes_guide:
            return self.backbone.encode(x, self.site.name, guide=guide)
        return self.backbone.encode(x, self.site.name)

    def fuse(self, features: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        """Eval-mode query-and-fusion with the current banks (the features unchanged without LFPVs)."""
        if self.lfpv is None:
            return features
        return self.lfpv.fuse(features, self.bank_vectors, self.bank_patches, ops)

    def forward(self, x: torch.Tensor, snr_mask: torch.Tensor | None = None, draws: BankDraws | None = None):
        height, width = x.shape[-2:]
        if snr_mask is None and self._encode_takes_guide:
            snr_mask = self.guide(x)
        x, guide = self.aligned_inputs(x, snr_mask)
        ops = self.ops_for(x)
        features, state = self.encode(x, guide)
        if self.lfpv is None:
            out = self._restore_size(self.backbone.decode(features, state), height, width)
            return (out, None) if self.training else out
        if self.training:
            hf, wf = features.shape[-2:]
            bank_size, patch_size = self.config.lfpv.bank_size, self.config.lfpv.patch_size
            if draws is None:
                draws = BankDraws.sample((hf, wf), bank_size, patch_size, self.draw_generator)
            draws.check((hf, wf), bank_size, patch_size)
            draws = draws.to(features.device)
            without_lfpv = self.backbone.decode(features, state)
            vectors, patches = self.lfpv.update_banks(features, self.bank_vectors, self.bank_patches,
                                                      draws, ops, self.bank_all_reduce_mean)
            fused = self.lfpv.fuse(features, vectors, patches, ops)
            with torch.no_grad():
                self.bank_vectors.copy_(vectors.detach())
                self.bank_patches.copy_(patches.detach())
            out = self.backbone.decode(fused, state)
            return self._restore_size(out, height, width), self._restore_size(without_lfpv, height, width)
        return self._restore_size(self.backbone.decode(self.fuse(features, ops), state), height, width)

    @staticmethod
    def _restore_size(out: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if tuple(out.shape[-2:]) == (height, width):
            return out
        return F.interpolate(out, size=[height, width], mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------
    # Published checkpoints of the SNR-Aware LFPV code (lfpv_fast.models.snr_aware holds the format).

    def _snr_aware_format(self) -> ModuleType:
        from lfpv_fast.models import snr_aware

        if not isinstance(self.backbone, snr_aware.SNRAware) or self.lfpv is None:
            raise ValueError("the published LFPV format holds the SNR-Aware backbone with LFPVs only")
        return snr_aware

    def original_name_map(self) -> dict[str, str]:
        """Our state_dict key -> the published code's key."""
        fmt = self._snr_aware_format()
        return {ours: fmt.original_name(ours) for ours in self.state_dict()}

    def to_original_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with the published code's keys (loadable by its test script)."""
        return self._snr_aware_format().to_published(self)

    @classmethod
    def from_original_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config: ModelConfig | None = None,
                                 backend: str = "auto") -> LFPVNet:
        """Build a model from a checkpoint of the published code (strict: every key, every shape)."""
        net = cls(config, backend=backend)
        net.load_original_state_dict(state_dict)
        return net

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
        self._snr_aware_format().load_published(self, dict(state_dict))

