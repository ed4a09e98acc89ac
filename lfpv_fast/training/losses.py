"""Training losses as published: the Charbonnier pixel loss and the VGG19 perceptual loss.

Published (models/loss.py of the LFPVs release):
- CharbonnierLoss: `sum(sqrt(d*d + eps))` with eps = 1e-6, a sum (not a mean) over every element.
- VGGLoss: VGG19 (ImageNet weights) features relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, computed
  on the raw [0, 1] images (no ImageNet mean/std normalisation), compared with an L1 loss weighted
  1/32, 1/16, 1/8, 1/4, 1; the target's features are detached. The training step uses
  `VGGLoss.forward`, whose L1 has reduction='sum' (the unused `forward2` takes the mean), so the
  default reduction here is "sum".

torchvision is not importable in this project, so the VGG19 feature stack is defined here with the
same layer indices as torchvision's `vgg19().features`; a torchvision state dict (keys
'features.N.weight' / 'features.N.bias', plus 'classifier.*' which is ignored) loads into it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sum(sqrt((pred - target)^2 + eps)) over all elements, as the published CharbonnierLoss."""
    if pred.shape != target.shape:
        # No broadcasting: a silently broadcast target would change the sum's scale.
        raise ValueError(f"charbonnier_loss: pred and target must have the same shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    diff = pred - target
    return torch.sum(torch.sqrt(diff * diff + eps))


# torchvision's VGG19 ("E") feature layout: ints are 3x3 convs (output channels), "M" max-pools;
# every conv is followed by a ReLU. Only the layers up to relu5_1 (index 29) are needed.
_VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                     512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# The published slices end after these feature indices (exclusive): relu1_1, relu2_1, relu3_1,
# relu4_1, relu5_1 are the outputs of layers 1, 6, 11, 20 and 29.
SLICE_ENDS: tuple[int, ...] = (2, 7, 12, 21, 30)
LAYER_WEIGHTS: tuple[float, ...] = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


def _vgg19_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG19_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
            # In place is safe: every captured relu output feeds a conv next, which never writes its input.
            layers.append(nn.ReLU(inplace=True))
            channels = int(item)
    return layers


def vgg19_feature_shapes() -> dict[str, tuple[int, ...]]:
    """Every 'features.N.weight/bias' key of torchvision's vgg19 state dict with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index, layer in enumerate(_vgg19_layers()):
        if isinstance(layer, nn.Conv2d):
            shapes[f"features.{index}.weight"] = tuple(layer.weight.shape)
            shapes[f"features.{index}.bias"] = tuple(layer.bias.shape)
    return shapes


class VGG19Features(nn.Module):
    """torchvision's vgg19().features truncated after relu5_1 (indices 0..29, same numbering).

    forward returns the five published slice outputs [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_vgg19_layers()[:SLICE_ENDS[-1]])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        start = 0
        for end in SLICE_ENDS:
            for index in range(start, end):
                x = self.features[index](x)
            outputs.append(x)
            start = end
        return outputs


def _check_vgg_state_dict(state_dict: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """The 'features.N.*' tensors needed up to relu5_1, after strict key and shape checks."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{source}: expected a VGG19 state dict (a mapping of names to tensors), "
                        f"got {type(state_dict).__name__}")
    all_shapes = vgg19_feature_shapes()
    needed = {k: v for k, v in all_shapes.items() if int(k.split(".")[1]) < SLICE_ENDS[-1]}
    unexpected = [k for k in state_dict
                  if not (isinstance(k, str) and (k in all_shapes or k.startswith("classifier.")))]
    if unexpected:
        raise KeyError(f"{source}: not a torchvision vgg19 state dict: unexpected keys {unexpected[:10]}"
                       + (" ..." if len(unexpected) > 10 else "") + " (expected 'features.N.weight/bias' "
                       "for the conv layers and optionally 'classifier.*')")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise KeyError(f"{source}: VGG19 weights missing keys {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
    out = {}
    for key, shape in all_shapes.items():
        if key not in state_dict:
            continue  # only features.30+ can be absent here (checked above); they are unused
        value = state_dict[key]
        if not torch.is_tensor(value) or not value.is_floating_point():
            kind = f"a {value.dtype} tensor" if torch.is_tensor(value) else type(value).__name__
            raise TypeError(f"{source}: key {key!r} must be a floating-point tensor, got {kind}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {shape} "
                             "(torchvision vgg19)")
        if key in needed:
            out[key] = value
    return out


class PerceptualLoss(nn.Module):
    """The published VGG perceptual loss: sum_i w_i * L1(vgg_i(pred), vgg_i(target).detach()).

    The VGG19 weights are frozen (requires_grad False) and the stack stays in eval mode even when the
    loss module is put in train mode. Build with `PerceptualLoss.from_file(path)` for real (ImageNet)
    weights; the plain constructor leaves PyTorch's default random initialisation (for tests).
    """

    def __init__(self, reduction: str = "sum", layer_weights: Sequence[float] = LAYER_WEIGHTS) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"PerceptualLoss reduction must be 'sum' (published training) or 'mean', "
                             f"got {reduction!r}")
        if len(layer_weights) != len(SLICE_ENDS):
            raise ValueError(f"PerceptualLoss needs {len(SLICE_ENDS)} layer weights, got {len(layer_weights)}")
        self.reduction = reduction
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.vgg = VGG19Features()
        self.vgg.requires_grad_(False)
        self.vgg.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # a frozen feature extractor: never in training mode
        return self

    def load_vgg_weights(self, state_dict: Mapping[str, torch.Tensor], source: str = "VGG19 state dict") -> None:
        """Copy torchvision-format VGG19 weights in (strict on 'features.*' keys and shapes)."""
        weights = _check_vgg_state_dict(state_dict, source)
        own = self.vgg.state_dict()
        with torch.no_grad():
            for key, value in weights.items():
                own[key].copy_(value)

    @classmethod
    def from_file(cls, path: str | Path, reduction: str = "sum",
                  layer_weights: Sequence[float] = LAYER_WEIGHTS) -> PerceptualLoss:
        """A PerceptualLoss with VGG19 weights from a torchvision-format file (torch.load, weights_only)."""
        from lfpv_fast.training.checkpoint import read_checkpoint  # the one safe reader of torch files

        path = Path(path)
        # Not a torch file, truncated, a pickled object, a bare tensor: a one-line ValueError naming the file.
        state = read_checkpoint(path, what="VGG19 weights file")
        loss = cls(reduction=reduction, layer_weights=layer_weights)
        try:
            loss.load_vgg_weights(state, source=f"VGG19 weights file {path}")
        except (KeyError, TypeError) as exc:  # wrong keys or values: the same one-line input error
            raise ValueError(exc.args[0] if exc.args else str(exc)) from None
        return loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"PerceptualLoss expects two (B,3,H,W) batches of the same shape, "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        pred_features = self.vgg(pred)
        with torch.no_grad():  # published: the target's features are detached
            target_features = self.vgg(target)
        loss = pred.new_zeros(())
        for weight, p, t in zip(self.layer_weights, pred_features, target_features, strict=True):
            loss = loss + weight * F.l1_loss(p, t, reduction=self.reduction)
        return loss
