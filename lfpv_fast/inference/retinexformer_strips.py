"""Exact whole-image Retinexformer inference in bounded memory: the network run over horizontal strips.

Why it is exact. Every operation of Retinexformer is local (pointwise linear layers, layer norms and GELUs;
3x3 and 5x5 convolutions; the stride-2 4x4 downsampling; the 2x2 transposed-convolution upsampling) except the
IG-MSA core, whose per-head d x d attention matrix reduces over ALL pixels of its feature map:
    A = softmax(rescale * normalize(K) normalize(Q)^T) = softmax(rescale * diag(1/|k|) (K Q^T) diag(1/|q|))
with K, Q the head's (d, N) key and query matrices and |k|, |q| their row norms over the pixels. So each IG-MSA
layer takes two passes over the strips: pass 1 accumulates K Q^T (d x d) and the squared row norms of q and k
over every pixel (q and k are per-pixel projections: no halo); pass 2 applies A to v * illumination strip by
strip. Given every A, the whole network is local, and a strip of any map is computed from a strip of the maps
it depends on widened by a halo; a convolution zero-pads only at the map's true top and bottom borders, so every
row equals the whole-map computation (up to the summation order of the reductions: K Q^T and the norms are
summed strip by strip; convolutions may pick other kernels for other shapes).

What is kept whole (two-level network, C = n_feat, N = H * W pixels, B the batch; element counts):
  - the input image (B * in_channels * N) and, at the end, the output (B * out_channels * N);
  - level 2: the encoder map, later the decoder map, rewritten in place layer by layer (B * C/2 * N), and the
    illumination features at level 2 (B * C/2 * N; with low_memory recomputed from the image wherever read);
  - the bottleneck map (B * C/4 * N), rewritten in place, freed once the decoder has fused it.
Level 1 (C channels at full resolution, the largest maps) is never stored: its maps (the illumination estimate,
the lit-up image, the embedding, the level-1 encoder blocks = the skip) are recomputed from the image strip by
strip, with halos, wherever needed (the level-1 statistics pass, the downsampling to level 2, and both passes
of every decoder level-1 block). The bottleneck illumination is recomputed from the level-2 one.
Peak: B * N * (in_channels + 5/4 C) elements kept (53 per pixel for C=40: ~5 GB at 24 MP in fp32; with
low_memory in_channels + 3/4 C, 33 per pixel, ~3.2 GB) plus one strip's working set (see
`estimate_retinexformer_peak_bytes`). A block rewritten in place keeps the old rows its next strip still reads as
halo (a few rows), so no second copy of a map is needed.

With several stages, each runs this way on the previous stage's output; the LFPV hook is in the last stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfpv_fast.models.retinexformer import (
    LEVELS,
    IlluminationGuidedTransformer,
    RetinexFormer,
    RetinexStage,
    TransformerBlock,
)

RowSource = Callable[[int, int], torch.Tensor]  # rows [a, b) of a (B, C, H, W) map -> (B, C, b - a, W)
NORMALIZE_EPS = 1e-12  # F.normalize's default, as in the IG-MSA core
BLOCK_HALO = 3  # rows a transformer block reads beyond its output: position term 2 (two 3x3), feed-forward 1
SITE_PATCH = 4  # the LFPV patch size: strips at the site start on multiples of it


# ----------------------------------------------------------------------------------------------------
# Rows of convolutions.


def _crop(t: torch.Tensor, start: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of t, which holds rows [start, start + t.shape[-2])."""
    if a < start or b > start + t.shape[-2]:
        raise AssertionError(f"rows [{a}, {b}) not in [{start}, {start + t.shape[-2]})")
    return t[:, :, a - start:b - start]


def _same_conv_rows(conv: nn.Conv2d, x: torch.Tensor, start: int, height: int) -> tuple[torch.Tensor, int]:
    """A stride-1 'same' convolution over rows [start, start + x.shape[-2]) of a map of `height` rows. Zero rows
    are added only at the map's top and bottom, so every output row it returns is the whole-map convolution's row.
    Returns (the output rows, the first one's index)."""
    pad_h, pad_w = conv.padding
    end = start + x.shape[-2]
    top = pad_h if start == 0 else 0
    bottom = pad_h if end == height else 0
    if top or bottom:
        x = F.pad(x, (0, 0, top, bottom))
    out = F.conv2d(x, conv.weight, conv.bias, padding=(0, pad_w), groups=conv.groups)
    return out, start + pad_h - top


