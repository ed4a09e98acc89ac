"""The SNR-Aware backbone (the network of the published LFPV code, `low_light_transformer4`, SMID settings),
its published checkpoint format (key map and detection) and nothing else: the LFPVs are `lfpv.py`'s plug-in.

    x (B,3,H,W) --> Encoder (conv to 1/4 size + residual blocks) --> features f (B,nf,H/4,W/4)   [site "quarter"]
    decode(f) = residual blocks ("light" branch) and a transformer over token_size x token_size feature patches
      whose keys are masked where the SNR is low, blended by the SNR map, then the conv decoder with skips.

The SNR map is this backbone's guide (`guide(x)`): a per-pixel map computed from the whole input once, so
that crops, tiles and strips of one image all see the whole image's values (the trainer computes it from
the augmented crop, as published).

Differences from the published code, all deliberate:
- `upconv2` and `HRconv` hard-code 64 channels in the published code; here that width is
  `SNRAwareOptions.hr_nf` (64 by default) so that other `nf` values build a consistent network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfpv_fast.models.backbone import Site, without_data_parallel_prefix
from lfpv_fast.ops.backends import check_backend, select_ops


@dataclass
class SNRAwareOptions:
    """The SNR-Aware network's options; the defaults are the published SMID model."""

    nf: int = 64  # feature channels C
    front_blocks: int = 1  # residual blocks after the encoder convs
    back_blocks: int = 1  # residual blocks before the upsampling decoder
    light_blocks: int = 6  # residual blocks of the short-range ("light") branch
    hr_nf: int = 64  # width of the full-resolution decoder convs (fixed at 64 in the published code)
    token_size: int = 4  # side of a transformer token's feature patch
    layers: int = 6
    heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 2048

    def __post_init__(self) -> None:
        for name in ("nf", "hr_nf", "token_size", "layers", "heads", "head_dim", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("front_blocks", "back_blocks", "light_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def d_model(self) -> int:
        return self.nf * self.token_size * self.token_size


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

    def __init__(self, cfg: SNRAwareOptions) -> None:
        super().__init__()
        nf = cfg.nf
        self.conv_full = nn.Conv2d(3, nf, 3, 1, 1)
        self.conv_half = nn.Conv2d(nf, nf, 3, 2, 1)
        self.conv_quarter = nn.Conv2d(nf, nf, 3, 2, 1)
        self.blocks = _blocks(nf, cfg.front_blocks)

    # The stages are separate so that lfpv_fast.inference.whole_image can run the full-resolution ones in strips.
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

    def __init__(self, cfg: SNRAwareOptions) -> None:
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
    def __init__(self, cfg: SNRAwareOptions) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: SNRAwareOptions) -> None:
        super().__init__()
        self.attention = MaskedSelfAttention(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, tokens: torch.Tensor, key_keep: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        return self.ffn(self.attention(tokens, key_keep, ops))


class SNRDecoder(nn.Module):
    """Long-range (transformer over token patches) and short-range (residual blocks) branches,
    blended per pixel by the SNR map, then residual blocks and the upsampling decoder with skips."""

    def __init__(self, cfg: SNRAwareOptions) -> None:
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


class SNRAware(nn.Module):
    """The SNR-Aware network as a backbone (lfpv_fast.models.backbone): one site, "quarter" (nf channels, 1/4)."""

    default_site = "quarter"

    def __init__(self, options: SNRAwareOptions | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.options = options = options if options is not None else SNRAwareOptions()
        check_backend(backend)
        self.backend = backend
        self.encoder = Encoder(options)
        self.decoder = SNRDecoder(options)
        self.sites = {"quarter": Site("quarter", options.nf, 4)}
        self.align = 4 * options.token_size  # the transformer's tokens tile the 1/4 map

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """The SNR map (B,1,H,W) of x."""
        return select_ops(self.backend, x).snr_mask(x)

    def encode(self, x: torch.Tensor, site: str, guide: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        if site != "quarter":
            raise ValueError(f"SNR-Aware has one LFPV site, 'quarter', not {site!r}")
        if guide is None:
            guide = self.guide(x)
        features, skips = self.encoder(x)
        return features, (skips, guide, x)

    def decode(self, features: torch.Tensor, state: Any) -> torch.Tensor:
        skips, guide, x = state
        return self.decoder(features, guide, skips, x, select_ops(self.backend, x))

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(*self.encode(x, "quarter", guide))


def build(options: SNRAwareOptions, backend: str) -> SNRAware:
    return SNRAware(options, backend)


# ---------------------------------------------------------------------------------------------
# The published format: a bare state dict of `low_light_transformer4` (optionally under 'params' or
# 'state_dict', keys optionally prefixed 'module.'), banks as parameters named common_feature(_patch).

# Our module paths -> the published ones. Applied in order to a state-dict key.
_NAME_RULES: list[tuple[str, str]] = [
    (r"^bank_vectors$", "common_feature"),
    (r"^bank_patches$", "common_feature_patch"),
    (r"^backbone\.encoder\.conv_full\.", "conv_first_1."),
    (r"^backbone\.encoder\.conv_half\.", "conv_first_2."),
    (r"^backbone\.encoder\.conv_quarter\.", "conv_first_3."),
    (r"^backbone\.encoder\.blocks\.", "feature_extraction."),
    (r"^backbone\.decoder\.light_blocks\.", "recon_trunk_light."),
    (r"^backbone\.decoder\.blocks\.", "recon_trunk."),
    (r"^backbone\.decoder\.up_quarter\.", "upconv1."),
    (r"^backbone\.decoder\.up_half\.", "upconv2."),
    (r"^backbone\.decoder\.conv_full\.", "HRconv."),
    (r"^backbone\.decoder\.conv_out\.", "conv_last."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.attention\.norm\.", r"transformer.layer_stack.\1.slf_attn.layer_norm."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.attention\.q_proj\.", r"transformer.layer_stack.\1.slf_attn.w_qs."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.attention\.k_proj\.", r"transformer.layer_stack.\1.slf_attn.w_ks."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.attention\.v_proj\.", r"transformer.layer_stack.\1.slf_attn.w_vs."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.attention\.out_proj\.", r"transformer.layer_stack.\1.slf_attn.fc."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.ffn\.norm\.", r"transformer.layer_stack.\1.pos_ffn.layer_norm."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.ffn\.fc1\.", r"transformer.layer_stack.\1.pos_ffn.w_1."),
    (r"^backbone\.decoder\.transformer\.(\d+)\.ffn\.fc2\.", r"transformer.layer_stack.\1.pos_ffn.w_2."),
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
    """Map one of our state-dict keys (an LFPVNet on this backbone) to the published code's key."""
    for pattern, repl in _NAME_RULES:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    raise KeyError(f"no published name for state-dict key {key!r}")


# Two keys that every published LFPV state dict holds (how a file is recognised), and what a message calls the format.
_SIGNATURE_KEYS = ("common_feature", "conv_first_1.weight")
PUBLISHED_FORMAT = ("a state dict of the published LFPV model (expected keys such as "
                    f"{_SIGNATURE_KEYS[0]!r} and {_SIGNATURE_KEYS[1]!r})")


def strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Keys without DataParallel's 'module.' prefix (lfpv_fast.models.backbone.without_data_parallel_prefix)."""
    return without_data_parallel_prefix(state)


def is_published_state_dict(state: dict[str, Any]) -> bool:
    """True for a state dict of the published LFPV code (recognised by its keys)."""
    keys = strip_module_prefix(state)
    return all(key in keys for key in _SIGNATURE_KEYS)


def published_state_dict(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The weights of a file in the published LFPV format (bare, or nested under 'params'/'state_dict'), else None."""
    state = obj.get("params", obj.get("state_dict", obj))
    return state if isinstance(state, dict) and is_published_state_dict(state) else None


def published_lfpv_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The LFPV settings of a published state dict (its banks' and updaters' shapes), as a config's lfpv section;
    empty when the file does not show them."""
    state = strip_module_prefix(state)
    shapes = {k: tuple(state[k].shape) for k in ("common_feature_patch", "update_feature.0.weight")
              if torch.is_tensor(state.get(k))}
    if len(shapes) < 2:
        return {}
    bank, _, patch, _ = shapes["common_feature_patch"]
    return {"bank_size": bank, "patch_size": patch, "updater_width": shapes["update_feature.0.weight"][0]}


def published_nf(state: dict[str, Any]) -> int | None:
    """The feature width of a published state dict (for messages about a file of another architecture)."""
    first = strip_module_prefix(state).get(_SIGNATURE_KEYS[1])
    return int(first.shape[0]) if torch.is_tensor(first) and first.dim() == 4 else None


def to_published(net: nn.Module) -> dict[str, torch.Tensor]:
    """An LFPVNet on this backbone as a published state dict (loadable by the published test script)."""
    return {original_name(k): v.detach().clone() for k, v in net.state_dict().items()}


def load_published(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a published state dict into an LFPVNet on this backbone, strictly (every key, every shape)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    stripped = strip_module_prefix(state_dict)
    ours = net.state_dict()
    expected = {original_name(k): k for k in ours}
    missing = sorted(set(expected) - set(stripped))
    unexpected = sorted(set(stripped) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
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
    net.load_state_dict(converted, strict=True)
