"""The LFPV network: the SNR-aware enhancement network plus learnable feature patches and vectors.

This is the published `low_light_transformer4` (SMID settings) written part by part:

    x (B,3,H,W) -- bilinear resize to a multiple of 16 --> Encoder (conv to 1/4 size + residual blocks)
      features f (B,C,H/4,W/4)
        training:  without_lfpv = decode(f)               # the output without the LFPV fusion
                   banks' = mutual_update(sample_update(banks, f))
                   out = decode(query_fusion(f, banks'));  banks <- banks'
        eval:      out = decode(query_fusion(f, banks))
    decode = residual blocks ("light" branch) and a 6-layer transformer over 4x4 feature patches whose
    keys are masked where the SNR is low, blended by the SNR map, then the conv decoder with skips.

Every op with a fast twin (SNR map, query-and-fusion, bank-update glue, masked attention) goes
through `self.ops`, which is `lfpv_fast.reference` or the Triton kernels (`backend=`).

Differences from the published code, all deliberate:
- The banks are buffers, not parameters. The published code registers them as parameters, so after
  overwriting them in a training forward its optimizer also nudges them by one Adam step on their
  (stale) gradient; we don't. In eval the two agree exactly; checkpoints convert both ways.
- The draws of the sample- and mutual-updaters come from a torch.Generator (`seed_draws`) or from
  the caller (`BankDraws`), not from Python's global `random`, so that DDP ranks agree.
- `upconv2` and `HRconv` hard-code 64 channels in the published code; here that width is
  `ModelConfig.hr_nf` (64 by default) so that other `nf` values build a consistent network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfpv_fast.backends import check_backend, select_ops


@dataclass
class ModelConfig:
    """Architecture; the defaults are the published SMID model."""

    nf: int = 64  # feature channels C
    front_blocks: int = 1  # residual blocks after the encoder convs
    back_blocks: int = 1  # residual blocks before the upsampling decoder
    light_blocks: int = 6  # residual blocks of the short-range ("light") branch
    hr_nf: int = 64  # width of the full-resolution decoder convs (fixed at 64 in the published code)
    bank_size: int = 16  # entries in each of the two banks
    patch_size: int = 4  # side of a bank patch
    token_size: int = 4  # side of a transformer token's feature patch
    layers: int = 6
    heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 2048
    updater_width: int = 4  # hidden width of the updater MLPs, in multiples of nf

    def __post_init__(self) -> None:
        for name in ("nf", "hr_nf", "bank_size", "patch_size", "token_size", "layers", "heads",
                     "head_dim", "ffn_dim", "updater_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("front_blocks", "back_blocks", "light_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        # Feature maps are 1/4 of an input aligned to 4 * token_size: their sides are multiples of token_size
        # (any multiple), so the bank patches tile them only where patch_size divides token_size.
        if self.token_size % self.patch_size:
            raise ValueError(
                f"ModelConfig.patch_size={self.patch_size} must divide token_size={self.token_size} (feature maps "
                f"are multiples of token_size on a side, and bank patches must tile them)"
            )

    @property
    def d_model(self) -> int:
        return self.nf * self.token_size * self.token_size

    @property
    def align(self) -> int:
        """Input sides are resized to a multiple of this (16 as published)."""
        return 4 * self.token_size


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
        """Validate against a feature map size (host-side values only; skipped for device tensors and
        while tracing with fake tensors, which hold no values)."""
        if self.vector_pos.device.type != "cpu" or torch._guards.detect_fake_mode() is not None:
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


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(x))), no normalisation."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def _blocks(nf: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(nf) for _ in range(count)))


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


class Encoder(nn.Module):
    """Full, 1/2 and 1/4 resolution convs (kept as skips) and residual blocks at 1/4."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        nf = cfg.nf
        self.conv_full = nn.Conv2d(3, nf, 3, 1, 1)
        self.conv_half = nn.Conv2d(nf, nf, 3, 2, 1)
        self.conv_quarter = nn.Conv2d(nf, nf, 3, 2, 1)
        self.blocks = _blocks(nf, cfg.front_blocks)

    # The stages are separate so that lfpv_fast.inference can run the full-resolution ones in strips.
    def full_res(self, x: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.conv_full(x))

    def half_res(self, full: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.conv_half(full))

    def quarter_res(self, half: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.conv_quarter(half))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        full = self.full_res(x)
        half = self.half_res(full)
        quarter = self.quarter_res(half)
        return self.blocks(quarter), [full, half, quarter]


