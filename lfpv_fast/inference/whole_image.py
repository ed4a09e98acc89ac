"""Exact whole-image inference in bounded memory, and the estimate of its peak memory.

`whole_image_forward(net, x, snr)` computes what `net(x, snr)` computes in eval mode, for the whole
image at once (the transformer attends over every token of the image, as in the published model), but
it never holds a full-resolution feature map of the whole image: the full-resolution stages (the
first encoder conv, the stride-2 conv after it, the last upsampling and the two last convs) are 3x3
convolutions, so they run in horizontal strips with a halo of real rows on each side, and each strip's
rows are bit-for-bit the rows of the whole-image conv up to the convolution library's summation order.
The rest runs at half and quarter resolution on the whole image. With a memory-linear attention (the
CPU op set of backend "auto", the Triton kernel on CUDA), peak memory grows linearly with the pixel
count, at about a quarter of what `net(x, snr)` needs (see `estimate_peak_bytes`).

The first encoder conv's output is needed twice (for the stride-2 conv and as the last skip); it is
recomputed per strip rather than kept: 3 input channels make it the cheapest conv of the network.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lfpv_fast.models import LFPVNet, ModelConfig
from lfpv_fast.ops.backends import resolve_backend

# Halo rows (at the strip function's input resolution) around each strip: at least the receptive
# radius of the strip's conv chain, even so that stride-2 convs and pixel shuffles stay aligned.
ENCODER_HALO = 4  # full-res rows for conv_full (1) + conv_half (1, stride 2)
DECODER_HALO = 3  # half-res rows: up_half (1 half row) + 3 full-res convs (3 full rows = 1.5 half rows)
DEFAULT_STRIP_ROWS = 128  # full-resolution rows per strip
# Working memory besides the tensors counted (oneDNN scratch and reordered weights, allocator slack):
# the measured peak of a 1 MP photo was up to 0.04 GiB above the count without it (bench/bench_inference.py).
FIXED_OVERHEAD = 256 * 2**20


def _in_strips(fn: Callable[..., torch.Tensor], inputs: list[tuple[torch.Tensor, int]], rows: int, scale_out: int,
               halo: int, strip_rows: int) -> torch.Tensor:
    """Run fn over horizontal strips of `rows` output rows (in units of the coarsest input's rows).

    inputs: (tensor, rows of it per unit row). fn maps the input slices to an output with
    `scale_out` rows per unit row; `halo` unit rows of real data pad each side of a strip (clamped
    at the image's top and bottom, where the convs' own zero padding is the right border).
    """
    pieces = []
    for start in range(0, rows, strip_rows):
        stop = min(rows, start + strip_rows)
        lo, hi = max(0, start - halo), min(rows, stop + halo)
        out = fn(*[t[:, :, lo * s:hi * s] for t, s in inputs])
        pieces.append(out[:, :, (start - lo) * scale_out:(stop - lo) * scale_out])
    return torch.cat(pieces, dim=2)


@torch.no_grad()
def whole_image_forward(net: LFPVNet, x: torch.Tensor, snr: torch.Tensor | None,
                        strip_rows: int = DEFAULT_STRIP_ROWS, low_memory: bool = False) -> torch.Tensor:
    """Eval-mode `net(x, snr)` of the whole image: in strips where the backbone has an exact strip path
    (`strip_path`), else untiled (the whole image in one forward, memory as `estimate_peak_bytes` counts).

    x (B,3,H,W), snr (B,1,H,W) or None on the net's device. strip_rows: full-resolution rows per strip (even).
    low_memory: a strip path that can recompute maps it would otherwise keep does so (same result, less memory,
    more time: Retinexformer's level-2 illumination); paths without such a choice ignore it.
    """
    if net.training:
        raise RuntimeError("whole_image_forward is for inference: put the net in eval mode first")
    if strip_rows < 2 or strip_rows % 2:
        raise ValueError(f"strip_rows must be a positive even number, got {strip_rows}")
    path = strip_path(net)
    if path is None:
        forward = getattr(net, "compiled_forward", None) or net
        return forward(x, snr)
    return path(net, x, snr, strip_rows, low_memory)


# Exact strip paths of other backbones: backbone class -> fn(net, x, guide, strip_rows, low_memory) computing
# eval-mode net(x, guide) bit-for-bit up to summation order (low_memory: see whole_image_forward). SNR-Aware and
# Retinexformer (at its default site) are built in.
STRIP_PATHS: dict[type, Callable[..., torch.Tensor]] = {}


def strip_path(net: LFPVNet) -> Callable[..., torch.Tensor] | None:
    """The exact strip forward of the net's backbone, or None (the whole image runs in one forward)."""
    from lfpv_fast.models.retinexformer import RetinexFormer
    from lfpv_fast.models.snr_aware import SNRAware

    if isinstance(net.backbone, SNRAware):
        return _snr_aware_strips
    if isinstance(net.backbone, RetinexFormer) and (net.lfpv is None or net.site.name == net.backbone.default_site):
        return _retinexformer_strips  # its strip path fuses the LFPVs at the bottleneck, strip by strip
    return STRIP_PATHS.get(type(net.backbone))


def _retinexformer_strips(net: LFPVNet, x: torch.Tensor, guide: torch.Tensor | None, strip_rows: int,
                          low_memory: bool) -> torch.Tensor:
    """Retinexformer by strips (retinexformer_strips.py: two passes per attention layer), the LFPV fusion applied
    to each bottleneck strip; strips of a multiple of the alignment (16 with LFPVs: whole bank patches)."""
    from lfpv_fast.inference.retinexformer_strips import retinexformer_whole_image_forward

    height, width = x.shape[-2:]
    x, _ = net.aligned_inputs(x, None)
    ops = net.ops_for(x)
    rows = max(net.align, strip_rows // net.align * net.align)
    at_site = None if net.lfpv is None else (lambda features: net.fuse(features, ops))
    out = retinexformer_whole_image_forward(net.backbone, x, rows, at_site=at_site, low_memory=low_memory)
    return net._restore_size(out, height, width)


def _snr_aware_strips(net: LFPVNet, x: torch.Tensor, snr: torch.Tensor | None, strip_rows: int,
                      low_memory: bool) -> torch.Tensor:
    del low_memory  # every map it keeps is read after the pass that makes it: nothing to recompute
    height, width = x.shape[-2:]
    if snr is None:
        snr = net.guide(x)
    x, snr = net.aligned_inputs(x, snr)  # as LFPVNet.forward: to a multiple of the alignment, and back at the end
    ops = net.ops_for(x)
    aligned = list(x.shape[-2:])
    if uses_channels_last(net):
        x = x.contiguous(memory_format=torch.channels_last)
    stages = getattr(net, "inference_stages", None) or InferenceStages(net)
    half_rows = aligned[0] // 2
    half = _in_strips(stages.encode_strip, [(x, 2)], half_rows, 1, ENCODER_HALO // 2, strip_rows // 2)
    up = stages.middle(half, snr, ops)
    out = _in_strips(stages.decode_strip, [(up, 1), (half, 1), (x, 2)], half_rows, 2, DECODER_HALO,
                     strip_rows // 2)
    return net._restore_size(out, height, width)


def uses_channels_last(net: LFPVNet) -> bool:
    weight = next((p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last)


def prepare_for_inference(net: LFPVNet, device: torch.device) -> LFPVNet:
    """Eval mode, and the CPU op set's memory format: channels_last convolutions where backend "auto"
    runs on the CPU (1.2x faster for a 512x960 frame than NCHW there, bench/bench_inference.py; the
    same numbers to float32 rounding). The reference backend stays the plain NCHW eager twin."""
    net.eval()
    if device.type == "cpu" and resolve_backend(net.backend, device).name == "cpu_ops":
        net.to(memory_format=torch.channels_last)
    return net


class InferenceStages:
    """The three stages of `whole_image_forward`; `compile_stages` makes torch.compile'd ones."""

    def __init__(self, net: LFPVNet) -> None:
        self.net = net

    def encode_strip(self, x: torch.Tensor) -> torch.Tensor:
        """Input rows -> the half-resolution skip (the full-resolution map lives only per strip)."""
        encoder = self.net.backbone.encoder
        return encoder.half_res(encoder.full_res(x))

    def middle(self, half: torch.Tensor, snr: torch.Tensor, ops) -> torch.Tensor:
        """Quarter resolution on the whole image: LFPV fusion, transformer, blend, first upsampling."""
        net = self.net
        encoder, decoder = net.backbone.encoder, net.backbone.decoder
        quarter = encoder.quarter_res(half)
        features = net.fuse(encoder.blocks(quarter), ops)
        return decoder.half_res(features, snr, quarter, ops)

    def decode_strip(self, up: torch.Tensor, half: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The last upsampling and the full-resolution convs of a strip (the encoder's first conv recomputed)."""
        backbone = self.net.backbone
        return backbone.decoder.full_res(up, half, backbone.encoder.full_res(x), x)


def compile_stages(net: LFPVNet) -> None:
    """Make `whole_image_forward` (and so `enhance_image`) run torch.compile'd stages of `net`.

    dynamic=True: image sizes and strip heights vary, and one compiled graph serves them all.
    """
    if strip_path(net) is not _snr_aware_strips:
        net.compiled_forward = torch.compile(net, dynamic=True)
        return
    eager = InferenceStages(net)
    stages = InferenceStages(net)
    stages.encode_strip = torch.compile(eager.encode_strip, dynamic=True)
    stages.middle = torch.compile(eager.middle, dynamic=True)
    stages.decode_strip = torch.compile(eager.decode_strip, dynamic=True)
    net.inference_stages = stages


@dataclass
class MemoryEstimate:
    """Estimated peak bytes of enhancing one batch, and how they split."""

    whole_image: int  # whole_image_forward: activations + attention
    attention: int  # the attention's share (quadratic in tokens for the reference op)
    weights: int

    @property
    def total(self) -> int:
        return self.whole_image + self.weights + FIXED_OVERHEAD


def estimate_peak_bytes(config: ModelConfig, batch: int, height: int, width: int, element_size: int = 4,
                        linear_attention: bool = True, strip_rows: int = DEFAULT_STRIP_ROWS,
                        low_memory: bool = False) -> MemoryEstimate:
    """Peak memory of `whole_image_forward` on a (batch, 3, height, width) input, in bytes.

    A count of the largest tensors alive at once, plus FIXED_OVERHEAD in `total`. Measured against it
    (bench/bench_inference.py, backend auto on the CPU, peak RSS above the start): 0.57 / 1.40 / 3.92 GiB
    at 1 / 4 / 12 MP for a `whole_image` count of 0.65 / 2.14 / 5.85 GiB, so the count errs on the safe
    side for large photos. It holds the input, SNR map and output at full resolution, the half- and
    quarter-resolution feature maps, the transformer's tokens, the attention, and one strip of the
    full-resolution stages. linear_attention=False is the reference op, which holds B x heads x L x L
    scores (three of them at once: scores, masked scores, softmax).
    """
    if config.backbone == "retinexformer":
        return _estimate_retinexformer(config, batch, height, width, element_size, strip_rows, low_memory)
    if config.backbone != "snr_aware":
        return _estimate_untiled(config, batch, height, width, element_size)
    nf, hr = config.nf, config.hr_nf
    pixels = batch * height * width
    a = config.align
    tokens = batch * (height // a) * (width // a)
    per_pixel = (
        2 * 3 + 1 + 3 + 1  # input and output (and their aligned copies), SNR map (and its copy)
        + nf / 4 * 3  # half-res skip, the first upsampling's output and its pixel-shuffle input
        + nf / 16 * 6  # quarter-res maps: skip, features, fused, light branch, blend, blocks
    )
    token_bytes = tokens * (config.d_model * 3 + config.ffn_dim + 3 * config.heads * config.head_dim)
    if linear_attention:
        attention = tokens * config.heads * config.head_dim * 2  # output and one merged copy
    else:
        attention = 3 * batch * config.heads * (tokens // batch) ** 2
    strip = batch * min(strip_rows + 2 * 2 * DECODER_HALO, height) * width * (4 * hr / 4 + hr * 3 + nf * 2)
    activations = int(per_pixel * pixels + token_bytes + strip) * element_size
    weight_bytes = _parameter_count(config) * 4
    return MemoryEstimate(whole_image=activations + attention * element_size, attention=attention * element_size,
                          weights=weight_bytes)


def _estimate_retinexformer(config: ModelConfig, batch: int, height: int, width: int, element_size: int,
                            strip_rows: int, low_memory: bool) -> MemoryEstimate:
    """retinexformer_strips.py's measured estimate: by strips where `whole_image_forward` runs strips (the
    default site or no LFPVs), else untiled; the LFPV fusion at the bottleneck adds a strip-sized map."""
    from lfpv_fast.inference.retinexformer_strips import estimate_retinexformer_peak_bytes

    o = config.options
    by_strips = not config.lfpv.enabled or config.lfpv.site in (None, "bottleneck")
    rows = max(config.align, strip_rows // config.align * config.align) if by_strips else None
    peak = estimate_retinexformer_peak_bytes(o.n_feat, o.num_blocks, batch, height, width, element_size, rows,
                                             o.in_channels, low_memory=low_memory and by_strips)
    return MemoryEstimate(whole_image=peak, attention=0, weights=_parameter_count(config) * 4)


def _estimate_untiled(config: ModelConfig, batch: int, height: int, width: int, element_size: int) -> MemoryEstimate:
    """Peak of one untiled eval forward of a backbone without a strip path, in bytes: a rough count for a
    U-Net-like network with C the LFPV site's channels (the input, output and lit-up copies, about 16 x C feature
    values a pixel at full resolution, 8 maps' worth at each coarser level). Checked on Retinexformer's untiled
    forward (n_feat 40, backend auto on the CPU, peak RSS above the start): 0.69 GiB at 512x512 and 2.31 GiB at
    1024x1024, for counts of 0.87 and 3.3 GiB.
    """
    width_c = config.site.channels
    pixels = batch * height * width
    per_pixel = 4 * 3 + 16 * width_c + 2 * width_c * 8 / 4 + 4 * width_c * 8 / 16
    attention = 0  # the channel attention holds heads x d x d per image: negligible
    return MemoryEstimate(whole_image=int(per_pixel * pixels) * element_size, attention=attention,
                          weights=_parameter_count(config) * 4)


def _parameter_count(config: ModelConfig) -> int:
    return _parameter_count_of(repr(dataclasses.asdict(config)))


@functools.lru_cache(maxsize=8)
def _parameter_count_of(config_repr: str) -> int:
    config = ModelConfig(**ast.literal_eval(config_repr))
    with torch.device("meta"):
        net = LFPVNet(config, backend="reference")
    return sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())


def available_memory(device: torch.device) -> int:
    """Bytes that a new allocation can use now: free CUDA memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ------------------------------------------------------------------------------------------------
# Precision of the tools (enhance, evaluate).

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision that is unsupported or slower than fp32 on `device`, saying why (ValueError).

    CUDA: bf16 needs a GPU that supports it (Ampere or newer); fp16 runs everywhere. CPU: reduced
    precision pays only with native instructions for it: bf16 with AVX512-BF16 or AMX (measured faster
    than fp32 for a 512x960 frame on an AVX512-BF16 EPYC, bench/bench_inference.py); fp16 with AMX-FP16.
    Elsewhere oneDNN emulates them, slower than fp32, and they are refused.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; "
                             "use --precision fp16 or fp32")
        return
    if device.type == "cpu":
        native = {"bf16": ("AVX512-BF16 or AMX", torch.cpu._is_avx512_bf16_supported()
                           or torch.cpu._is_amx_tile_supported()),
                  "fp16": ("AMX-FP16", torch.cpu._is_amx_fp16_supported())}
        needs, fast = native[precision]
        if not fast:
            raise ValueError(f"--precision {precision} on this CPU would be slower than fp32 (it has no {needs} "
                             "instructions; oneDNN then emulates it): use --precision fp32, or a GPU")
        return
    raise ValueError(f"--precision {precision} is not supported on device {device}")


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision (a no-op context for fp32)."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])
