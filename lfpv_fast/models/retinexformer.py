"""Retinexformer (Cai et al., ICCV 2023, MIT licence), written here from its paper and architecture.

One stage of the network:
  1. An illumination estimator looks at the image and its channel mean, and returns illumination
     features (n_feat channels, full resolution) and an illumination map (one value per image channel).
     The "lit-up" image is img * map + img.
  2. A denoiser, a two-level U-shaped transformer, restores the lit-up image: a 3x3 embedding, two
     encoder levels (transformer blocks, then a stride-2 4x4 convolution doubling the channels; the
     illumination features go down the same way through their own convolution), a bottleneck of
     transformer blocks at 4*n_feat channels and 1/4 scale, two decoder levels (2x2 transposed convolution
     up, 1x1 fusion of the upsampled map with the encoder skip, transformer blocks), a 3x3 projection to
     the image, and the lit-up image added back.
Each transformer block is an illumination-guided attention (IG-MSA, over channels, with the residual
added; no norm before it) followed by a pre-norm feed-forward (LayerNorm, 1x1 to 4x channels, GELU,
depthwise 3x3, GELU, 1x1 back; residual added). `stage` stages run in sequence, each on the previous
stage's output.

The IG-MSA core (normalise q and k over the pixels, the d x d per-head softmax, the product with v * illumination)
runs through the op set's `ig_msa` (lfpv_fast.ops.reference.ig_msa is its definition), chosen by `backend` like
LFPVNet's ops, so a fused kernel replaces it without touching the network.

The LFPV seam (lfpv_fast.models.backbone): sites "level1" (n_feat channels, stride 1: the output of the
first encoder level's transformer, before its downsampling), "level2" (2*n_feat, stride 2, likewise) and
"bottleneck" (4*n_feat, stride 4: the output of the bottleneck transformer, before the decoder; the
default). Decoding from an encoder level runs the rest of the encoder first. With several stages the site
is in the LAST stage: `encode` runs the earlier stages whole.

Published checkpoints: the published key names (`body.0.estimator.conv1.weight`, ...) map one to one onto
this module's parameters (`published_state_dict`, `load_published_state_dict`); files are BasicSR's
`{'params': state_dict}` (and `'params_ema'` next to it when trained with EMA), read by
`state_dict_from_published_checkpoint` and written by `save_published_checkpoint`.

Whole photos, exactly and in bounded memory: lfpv_fast.inference.retinexformer_strips.retinexformer_whole_image_forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfpv_fast.io.files import atomic_write
from lfpv_fast.models.backbone import Site, without_data_parallel_prefix
from lfpv_fast.ops import reference
from lfpv_fast.ops.backends import check_backend, select_ops

LEVELS = 2  # encoder/decoder levels; fixed by the published network (its RetinexFormer always builds two)
ALIGN = 2 ** LEVELS  # input sides must be multiples of this: two stride-2 levels and transposed convs back up
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as published
FEED_FORWARD_EXPANSION = 4


def ig_msa_op(ops: ModuleType):
    """The op set's IG-MSA core; the reference twin while an op set (the Triton kernels) has none yet."""
    return getattr(ops, "ig_msa", reference.ig_msa)


# ----------------------------------------------------------------------------------------------------
# Building blocks.


class IlluminationEstimator(nn.Module):
    """Illumination features and map from the image and its channel mean.

    cat(img, mean over channels) -> 1x1 conv to n_feat -> depthwise-in-groups 5x5 conv (groups = the input's
    channel count, 4 for RGB, as published: not groups=n_feat) = features -> 1x1 conv = map (one per image channel).
    """

    def __init__(self, image_channels: int, n_feat: int) -> None:
        super().__init__()
        inputs = image_channels + 1
        self.pointwise_in = nn.Conv2d(inputs, n_feat, kernel_size=1, bias=True)
        self.grouped_5x5 = nn.Conv2d(n_feat, n_feat, kernel_size=5, padding=2, bias=True, groups=inputs)
        self.pointwise_out = nn.Conv2d(n_feat, image_channels, kernel_size=1, bias=True)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with_mean = torch.cat([img, img.mean(dim=1, keepdim=True)], dim=1)
        features = self.grouped_5x5(self.pointwise_in(with_mean))
        return features, self.pointwise_out(features)


