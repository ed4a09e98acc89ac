"""Eager PyTorch twins of every fast op: the definition of correct.

Each function computes exactly what the published LFPVs code computes (same operation order where
it matters for rounding), in whatever dtype it is given. The Triton kernels in
`lfpv_fast.kernels` are tested against these functions, and `LFPVNet(backend="reference")` runs
the whole model through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The published masked score (-1e9), stated once with the kernels that share it; part of this op set.
from lfpv_fast.kernels.conventions import MASKED_SCORE  # noqa: F401


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB -> (B,1,H,W) luminance with the published weights."""
    return x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def box_blur5(x: torch.Tensor) -> torch.Tensor:
    """5x5 mean filter per channel with reflect-101 borders (OpenCV's cv2.blur default)."""
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")  # torch's "reflect" excludes the edge: reflect-101
    return F.avg_pool2d(padded, kernel_size=5, stride=1)


def snr_mask(x: torch.Tensor) -> torch.Tensor:
    """SNR map (B,1,H,W) of an RGB batch in [0,1], as the published training code computes it.

    light = lum(blur(x)), dark = lum(x); r = light / (|dark - light| + 1e-4); r /= max_per_image(r) + 1e-4;
    clamp to [0, 1].
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"snr_mask expects a (B,3,H,W) RGB batch, got shape {tuple(x.shape)}")
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"snr_mask needs H, W >= 3 for the 5x5 reflect-101 blur, got {tuple(x.shape)}")
    dark = luminance(x)
    light = luminance(box_blur5(x))
    ratio = light / (torch.abs(dark - light) + 0.0001)
    peak = ratio.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return torch.clamp(ratio * 1.0 / (peak + 0.0001), min=0.0, max=1.0)


def query_fusion(
    features: torch.Tensor,
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    pixel_norm: tuple[torch.Tensor, torch.Tensor],
    vector_bank_norm: tuple[torch.Tensor, torch.Tensor],
    patch_norm: tuple[torch.Tensor, torch.Tensor],
    patch_bank_norm: tuple[torch.Tensor, torch.Tensor],
    eps: float = 1e-5,
) -> torch.Tensor:
    """features + vector-bank attention (per pixel) + patch-bank attention (per p x p patch).

    features (B,C,H,W); bank_vectors (N,C); bank_patches (N,C,p,p); each norm is (weight, bias) of a
    LayerNorm: over C for pixels and the vector bank, over C*p*p for patches and the patch bank.
    Scores are plain dot products of the LayerNorm'd query and bank (no 1/sqrt(d) scale, as published);
    the values are the raw (un-normalised) bank entries.
    """
    b, c, h, w = features.shape
    n, p = bank_patches.shape[0], bank_patches.shape[-1]

    queries = F.layer_norm(features.reshape(b, c, h * w).permute(0, 2, 1), (c,), *pixel_norm, eps)
    keys = F.layer_norm(bank_vectors, (c,), *vector_bank_norm, eps)
    weights = torch.softmax(queries @ keys.t(), dim=2)  # (B, HW, N)
    vector_update = (weights @ bank_vectors).reshape(b, h, w, c).permute(0, 3, 1, 2)

    d = c * p * p
    # pixel_unshuffle lays a patch out channel-major: index c*p*p + i*p + j, as bank_patches.reshape(N, d).
    patches = F.pixel_unshuffle(features, p).reshape(b, d, (h // p) * (w // p)).permute(0, 2, 1)
    patch_queries = F.layer_norm(patches, (d,), *patch_norm, eps)
    flat_bank = bank_patches.reshape(n, d)
    patch_keys = F.layer_norm(flat_bank, (d,), *patch_bank_norm, eps)
    patch_weights = torch.softmax(patch_queries @ patch_keys.t(), dim=2)  # (B, HW/p^2, N)
    patch_update = (patch_weights @ flat_bank).reshape(b, h // p, w // p, d).permute(0, 3, 1, 2)
    patch_update = F.pixel_shuffle(patch_update, p)

    return features + (vector_update + patch_update)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), keys where not key_keep set to -1e9) v, as the published transformer.

    q, k, v (B, heads, L, D); key_keep (B, L) bool: True where the key's patch has SNR above 0.5.
    """
    scale = q.shape[-1] ** 0.5
    scores = torch.matmul(q / scale, k.transpose(2, 3))
    scores = scores.masked_fill(~key_keep[:, None, None, :], MASKED_SCORE)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def gather_samples(
    features: torch.Tensor, vector_pos: torch.Tensor, patch_pos: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled C-vector (B,C) at vector_pos=(h,w) and the p x p window (B,C,p,p) at patch_pos."""
    # index_select, not features[:, :, h, w]: indexing by a 0-d CPU tensor reads its value on the host, which
    # breaks a torch.compile graph and recompiles it for every position.
    vectors = features.index_select(2, vector_pos[:1].to(features.device)).index_select(
        3, vector_pos[1:].to(features.device)).flatten(1)
    offsets = torch.arange(patch_size, device=features.device)
    rows = patch_pos[0].to(features.device) + offsets
    cols = patch_pos[1].to(features.device) + offsets
    patches = features.index_select(2, rows).index_select(3, cols)
    return vectors, patches


def sample_updater_inputs(
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    sample_vectors: torch.Tensor,
    sample_patches: torch.Tensor,
    embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the sample-updater MLPs: for every (bank entry n, image b), row n*B + b holds
    [bank entry n, sample of image b, position embedding n] along channels.

    Returns (N*B, 3C, 1, 1) for the vector MLP and (N*B, 3C, p, p) for the patch MLP.
    """
    n, c = bank_vectors.shape
    b = sample_vectors.shape[0]
    p = bank_patches.shape[-1]
    vector_in = torch.cat(
        [
            bank_vectors[:, None, :].expand(n, b, c),
            sample_vectors[None, :, :].expand(n, b, c),
            embedding[:, None, :].expand(n, b, c),
        ],
        dim=2,
    ).reshape(n * b, 3 * c, 1, 1)
    patch_in = torch.cat(
        [
            bank_patches[:, None].expand(n, b, c, p, p),
            sample_patches[None].expand(n, b, c, p, p),
            embedding[:, None, :, None, None].expand(n, b, c, p, p),
        ],
        dim=2,
    ).reshape(n * b, 3 * c, p, p)
    return vector_in, patch_in


def sample_updater_inputs_from_features(
    features: torch.Tensor,
    vector_pos: torch.Tensor,
    patch_pos: torch.Tensor,
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gather_samples then sample_updater_inputs (the Triton twin fuses the two into one launch)."""
    vectors, patches = gather_samples(features, vector_pos, patch_pos, bank_patches.shape[-1])
    return sample_updater_inputs(bank_vectors, bank_patches, vectors, patches, embedding)


def mutual_updater_inputs(
    bank_vectors: torch.Tensor,
    bank_patches: torch.Tensor,
    vector_partner: torch.Tensor,
    patch_partner: torch.Tensor,
    embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the mutual-updater MLPs: [entry i, partner entry, embedding i, partner's embedding].

    Published quirk kept for parity with released checkpoints: the patch branch pairs patch i with
    patch `patch_partner[i]` but uses the embedding of `vector_partner[i]` as the partner's embedding.
    Returns (N, 4C, 1, 1) and (N, 4C, p, p).
    """
    n, c = bank_vectors.shape
    p = bank_patches.shape[-1]
    partner_embedding = embedding.index_select(0, vector_partner)
    vector_in = torch.cat(
        [bank_vectors, bank_vectors.index_select(0, vector_partner), embedding, partner_embedding], dim=1
    ).reshape(n, 4 * c, 1, 1)
    patch_in = torch.cat(
        [
            bank_patches,
            bank_patches.index_select(0, patch_partner),
            embedding[:, :, None, None].expand(n, c, p, p),
            partner_embedding[:, :, None, None].expand(n, c, p, p),
        ],
        dim=1,
    )
    return vector_in, patch_in


def batch_mean(updates: torch.Tensor, batch: int) -> torch.Tensor:
    """(N*B, ...) rows ordered n*B + b -> mean over b: (N, ...)."""
    return updates.reshape(updates.shape[0] // batch, batch, *updates.shape[1:]).mean(dim=1)


def batch_mean_layer_norm(
    updates: torch.Tensor,
    batch: int,
    norm: tuple[torch.Tensor, torch.Tensor],
    all_reduce_mean=None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Epilogue of the sample-updater: mean over the batch of each entry's updates, then LayerNorm.

    updates (N*B, *S) with rows ordered n*B + b; norm = (weight, bias) of shape S. Under DDP,
    `all_reduce_mean` averages the batch mean over ranks before the LayerNorm so that every rank
    computes the same banks from every rank's samples.
    """
    mean = batch_mean(updates, batch)
    if all_reduce_mean is not None:
        mean = all_reduce_mean(mean)
    weight, bias = norm
    return F.layer_norm(mean, tuple(weight.shape), weight, bias, eps)


def ig_msa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, illumination: torch.Tensor,
           rescale: torch.Tensor, heads: int) -> torch.Tensor:
    """Retinexformer's illumination-guided multi-head self-attention, over channels (its core only).

    q, k, v, illumination: (B, N, C) tokens in pixel order, C = heads * d. rescale: (heads,) or any shape
    holding `heads` values (the published parameter is (heads, 1, 1)). For every head h, with the head's
    channels as rows of (d, N) matrices Q, K and V * I:
        Qn, Kn = Q, K L2-normalised along the pixel axis (F.normalize, eps 1e-12)
        A = softmax(rescale[h] * Kn @ Qn^T, over the last axis)      # (d, d), reduced over ALL N pixels
        out_h = A @ (V * I)                                           # (d, N)
    Returns (B, N, C). The projections around it (q/k/v linear layers, the output projection and the
    position term computed from v before the illumination product) belong to the network.
    """
    batch, tokens, channels = q.shape
    if channels % heads:
        raise ValueError(f"ig_msa: {channels} channels do not split into {heads} heads")
    d = channels // heads

    def per_head(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, d, N)
        return t.reshape(batch, tokens, heads, d).permute(0, 2, 3, 1)

    qh = F.normalize(per_head(q), dim=-1, p=2)
    kh = F.normalize(per_head(k), dim=-1, p=2)
    vh = per_head(v * illumination)
    attn = (kh @ qh.transpose(-2, -1)) * rescale.reshape(1, heads, 1, 1)
    attn = attn.softmax(dim=-1)
    out = attn @ vh  # (B, heads, d, N)
    return out.permute(0, 3, 1, 2).reshape(batch, tokens, channels)