def _conv_rows(conv: nn.Conv2d, source: RowSource, height: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of conv(map), the map given by its rows."""
    pad = conv.padding[0]
    lo, hi = max(a - pad, 0), min(b + pad, height)
    out, start = _same_conv_rows(conv, source(lo, hi), lo, height)
    return _crop(out, start, a, b)


def _downsample_rows(conv: nn.Conv2d, source: RowSource, height_in: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of the stride-2 4x4 convolution (padding 1) of a map of `height_in` rows: output row o reads
    input rows 2o-1 .. 2o+2."""
    if conv.kernel_size != (4, 4) or conv.stride != (2, 2) or conv.padding != (1, 1):
        raise AssertionError("expected Retinexformer's 4x4 stride-2 downsampling")
    lo, hi = max(2 * a - 1, 0), min(2 * b + 1, height_in)
    x = source(lo, hi)
    top, bottom = lo - (2 * a - 1), (2 * b + 1) - hi
    if top or bottom:
        x = F.pad(x, (0, 0, top, bottom))
    return F.conv2d(x, conv.weight, conv.bias, stride=2, padding=(0, 1))


def _upsample_rows(conv: nn.ConvTranspose2d, coarse: RowSource, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of the 2x2 stride-2 transposed convolution: fine row r comes from coarse row r // 2 only."""
    lo, hi = a // 2, (b + 1) // 2
    out = F.conv_transpose2d(coarse(lo, hi), conv.weight, conv.bias, stride=2)
    return _crop(out, 2 * lo, a, b)


def _stored(store: torch.Tensor) -> RowSource:
    return lambda a, b: store[:, :, a:b]


def _rewrite_in_place(store: torch.Tensor, strip: int, halo: int,
                      compute: Callable[[int, int, RowSource], torch.Tensor]) -> None:
    """store[:, :, a:b] = compute(a, b, old) for strips [a, b) top to bottom, where compute reads the map as it was
    before this rewrite through old(lo, hi), lo >= a - halo. The old rows above a strip that the strips below
    still read are kept aside (at most `halo` rows), so no second copy of the map is needed."""
    height = store.shape[-2]
    kept = store[:, :, :0].clone()  # the old rows [kept_start, a)
    kept_start = 0
    for a in range(0, height, strip):
        b = min(a + strip, height)

        def old(lo: int, hi: int, a: int = a, kept: torch.Tensor = kept, kept_start: int = kept_start) -> torch.Tensor:
            if lo < kept_start:
                raise AssertionError(f"strip at row {a} reads row {lo}, beyond its halo of {halo}")
            parts = []
            if lo < a:
                parts.append(kept[:, :, lo - kept_start:min(hi, a) - kept_start])
            if hi > a:
                parts.append(store[:, :, max(lo, a):hi])
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

        new = compute(a, b, old)
        keep_from = max(b - halo, 0)
        kept = torch.cat([kept, store[:, :, a:b]], dim=2)[:, :, keep_from - kept_start:].clone()
        kept_start = keep_from
        store[:, :, a:b] = new


# ----------------------------------------------------------------------------------------------------
# IG-MSA in two passes, transformer blocks by rows.


def _attention_matrices(block: TransformerBlock, source: RowSource, height: int, strip: int) -> torch.Tensor:
    """Pass 1 of an IG-MSA layer: its per-head attention matrices softmax(rescale * Kn Qn^T), (B, heads, d, d),
    from K Q^T and the squared row norms of q and k accumulated over every strip of its input map."""
    attention = block.attention
    heads = attention.heads
    gram = sq_norm_q = sq_norm_k = None
    for a in range(0, height, strip):
        x = source(a, min(a + strip, height)).permute(0, 2, 3, 1)
        batch, rows, width, channels = x.shape
        q = attention.to_query(x).reshape(batch, rows * width, heads, channels // heads)
        k = attention.to_key(x).reshape(batch, rows * width, heads, channels // heads)
        strip_gram = torch.einsum("bnhi,bnhj->bhij", k, q)  # K Q^T: key channel i, query channel j
        strip_q, strip_k = (q * q).sum(dim=1), (k * k).sum(dim=1)  # (B, heads, d)
        if gram is None:
            gram, sq_norm_q, sq_norm_k = strip_gram, strip_q, strip_k
        else:
            gram, sq_norm_q, sq_norm_k = gram + strip_gram, sq_norm_q + strip_q, sq_norm_k + strip_k
    norm_q = sq_norm_q.sqrt().clamp_min(NORMALIZE_EPS)
    norm_k = sq_norm_k.sqrt().clamp_min(NORMALIZE_EPS)
    logits = gram / (norm_k.unsqueeze(-1) * norm_q.unsqueeze(-2)) * attention.head_scale.reshape(1, heads, 1, 1)
    return logits.softmax(dim=-1)


def _block_rows(block: TransformerBlock, attention_matrix: torch.Tensor, source: RowSource, illumination: RowSource,
                height: int, a: int, b: int) -> torch.Tensor:
    """Pass 2: rows [a, b) of a transformer block's output, from rows [a - 3, b + 3) of its input (B, C, ., W)."""
    attention, feed_forward = block.attention, block.feed_forward
    lo, hi = max(a - BLOCK_HALO, 0), min(b + BLOCK_HALO, height)
    x = source(lo, hi).permute(0, 2, 3, 1)  # channels-last, rows [lo, hi)
    v = attention.to_value(x)
    # The position term, the residual and the attention output are needed on rows [lo1, hi1): the feed-forward's
    # depthwise 3x3 then gives rows [a, b).
    lo1, hi1 = max(a - 1, 0), min(b + 1, height)
    v_nchw = v.permute(0, 3, 1, 2)
    position, start = _same_conv_rows(attention.position_conv1, v_nchw, lo, height)
    position, start = _same_conv_rows(attention.position_conv2, F.gelu(position), start, height)
    position = _crop(position, start, lo1, hi1).permute(0, 2, 3, 1)
    v_illuminated = v[:, lo1 - lo:hi1 - lo] * illumination(lo1, hi1).permute(0, 2, 3, 1)
    batch, rows, width, channels = v_illuminated.shape
    heads = attention.heads
    v_heads = v_illuminated.reshape(batch, rows * width, heads, channels // heads).transpose(1, 2)  # (B, h, n, d)
    core = (v_heads @ attention_matrix.transpose(-2, -1)).transpose(1, 2).reshape(batch, rows, width, channels)
    x1 = (attention.to_output(core) + position) + x[:, lo1 - lo:hi1 - lo]

    hidden = F.gelu(feed_forward.expand(feed_forward.norm(x1).permute(0, 3, 1, 2)))
    hidden, start = _same_conv_rows(feed_forward.depthwise, hidden, lo1, height)
    hidden = feed_forward.contract(F.gelu(_crop(hidden, start, a, b)))
    return (hidden.permute(0, 2, 3, 1) + x1[:, a - lo1:b - lo1]).permute(0, 3, 1, 2)


def _transformer_as_rows(transformer: IlluminationGuidedTransformer, source: RowSource, illumination: RowSource,
                         height: int, strip: int) -> RowSource:
    """The transformer's output map as rows, recomputed from its input's rows on demand (nothing stored): each
    block's attention matrices come from a pass over the strips of the previous block's output."""
    for block in transformer.blocks:
        matrix = _attention_matrices(block, source, height, strip)
        source = _block_source(block, matrix, source, illumination, height)
    return source


def _block_source(block: TransformerBlock, matrix: torch.Tensor, source: RowSource, illumination: RowSource,
                  height: int) -> RowSource:
    return lambda a, b: _block_rows(block, matrix, source, illumination, height, a, b)


def _transformer_in_place(transformer: IlluminationGuidedTransformer, store: torch.Tensor, illumination: RowSource,
                          strip: int) -> None:
    """Run the transformer on a stored map, rewriting it block by block."""
    height = store.shape[-2]
    for block in transformer.blocks:
        matrix = _attention_matrices(block, _stored(store), height, strip)
        _rewrite_in_place(store, strip, BLOCK_HALO, lambda a, b, old, block=block, matrix=matrix: _block_rows(
            block, matrix, old, illumination, height, a, b))


# ----------------------------------------------------------------------------------------------------
# One stage.


def _stage_by_strips(stage: RetinexStage, x: torch.Tensor, rows: int,
                     at_site: Callable[[torch.Tensor], torch.Tensor] | None, low_memory: bool) -> torch.Tensor:
    estimator, denoiser = stage.estimator, stage.denoiser
    if LEVELS != 2:
        raise AssertionError("the strip path is written for Retinexformer's two levels")
    batch, _, height, width = x.shape
    heights = [height >> level for level in range(LEVELS + 1)]
    strips = [max(rows >> level, 1) for level in range(LEVELS + 1)]

    # The estimator's rows are asked for many times per strip (for the embedding, the illumination of each
    # level-1 block, the lit-up image added at the end), each time inside the first, widest window: keep it.
    last_estimate: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}

    def estimate(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [a, b) of the illumination features and of the lit-up image."""
        if "rows" in last_estimate:
            lo, hi, features, lit = last_estimate["rows"]
            if lo <= a and b <= hi:
                return features[:, :, a - lo:b - lo], lit[:, :, a - lo:b - lo]
        pad = estimator.grouped_5x5.padding[0]
        lo, hi = max(a - pad, 0), min(b + pad, height)
        img = x[:, :, lo:hi]
        features = estimator.pointwise_in(torch.cat([img, img.mean(dim=1, keepdim=True)], dim=1))
        features, start = _same_conv_rows(estimator.grouped_5x5, features, lo, height)
        features = _crop(features, start, a, b)
        img = x[:, :, a:b]
        lit = img * estimator.pointwise_out(features) + img
        last_estimate["rows"] = (a, b, features, lit)
        return features, lit

    def illumination1(a: int, b: int) -> torch.Tensor:
        return estimate(a, b)[0]

    def lit_up(a: int, b: int) -> torch.Tensor:
        return estimate(a, b)[1]

    def embedding(a: int, b: int) -> torch.Tensor:
        return _conv_rows(denoiser.embedding, lit_up, height, a, b)

    level1, level2 = denoiser.encoder_levels
    up2, up1 = denoiser.decoder_levels  # bottleneck -> level 2, level 2 -> level 1

    # Level 1, never stored: its output (the skip) as rows recomputed from the image.
    skip1 = _transformer_as_rows(level1.transformer, embedding, illumination1, heights[0], strips[0])

    # Level 2: the downsampled skip and illumination, stored; its blocks rewrite the map in place.
    # The stored maps, by name, so that dropping one from here frees it.
    stored: dict[str, torch.Tensor] = {}
    map2 = x.new_empty(batch, level1.downsample.out_channels, heights[1], width // 2)
    if not low_memory:
        stored["illumination2"] = x.new_empty(batch, level1.downsample_illumination.out_channels, heights[1],
                                              width // 2)
    for a in range(0, heights[1], strips[1]):
        b = min(a + strips[1], heights[1])
        map2[:, :, a:b] = _downsample_rows(level1.downsample, skip1, heights[0], a, b)
        if not low_memory:
            stored["illumination2"][:, :, a:b] = _downsample_rows(level1.downsample_illumination, illumination1,
                                                                  heights[0], a, b)

    def illumination2(a: int, b: int) -> torch.Tensor:
        if not low_memory:
            return stored["illumination2"][:, :, a:b]
        # Recomputed from the image's rows (C/2 elements per pixel not kept; about 40% more time at n_feat 40).
        return _downsample_rows(level1.downsample_illumination, illumination1, heights[0], a, b)

    _transformer_in_place(level2.transformer, map2, illumination2, strips[1])

    # Bottleneck, stored; its illumination recomputed from level 2's.
    def illumination3(a: int, b: int) -> torch.Tensor:
        return _downsample_rows(level2.downsample_illumination, illumination2, heights[1], a, b)

    map3 = x.new_empty(batch, level2.downsample.out_channels, heights[2], width // 4)
    for a in range(0, heights[2], strips[2]):
        b = min(a + strips[2], heights[2])
        map3[:, :, a:b] = _downsample_rows(level2.downsample, _stored(map2), heights[1], a, b)
    _transformer_in_place(denoiser.bottleneck, map3, illumination3, strips[2])
    if at_site is not None:
        for a in range(0, heights[2], strips[2]):
            b = min(a + strips[2], heights[2])
            fused = at_site(map3[:, :, a:b])
            if fused.shape != map3[:, :, a:b].shape:
                raise ValueError(f"at_site returned shape {tuple(fused.shape)} for a bottleneck strip of shape "
                                 f"{tuple(map3[:, :, a:b].shape)}; expected the same shape")
            map3[:, :, a:b] = fused

    # Decoder level 2: fuse(upsampled bottleneck, level-2 skip) is pointwise per row pair: in place over the skip.
    for a in range(0, heights[1], strips[1]):
        b = min(a + strips[1], heights[1])
        upsampled = _upsample_rows(up2.upsample, _stored(map3), a, b)
        map2[:, :, a:b] = up2.fuse(torch.cat([upsampled, map2[:, :, a:b]], dim=1))
    del map3
    _transformer_in_place(up2.transformer, map2, illumination2, strips[1])
    stored.pop("illumination2", None)

    # Decoder level 1, never stored: fuse(upsampled level 2, recomputed skip), its blocks, the output projection.
    def fused1(a: int, b: int) -> torch.Tensor:
        return up1.fuse(torch.cat([_upsample_rows(up1.upsample, _stored(map2), a, b), skip1(a, b)], dim=1))

    decoded1 = _transformer_as_rows(up1.transformer, fused1, illumination1, heights[0], strips[0])
    out = x.new_empty(batch, denoiser.to_image.out_channels, height, width)
    for a in range(0, height, strips[0]):
        b = min(a + strips[0], height)
        out[:, :, a:b] = _conv_rows(denoiser.to_image, decoded1, height, a, b) + lit_up(a, b)
    return out


def retinexformer_whole_image_forward(net: RetinexFormer, x: torch.Tensor, rows: int,
                                      at_site: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                      low_memory: bool = False) -> torch.Tensor:
    """net(x) computed over horizontal strips of `rows` image rows, in memory that grows with the strip and
    (linearly, with a small constant) with the image: see this module's docstring. No gradients.

    rows: a positive multiple of net.align (4), so that every level's strips are whole rows (rows/2 at level 2,
    rows/4 at the bottleneck). Strips may be smaller than the receptive field; small strips only cost time.
    at_site: applied to the bottleneck features (the default LFPV site, of the LAST stage) strip by strip, in
    place of them, before the decoder: at_site(features) must return a tensor of the same shape. Its strips
    are rows // 4 bottleneck rows starting at multiples of that, so with at_site, rows must be a multiple of
    4 * 4 = 16 (the site's stride times the LFPV patch size): every strip then starts on the patch grid, and
    a local per-pixel or per-4x4-patch operation gives the same result as on the whole map.
    low_memory: recompute the level-2 illumination features from the image wherever they are read instead of
    keeping them (C/2 fewer elements kept per pixel: 53 -> 33 at n_feat 40; the same result, more time).
    The IG-MSA layers run in this module's two-pass form (not the op set's ig_msa, which needs the whole map).
    """
    net.check_input(x)
    if not isinstance(rows, int) or rows < 1 or rows % net.align:
        raise ValueError(f"rows must be a positive multiple of {net.align} (the network's alignment), got {rows!r}")
    site_stride = net.sites[net.default_site].stride
    if at_site is not None and rows % (site_stride * SITE_PATCH):
        raise ValueError(f"with at_site, rows must be a multiple of {site_stride * SITE_PATCH} (the bottleneck's "
                         f"stride {site_stride} times the LFPV patch size {SITE_PATCH}), got {rows}")
    with torch.no_grad():
        for i, stage in enumerate(net.stages):
            x = _stage_by_strips(stage, x, rows, at_site if i == len(net.stages) - 1 else None, low_memory)
    return x


# ----------------------------------------------------------------------------------------------------
# Memory estimates.


# Measured on the CPU (peak RSS above the start, float32, n_feat 40, batch 1, bench/bench_retinexformer_whole.py's
# child at 384x256 and 768x512): the untiled forward peaks at about 19.4 * n_feat elements per pixel (its
# attention's q, k, v, their normalised and per-head copies, the feed-forward's 4C hidden maps, the skips and the
# illumination pyramid); a strip's working set at about 22 * n_feat elements per pixel of the strip widened by
# about 42 rows of halo (rows 32 and 64 at width 768 fit this), the nested halos of the decoder's level-1 block
# over the recomputed level-1 skip.
UNTILED_ELEMENTS_PER_PIXEL_PER_CHANNEL = 19.5
STRIP_ELEMENTS_PER_PIXEL_PER_CHANNEL = 22
STRIP_HALO_ROWS = 42


def estimate_retinexformer_peak_bytes(n_feat: int, num_blocks: list[int] | tuple[int, ...], batch: int, height: int,
                                      width: int, element_size: int, rows: int | None = None,
                                      in_channels: int = 3, low_memory: bool = False) -> int:
    """Estimated peak bytes of the tensors of one Retinexformer forward without gradients (input and output
    included), untiled (rows=None: net(x)) or by strips of `rows` rows (retinexformer_whole_image_forward, with
    its low_memory).
    num_blocks is accepted for the configuration's sake: blocks run one after another, so their count does not
    change the peak. Model weights are not included.
    """
    del num_blocks
    pixels = batch * height * width
    if rows is None:
        return int(element_size * pixels * (2 * in_channels + UNTILED_ELEMENTS_PER_PIXEL_PER_CHANNEL * n_feat))
    # The input, the level-2 map and (unless low_memory) illumination, the bottleneck map.
    kept = in_channels + n_feat / 2 + (0 if low_memory else n_feat / 2) + n_feat / 4
    strip_pixels = batch * min(rows + STRIP_HALO_ROWS, height) * width
    working = strip_pixels * STRIP_ELEMENTS_PER_PIXEL_PER_CHANNEL * n_feat
    return int(element_size * (pixels * kept + working))