class MaskedSelfAttention(nn.Module):
    """Pre-LayerNorm multi-head self-attention with SNR key masking and a residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, inner = cfg.d_model, cfg.heads * cfg.head_dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, tokens: torch.Tensor, key_keep: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        b, length, _ = tokens.shape
        normed = self.norm(tokens)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, self.head_dim).transpose(1, 2)

        attended = ops.masked_attention(heads(self.q_proj(normed)), heads(self.k_proj(normed)),
                                        heads(self.v_proj(normed)), key_keep)
        return tokens + self.out_proj(attended.transpose(1, 2).reshape(b, length, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = MaskedSelfAttention(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, tokens: torch.Tensor, key_keep: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        return self.ffn(self.attention(tokens, key_keep, ops))


class SNRDecoder(nn.Module):
    """Long-range (transformer over token patches) and short-range (residual blocks) branches,
    blended per pixel by the SNR map, then residual blocks and the upsampling decoder with skips."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        nf, hr = cfg.nf, cfg.hr_nf
        self.token_size = cfg.token_size
        self.light_blocks = _blocks(nf, cfg.light_blocks)
        self.transformer = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        self.blocks = _blocks(nf, cfg.back_blocks)
        self.up_quarter = nn.Conv2d(2 * nf, 4 * nf, 3, 1, 1)
        self.up_half = nn.Conv2d(2 * nf, 4 * hr, 3, 1, 1)
        self.conv_full = nn.Conv2d(hr + nf, hr, 3, 1, 1)
        self.conv_out = nn.Conv2d(hr, 3, 3, 1, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor, skips: list[torch.Tensor],
                x: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        full, half, quarter = skips
        return self.full_res(self.half_res(features, mask, quarter, ops), half, full, x)

    def half_res(self, features: torch.Tensor, mask: torch.Tensor, quarter: torch.Tensor,
                 ops: ModuleType) -> torch.Tensor:
        """Both branches, the blend and the first upsampling: (B, nf, H/2, W/2)."""
        b, c, h, w = features.shape
        t = self.token_size
        light = self.light_blocks(features)
        mask = F.interpolate(mask, size=[h, w], mode="nearest")

        # Tokens are the t x t feature patches (C*t*t values each, channel-major as F.unfold gives).
        tokens = F.unfold(features, kernel_size=t, stride=t).transpose(1, 2)
        # A key is kept where its patch's mean SNR is above 0.5 (published: set <= 0.5 to 0, mask == 0).
        key_keep = F.avg_pool2d(mask, kernel_size=t, stride=t).flatten(1) > 0.5
        for layer in self.transformer:
            tokens = layer(tokens, key_keep, ops)
        long_range = F.fold(tokens.transpose(1, 2), output_size=(h, w), kernel_size=t, stride=t)

        blended = long_range * (1 - mask) + light * mask
        out = torch.cat([self.blocks(blended), quarter], dim=1)
        return _lrelu(F.pixel_shuffle(self.up_quarter(out), 2))

    def full_res(self, out: torch.Tensor, half: torch.Tensor, full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The last upsampling and the full-resolution convs (local: 3x3 convs only) plus the input."""
        out = _lrelu(F.pixel_shuffle(self.up_half(torch.cat([out, half], dim=1)), 2))
        out = _lrelu(self.conv_full(torch.cat([out, full], dim=1)))
        return self.conv_out(out) + x


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

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        nf, p, hidden = cfg.nf, cfg.patch_size, cfg.updater_width * cfg.nf
        self.bank_size, self.patch_size = cfg.bank_size, p
        self.position_embedding = nn.Embedding(cfg.bank_size, nf)
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
    """The published low-light enhancement network with LFPV banks.

    forward(x, snr_mask, draws=None): x (B,3,H,W) RGB in [0,1], H, W >= 16; snr_mask (B,1,H,W).
    Eval returns the enhanced image; train mode returns (enhanced, enhanced_without_lfpv) and
    replaces the banks with the updated ones.
    """

    def __init__(self, config: ModelConfig | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.config = cfg = config if config is not None else ModelConfig()
        check_backend(backend)
        self.backend = backend
        self.encoder = Encoder(cfg)
        self.lfpv = LFPVModule(cfg)
        self.decoder = SNRDecoder(cfg)
        p = cfg.patch_size
        self.register_buffer("bank_vectors", torch.zeros(cfg.bank_size, cfg.nf))
        self.register_buffer("bank_patches", torch.zeros(cfg.bank_size, cfg.nf, p, p))
        # Source of the updaters' draws when forward() is not given any; seed it with seed_draws().
        self.draw_generator = torch.Generator()
        # Set by the trainer under DDP: averages the sample-updater's batch mean over ranks.
        self.bank_all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    def seed_draws(self, seed: int) -> None:
        self.draw_generator.manual_seed(seed)

    def ops_for(self, x: torch.Tensor) -> ModuleType:
        """The op implementations for this input (lfpv_fast.backends.select_ops)."""
        return select_ops(self.backend, x)

    def snr_mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops_for(x).snr_mask(x)

    def aligned_inputs(self, x: torch.Tensor, snr_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check x (B,3,H,W) and snr_mask (B,1,H,W); as published, resize both (bilinear) to a multiple of
        the alignment (16). `_restore_size` takes the output back to H x W."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LFPVNet expects x of shape (B,3,H,W), got {tuple(x.shape)}")
        if snr_mask.dim() != 4 or snr_mask.shape[1] != 1 or snr_mask.shape[0] != x.shape[0] \
                or snr_mask.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"snr_mask must be (B,1,H,W) matching x {tuple(x.shape)}, got {tuple(snr_mask.shape)}")
        height, width = x.shape[-2:]
        a = self.config.align
        if height < a or width < a:
            raise ValueError(f"LFPVNet needs H, W >= {a}, got {height}x{width}")
        aligned = [height // a * a, width // a * a]
        if aligned != [height, width]:
            x = F.interpolate(x, size=aligned, mode="bilinear", align_corners=False)
            snr_mask = F.interpolate(snr_mask, size=aligned, mode="bilinear", align_corners=False)
        return x, snr_mask

    def forward(self, x: torch.Tensor, snr_mask: torch.Tensor, draws: BankDraws | None = None):
        height, width = x.shape[-2:]
        x, snr_mask = self.aligned_inputs(x, snr_mask)
        ops = self.ops_for(x)

        features, skips = self.encoder(x)
        if self.training:
            hf, wf = features.shape[-2:]
            if draws is None:
                draws = BankDraws.sample((hf, wf), self.config.bank_size, self.config.patch_size,
                                         self.draw_generator)
            draws.check((hf, wf), self.config.bank_size, self.config.patch_size)
            draws = draws.to(features.device)
            without_lfpv = self.decoder(features, snr_mask, skips, x, ops)
            vectors, patches = self.lfpv.update_banks(features, self.bank_vectors, self.bank_patches,
                                                      draws, ops, self.bank_all_reduce_mean)
            fused = self.lfpv.fuse(features, vectors, patches, ops)
            with torch.no_grad():
                self.bank_vectors.copy_(vectors.detach())
                self.bank_patches.copy_(patches.detach())
            out = self.decoder(fused, snr_mask, skips, x, ops)
            return self._restore_size(out, height, width), self._restore_size(without_lfpv, height, width)

        fused = self.lfpv.fuse(features, self.bank_vectors, self.bank_patches, ops)
        return self._restore_size(self.decoder(fused, snr_mask, skips, x, ops), height, width)

    @staticmethod
    def _restore_size(out: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if tuple(out.shape[-2:]) == (height, width):
            return out
        return F.interpolate(out, size=[height, width], mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------
    # Checkpoints of the published code.

    def original_name_map(self) -> dict[str, str]:
        """Our state_dict key -> the published code's key."""
        return {ours: original_name(ours) for ours in self.state_dict()}

    def to_original_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with the published code's keys (loadable by its test script)."""
        return {original_name(k): v.detach().clone() for k, v in self.state_dict().items()}

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
        stripped = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        ours = self.state_dict()
        expected = {original_name(k): k for k in ours}
        missing = sorted(set(expected) - set(stripped))
        unexpected = sorted(set(stripped) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            if unexpected:
                parts.append(f"unexpected keys: {', '.join(unexpected[:10])}"
                             + (" ..." if len(unexpected) > 10 else ""))
            raise KeyError("not a checkpoint of the published LFPV model (low_light_transformer4) for this "
                           "config: " + "; ".join(parts))
        converted = {}
        for orig_key, our_key in expected.items():
            value = stripped[orig_key]
            if not torch.is_tensor(value):
                raise TypeError(f"checkpoint key {orig_key!r}: expected a tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(ours[our_key].shape):
                raise ValueError(f"checkpoint key {orig_key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(ours[our_key].shape)}")
            converted[our_key] = value
        self.load_state_dict(converted, strict=True)


# Our module paths -> the published ones. Applied in order to a state-dict key.
_NAME_RULES: list[tuple[str, str]] = [
    (r"^bank_vectors$", "common_feature"),
    (r"^bank_patches$", "common_feature_patch"),
    (r"^encoder\.conv_full\.", "conv_first_1."),
    (r"^encoder\.conv_half\.", "conv_first_2."),
    (r"^encoder\.conv_quarter\.", "conv_first_3."),
    (r"^encoder\.blocks\.", "feature_extraction."),
    (r"^decoder\.light_blocks\.", "recon_trunk_light."),
    (r"^decoder\.blocks\.", "recon_trunk."),
    (r"^decoder\.up_quarter\.", "upconv1."),
    (r"^decoder\.up_half\.", "upconv2."),
    (r"^decoder\.conv_full\.", "HRconv."),
    (r"^decoder\.conv_out\.", "conv_last."),
    (r"^decoder\.transformer\.(\d+)\.attention\.norm\.", r"transformer.layer_stack.\1.slf_attn.layer_norm."),
    (r"^decoder\.transformer\.(\d+)\.attention\.q_proj\.", r"transformer.layer_stack.\1.slf_attn.w_qs."),
    (r"^decoder\.transformer\.(\d+)\.attention\.k_proj\.", r"transformer.layer_stack.\1.slf_attn.w_ks."),
    (r"^decoder\.transformer\.(\d+)\.attention\.v_proj\.", r"transformer.layer_stack.\1.slf_attn.w_vs."),
    (r"^decoder\.transformer\.(\d+)\.attention\.out_proj\.", r"transformer.layer_stack.\1.slf_attn.fc."),
    (r"^decoder\.transformer\.(\d+)\.ffn\.norm\.", r"transformer.layer_stack.\1.pos_ffn.layer_norm."),
    (r"^decoder\.transformer\.(\d+)\.ffn\.fc1\.", r"transformer.layer_stack.\1.pos_ffn.w_1."),
    (r"^decoder\.transformer\.(\d+)\.ffn\.fc2\.", r"transformer.layer_stack.\1.pos_ffn.w_2."),
    (r"^lfpv\.position_embedding\.", "embedding."),
    (r"^lfpv\.sample_vector_mlp\.", "update_feature."),
    (r"^lfpv\.sample_patch_mlp\.", "update_feature_patch."),
    (r"^lfpv\.mutual_vector_mlp\.", "propagate."),
    (r"^lfpv\.mutual_patch_mlp\.", "propagate_patch."),
    (r"^lfpv\.pixel_query_norm\.", "norm_query1."),
    (r"^lfpv\.vector_key_norm\.", "norm_query2."),
    (r"^lfpv\.patch_query_norm\.", "norm_query3."),
    (r"^lfpv\.patch_key_norm\.", "norm_query4."),
    (r"^lfpv\.sample_vector_norm\.", "norm_feature."),
    (r"^lfpv\.sample_patch_norm\.", "norm_patch."),
    (r"^lfpv\.mutual_vector_norm\.", "norm_feature2."),
    (r"^lfpv\.mutual_patch_norm\.", "norm_patch2."),
]


def original_name(key: str) -> str:
    """Map one of our state-dict keys to the published code's key."""
    for pattern, repl in _NAME_RULES:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    raise KeyError(f"no published name for state-dict key {key!r}")


def snr_mask(x: torch.Tensor) -> torch.Tensor:
    """The SNR map (B,1,H,W) of an RGB batch in [0,1], as the published code computes it."""
    return select_ops("auto", x).snr_mask(x)