class IlluminationGuidedAttention(nn.Module):
    """IG-MSA: channel-wise multi-head attention with v scaled by the illumination features, plus a position
    term (depthwise 3x3, GELU, depthwise 3x3) computed from v before that scaling. Tensors are channels-last
    (B, H, W, C); heads = C / head_dim."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"IG-MSA: {channels} channels do not split into heads of {head_dim}")
        self.heads = channels // head_dim
        self.to_query = nn.Linear(channels, channels, bias=False)
        self.to_key = nn.Linear(channels, channels, bias=False)
        self.to_value = nn.Linear(channels, channels, bias=False)
        self.head_scale = nn.Parameter(torch.ones(self.heads, 1, 1))  # the softmax temperature, learnt per head
        self.to_output = nn.Linear(channels, channels, bias=True)
        self.position_conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=channels)
        self.position_conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=channels)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, W, C) from x (B, H, W, C)."""
        return self.to_query(x), self.to_key(x), self.to_value(x)

    def position_term(self, v: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) from v (B, H, W, C); the convolutions zero-pad at the map's border."""
        v_nchw = v.permute(0, 3, 1, 2)
        return self.position_conv2(F.gelu(self.position_conv1(v_nchw))).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, illumination: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        batch, height, width, channels = x.shape
        q, k, v = self.project(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, height * width, channels)

        core = ig_msa_op(ops)(tokens(q), tokens(k), tokens(v), tokens(illumination), self.head_scale, self.heads)
        return self.to_output(core).view(batch, height, width, channels) + self.position_term(v)


class PreNormFeedForward(nn.Module):
    """LayerNorm over channels, then 1x1 conv to 4C, GELU, depthwise 3x3, GELU, 1x1 conv back (no biases).
    Channels-last in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels * FEED_FORWARD_EXPANSION
        self.norm = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False, groups=hidden)
        self.contract = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).permute(0, 3, 1, 2)
        h = self.contract(F.gelu(self.depthwise(F.gelu(self.expand(h)))))
        return h.permute(0, 2, 3, 1)


class TransformerBlock(nn.Module):
    """x + IG-MSA(x, illumination), then + feed-forward (pre-norm). Channels-last."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        self.attention = IlluminationGuidedAttention(channels, head_dim)
        self.feed_forward = PreNormFeedForward(channels)

    def forward(self, x: torch.Tensor, illumination: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        x = self.attention(x, illumination, ops) + x
        return self.feed_forward(x) + x


class IlluminationGuidedTransformer(nn.Module):
    """A sequence of transformer blocks at one scale (the published IGAB). (B, C, H, W) in and out."""

    def __init__(self, channels: int, head_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(channels, head_dim) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, illumination: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        illumination = illumination.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x, illumination, ops)
        return x.permute(0, 3, 1, 2)


class EncoderLevel(nn.Module):
    """Transformer blocks at C channels, then stride-2 4x4 convolutions (C -> 2C) of the features and,
    separately, of the illumination features."""

    def __init__(self, channels: int, head_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.transformer = IlluminationGuidedTransformer(channels, head_dim, num_blocks)
        self.downsample = nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1, bias=False)
        self.downsample_illumination = nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1, bias=False)


class DecoderLevel(nn.Module):
    """2x2 stride-2 transposed convolution (2C -> C), 1x1 fusion of cat(upsampled, skip) (2C -> C), transformer
    blocks at C channels."""

    def __init__(self, channels: int, head_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(2 * channels, channels, kernel_size=2, stride=2)
        self.fuse = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.transformer = IlluminationGuidedTransformer(channels, head_dim, num_blocks)


@dataclass
class DenoiserState:
    """What the decoder half needs to finish from an encoder site (see Denoiser.encode)."""

    lit_up: torch.Tensor  # the denoiser's input, added back to its output
    illumination: list[torch.Tensor]  # the illumination features at every level and the bottleneck
    skips: list[torch.Tensor]  # encoder outputs before the site (level 1 first)
    site_level: int  # 0..LEVELS-1: after that encoder level's transformer; LEVELS: after the bottleneck


class Denoiser(nn.Module):
    """The illumination-guided U-shaped transformer (two levels)."""

    def __init__(self, image_channels: int, n_feat: int, num_blocks: list[int]) -> None:
        super().__init__()
        self.embedding = nn.Conv2d(image_channels, n_feat, 3, padding=1, bias=False)
        # Every transformer uses heads of n_feat channels: 1 head at level 1, 2 at level 2, 4 at the bottleneck.
        self.encoder_levels = nn.ModuleList(
            EncoderLevel(n_feat * 2 ** i, n_feat, num_blocks[i]) for i in range(LEVELS))
        self.bottleneck = IlluminationGuidedTransformer(n_feat * 2 ** LEVELS, n_feat, num_blocks[LEVELS])
        # decoder_levels[0] goes from the bottleneck up to level 2, decoder_levels[1] from level 2 up to level 1.
        self.decoder_levels = nn.ModuleList(
            DecoderLevel(n_feat * 2 ** i, n_feat, num_blocks[i]) for i in reversed(range(LEVELS)))
        self.to_image = nn.Conv2d(n_feat, image_channels, 3, padding=1, bias=False)

    def illumination_pyramid(self, illumination: torch.Tensor) -> list[torch.Tensor]:
        """The illumination features at each encoder level and at the bottleneck."""
        pyramid = [illumination]
        for level in self.encoder_levels:
            pyramid.append(level.downsample_illumination(pyramid[-1]))
        return pyramid

    def forward(self, lit_up: torch.Tensor, illumination: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        pyramid = self.illumination_pyramid(illumination)
        features = self.embedding(lit_up)
        skips = []
        for i, level in enumerate(self.encoder_levels):
            features = level.transformer(features, pyramid[i], ops)
            skips.append(features)
            features = level.downsample(features)
        features = self.bottleneck(features, pyramid[LEVELS], ops)
        return self.decode_from_bottleneck(features, lit_up, pyramid, skips, ops)

    def decode_from_bottleneck(self, features: torch.Tensor, lit_up: torch.Tensor, pyramid: list[torch.Tensor],
                               skips: list[torch.Tensor], ops: ModuleType) -> torch.Tensor:
        for i, level in enumerate(self.decoder_levels):
            skip_index = LEVELS - 1 - i
            features = level.fuse(torch.cat([level.upsample(features), skips[skip_index]], dim=1))
            features = level.transformer(features, pyramid[skip_index], ops)
        return self.to_image(features) + lit_up

    def encode(self, lit_up: torch.Tensor, illumination: torch.Tensor, site_level: int,
               ops: ModuleType) -> tuple[torch.Tensor, DenoiserState]:
        """The features at the site (the same operations as forward, in the same order, up to there)."""
        pyramid = self.illumination_pyramid(illumination)
        features = self.embedding(lit_up)
        skips: list[torch.Tensor] = []
        for i, level in enumerate(self.encoder_levels):
            features = level.transformer(features, pyramid[i], ops)
            if i == site_level:
                return features, DenoiserState(lit_up, pyramid, skips, site_level)
            skips.append(features)
            features = level.downsample(features)
        features = self.bottleneck(features, pyramid[LEVELS], ops)
        return features, DenoiserState(lit_up, pyramid, skips, LEVELS)

    def decode(self, features: torch.Tensor, state: DenoiserState, ops: ModuleType) -> torch.Tensor:
        """The image from features at the state's site: the rest of the encoder, the bottleneck, the decoder."""
        skips = list(state.skips)
        if state.site_level < LEVELS:
            for i in range(state.site_level, LEVELS):
                level = self.encoder_levels[i]
                if i > state.site_level:
                    features = level.transformer(features, state.illumination[i], ops)
                skips.append(features)
                features = level.downsample(features)
            features = self.bottleneck(features, state.illumination[LEVELS], ops)
        return self.decode_from_bottleneck(features, state.lit_up, state.illumination, skips, ops)


class RetinexStage(nn.Module):
    """One Retinexformer stage: illumination estimator, lit-up image, denoiser."""

    def __init__(self, image_channels: int, n_feat: int, num_blocks: list[int]) -> None:
        super().__init__()
        self.estimator = IlluminationEstimator(image_channels, n_feat)
        self.denoiser = Denoiser(image_channels, n_feat, num_blocks)

    def light_up(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lit-up image img * map + img, illumination features)."""
        illumination, illumination_map = self.estimator(img)
        return img * illumination_map + img, illumination

    def forward(self, img: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        lit_up, illumination = self.light_up(img)
        return self.denoiser(lit_up, illumination, ops)


@dataclass
class RetinexState:
    """The decoder half's state: the last stage's denoiser state (earlier stages are done by then)."""

    denoiser: DenoiserState


# ----------------------------------------------------------------------------------------------------
# The network.


class RetinexFormer(nn.Module):
    """Retinexformer with the published constructor: RetinexFormer(in_channels=3, out_channels=3, n_feat=40,
    stage=1, num_blocks=[1, 2, 2]) is the network of every published option file (LOL-v1, LOL-v2, SID, SMID,
    SDSD, FiveK). forward(x): x (B, in_channels, H, W), H and W multiples of 4; returns the enhanced image.
    backend: which op set runs the IG-MSA core (lfpv_fast.ops.backends).
    """

    default_site = "bottleneck"
    align = ALIGN

    def __init__(self, in_channels: int = 3, out_channels: int = 3, n_feat: int = 40, stage: int = 1,
                 num_blocks: list[int] | tuple[int, ...] = (1, 2, 2), backend: str = "auto") -> None:
        super().__init__()
        num_blocks = list(num_blocks)
        if in_channels < 1 or out_channels != in_channels:
            raise ValueError(f"RetinexFormer: out_channels ({out_channels}) must equal in_channels ({in_channels}) "
                             "and be >= 1: the denoiser adds its input back to its output")
        if n_feat < 1 or n_feat % (in_channels + 1):
            raise ValueError(f"RetinexFormer: n_feat={n_feat} must be a positive multiple of in_channels + 1 = "
                             f"{in_channels + 1} (the estimator's grouped 5x5 convolution has that many groups)")
        if stage < 1:
            raise ValueError(f"RetinexFormer: stage={stage} must be >= 1")
        if len(num_blocks) != LEVELS + 1 or any(not isinstance(n, int) or n < 0 for n in num_blocks):
            raise ValueError(f"RetinexFormer: num_blocks={num_blocks} must be {LEVELS + 1} block counts >= 0 "
                             "(level 1, level 2, bottleneck)")
        check_backend(backend)
        self.backend = backend
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_feat = n_feat
        self.stage = stage
        self.num_blocks = num_blocks
        self.stages = nn.ModuleList(RetinexStage(in_channels, n_feat, num_blocks) for _ in range(stage))
        self.sites: dict[str, Site] = {f"level{i + 1}": Site(f"level{i + 1}", n_feat * 2 ** i, 2 ** i)
                                       for i in range(LEVELS)}
        self.sites["bottleneck"] = Site("bottleneck", n_feat * 2 ** LEVELS, 2 ** LEVELS)
        self._published_names = self._build_published_names()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The published initialisation: linear weights truncated-normal (std 0.02, cut at +-2) with zero
        biases, layer norms 1 and 0, the attention scales 1, convolutions PyTorch's default."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, IlluminationGuidedAttention):
                nn.init.ones_(module.head_scale)

    def ops_for(self, x: torch.Tensor) -> ModuleType:
        """The op implementations for this input (lfpv_fast.ops.backends.select_ops)."""
        return select_ops(self.backend, x)

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is a floating (B, in_channels, H, W) tensor with H, W multiples of `align`."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"RetinexFormer expects x of shape (B, {self.in_channels}, H, W), got {shape}")
        height, width = x.shape[-2:]
        if height < self.align or width < self.align or height % self.align or width % self.align:
            raise ValueError(f"RetinexFormer needs H and W to be positive multiples of {self.align} (two stride-2 "
                             f"levels), got {height}x{width}; pad the image (the published test script pads by "
                             "reflection) and crop the output")
        if not x.is_floating_point():
            raise ValueError(f"RetinexFormer expects a floating-point x, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        ops = self.ops_for(x)
        for stage in self.stages:
            x = stage(x, ops)
        return x

    # ------------------------------------------------------------------------------------------------
    # The LFPV seam (lfpv_fast.models.backbone).

    def site_level(self, site: str) -> int:
        if site not in self.sites:
            raise ValueError(f"RetinexFormer has no site {site!r}; its sites are {', '.join(self.sites)}")
        return LEVELS if site == "bottleneck" else int(site[len("level"):]) - 1

    def encode(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, RetinexState]:
        """The features at `site` of the LAST stage (earlier stages run whole), and the decoder's state."""
        site_level = self.site_level(site)
        self.check_input(x)
        ops = self.ops_for(x)
        for stage in self.stages[:-1]:
            x = stage(x, ops)
        last = self.stages[-1]
        lit_up, illumination = last.light_up(x)
        features, state = last.denoiser.encode(lit_up, illumination, site_level, ops)
        return features, RetinexState(state)

    def decode(self, features: torch.Tensor, state: RetinexState) -> torch.Tensor:
        """The enhanced image from (possibly modified) site features; decode(*encode(x, site)) == forward(x)."""
        return self.stages[-1].denoiser.decode(features, state.denoiser, self.ops_for(features))

    # ------------------------------------------------------------------------------------------------
    # Published state dicts.

    def _build_published_names(self) -> dict[str, str]:
        """This module's state_dict key -> the published key, for every parameter (checked complete)."""
        names: dict[str, str] = {}

        def add(ours: str, theirs: str) -> None:
            names[ours] = theirs

        def add_transformer(ours: str, theirs: str, transformer: IlluminationGuidedTransformer) -> None:
            for j in range(len(transformer.blocks)):
                a, pa = f"{ours}.blocks.{j}.attention.", f"{theirs}.blocks.{j}.0."
                # In the published order (a module's own parameters before its submodules').
                for mine, published in [("head_scale", "rescale"), ("to_query.weight", "to_q.weight"),
                                        ("to_key.weight", "to_k.weight"), ("to_value.weight", "to_v.weight"),
                                        ("to_output.weight", "proj.weight"), ("to_output.bias", "proj.bias"),
                                        ("position_conv1.weight", "pos_emb.0.weight"),
                                        ("position_conv2.weight", "pos_emb.2.weight")]:
                    add(a + mine, pa + published)
                f, pf = f"{ours}.blocks.{j}.feed_forward.", f"{theirs}.blocks.{j}.1."
                for mine, published in [("expand.weight", "fn.net.0.weight"), ("depthwise.weight", "fn.net.2.weight"),
                                        ("contract.weight", "fn.net.4.weight"), ("norm.weight", "norm.weight"),
                                        ("norm.bias", "norm.bias")]:
                    add(f + mine, pf + published)

        for s, stage in enumerate(self.stages):
            ours, theirs = f"stages.{s}", f"body.{s}"
            for mine, published in [("pointwise_in", "conv1"), ("grouped_5x5", "depth_conv"),
                                    ("pointwise_out", "conv2")]:
                for p in ("weight", "bias"):
                    add(f"{ours}.estimator.{mine}.{p}", f"{theirs}.estimator.{published}.{p}")
            d, pd = f"{ours}.denoiser", f"{theirs}.denoiser"
            add(f"{d}.embedding.weight", f"{pd}.embedding.weight")
            for i, level in enumerate(stage.denoiser.encoder_levels):
                add_transformer(f"{d}.encoder_levels.{i}.transformer", f"{pd}.encoder_layers.{i}.0", level.transformer)
                add(f"{d}.encoder_levels.{i}.downsample.weight", f"{pd}.encoder_layers.{i}.1.weight")
                add(f"{d}.encoder_levels.{i}.downsample_illumination.weight", f"{pd}.encoder_layers.{i}.2.weight")
            add_transformer(f"{d}.bottleneck", f"{pd}.bottleneck", stage.denoiser.bottleneck)
            for i, level in enumerate(stage.denoiser.decoder_levels):
                add(f"{d}.decoder_levels.{i}.upsample.weight", f"{pd}.decoder_layers.{i}.0.weight")
                add(f"{d}.decoder_levels.{i}.upsample.bias", f"{pd}.decoder_layers.{i}.0.bias")
                add(f"{d}.decoder_levels.{i}.fuse.weight", f"{pd}.decoder_layers.{i}.1.weight")
                add_transformer(f"{d}.decoder_levels.{i}.transformer", f"{pd}.decoder_layers.{i}.2", level.transformer)
            add(f"{d}.to_image.weight", f"{pd}.mapping.weight")

        ours_keys = set(self.state_dict())
        if set(names) != ours_keys or len(set(names.values())) != len(names):  # a bug here, not a user error
            raise AssertionError(f"published key map incomplete: {sorted(ours_keys ^ set(names))[:5]}")
        return names

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the published key names (what the published code's load_state_dict takes),
        in the published order."""
        ours = self.state_dict()
        return {theirs: ours[mine].detach().clone() for mine, theirs in self._published_names.items()}

    def describe(self) -> str:
        return (f"RetinexFormer(in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"n_feat={self.n_feat}, stage={self.stage}, num_blocks={self.num_blocks})")

    def load_published_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a published state dict strictly: every published key of this configuration, nothing else, every
        shape as expected; otherwise a ValueError naming the first offending key. A `module.` prefix (saved
        from DataParallel) is stripped from every key that has it."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"expected a Retinexformer state dict (a mapping of names to tensors), "
                             f"got {type(state_dict).__name__}")
        given = without_data_parallel_prefix(state_dict)
        expected = {theirs: mine for mine, theirs in self._published_names.items()}
        unexpected = [k for k in given if k not in expected]
        if unexpected:
            raise ValueError(f"unexpected key {unexpected[0]!r} in the Retinexformer state dict "
                             f"({len(unexpected)} unexpected in all; expected the published keys of {self.describe()})")
        missing = [k for k in expected if k not in given]
        if missing:
            raise ValueError(f"missing key {missing[0]!r} in the Retinexformer state dict ({len(missing)} missing "
                             f"in all; expected the published keys of {self.describe()})")
        ours = self.state_dict()
        converted = {}
        for theirs, mine in expected.items():
            value = given[theirs]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"key {theirs!r} of the Retinexformer state dict holds a {type(value).__name__}, "
                                 "expected a tensor")
            if value.shape != ours[mine].shape:
                raise ValueError(f"key {theirs!r} of the Retinexformer state dict has shape {tuple(value.shape)}, "
                                 f"expected {tuple(ours[mine].shape)} for {self.describe()}")
            if not value.is_floating_point():
                raise ValueError(f"key {theirs!r} of the Retinexformer state dict has dtype {value.dtype}, "
                                 "expected a floating-point tensor")
            converted[mine] = value
        self.load_state_dict(converted, strict=True)

    @classmethod
    def from_published_state_dict(cls, state_dict: Mapping[str, torch.Tensor], backend: str = "auto",
                                  **config: Any) -> RetinexFormer:
        """A network of the given configuration (the published defaults otherwise) loaded strictly."""
        net = cls(backend=backend, **config)
        net.load_published_state_dict(state_dict)
        return net


# ----------------------------------------------------------------------------------------------------
# Published checkpoint files (BasicSR's format).

PUBLISHED_WEIGHT_ENTRIES = ("params", "params_ema")
# Every Retinexformer state dict has keys under this prefix (how a file is recognised); and what a message calls
# the format.
_SIGNATURE_PREFIX = "body.0.estimator."
PUBLISHED_FORMAT = (f"a published Retinexformer file (BasicSR's {{'params': ...}} with keys such as "
                    f"'{_SIGNATURE_PREFIX}conv1.weight')")


def state_dict_from_published_checkpoint(obj: Any, source: str = "checkpoint",
                                         entry: str | None = None) -> dict[str, torch.Tensor]:
    """The Retinexformer state dict in a loaded published checkpoint file (published key names, `module.` stripped).

    BasicSR files hold the weights under 'params', and under 'params_ema' too when trained with an exponential
    moving average. Without `entry`, 'params' is read where present: the published test script
    (Enhancement/test_from_dataset.py) loads checkpoint['params'], and the released weights hold it; a file with
    only 'params_ema' gives that. A bare state dict (every value a tensor) is taken as is.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a Retinexformer checkpoint (a dict), got {type(obj).__name__}")
    if entry is not None:
        if entry not in obj:
            raise ValueError(f"{source}: no entry {entry!r} in the checkpoint; it has {', '.join(map(str, obj))}")
        state = obj[entry]
    else:
        present = [name for name in PUBLISHED_WEIGHT_ENTRIES if name in obj]
        if present:
            state = obj[present[0]]
            entry = present[0]
        elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        else:
            found = ", ".join(map(str, list(obj)[:8]))
            raise ValueError(f"{source}: not a Retinexformer checkpoint: expected BasicSR's 'params' (or "
                             f"'params_ema') entry or a bare state dict, found keys {found}")
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: entry {entry!r} holds a {type(state).__name__}, expected a state dict")
    return without_data_parallel_prefix(state)


def published_weights(obj: Any) -> dict[str, torch.Tensor] | None:
    """The Retinexformer state dict of a loaded file if it is a published Retinexformer checkpoint, else None."""
    try:
        state = state_dict_from_published_checkpoint(obj)
    except ValueError:
        return None
    return state if any(isinstance(k, str) and k.startswith(_SIGNATURE_PREFIX) for k in state) else None


def published_checkpoint(net: RetinexFormer) -> dict[str, dict[str, torch.Tensor]]:
    """The network's weights in BasicSR's file layout, {'params': published state dict}, which the published
    test script and BasicSR's load_network read."""
    return {"params": {k: v.cpu() for k, v in net.published_state_dict().items()}}


def save_published_checkpoint(net: RetinexFormer, path: str | Path) -> None:
    """Write published_checkpoint(net) to `path` atomically (a crash leaves the old file or none)."""
    obj = published_checkpoint(net)
    atomic_write(path, lambda f: torch.save(obj, f))
