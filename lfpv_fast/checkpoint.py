"""Checkpoint files: atomic writes, and loading a model from ours or from the published format.

Everything is read with torch.load(weights_only=True): no file is ever unpickled.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lfpv_fast.files import atomic_write, atomic_write_text
from lfpv_fast.model import LFPVNet, ModelConfig

__all__ = ["FORMAT", "atomic_save", "atomic_write_text", "is_original_state_dict", "is_published_architecture",
           "load_model", "read_checkpoint", "weights_only_checkpoint"]

FORMAT = "lfpv_fast"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (see lfpv_fast.files).

    A crash (even kill -9) at any point leaves either the old file or the new one, never a torn file.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (weights_only=True); a file that is not one is a one-line ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, expected a checkpoint file (.pth), e.g. a run's "
                         "final_weights.pth")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means "not a checkpoint we can read": say which kind
        # `from None`: torch's own text would suggest weights_only=False, which would run code from the file.
        raise ValueError(_why_unreadable(path, exc)) from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict of weights, got {type(obj).__name__}")
    return obj


def _why_unreadable(path: Path, exc: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        return f"checkpoint {path} is empty (0 bytes): not a checkpoint"
    pickled = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if pickled:
        return (f"checkpoint {path} holds a pickled Python object ({pickled.group(1)}), which lfpv_fast never "
                "loads (it reads tensors and plain values only); save the weights as a state dict instead: "
                "torch.save(model.state_dict(), path)")
    if head == _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            return f"checkpoint {path} is truncated or damaged (a torch file cut short: an incomplete copy or write?)"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"checkpoint {path} is a damaged torch file ({first_line[:200]})"
    return f"checkpoint {path} is not a checkpoint (not a file written by torch.save)"


def is_original_state_dict(obj: dict[str, Any]) -> bool:
    """True for a state dict of the published code (recognised by its keys)."""
    keys = {k[len("module."):] if k.startswith("module.") else k for k in obj}
    return "common_feature" in keys and "conv_first_1.weight" in keys


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**values)


def is_published_architecture(config: ModelConfig) -> bool:
    """True for the published SMID model, the only architecture that the published format can describe."""
    return config == ModelConfig()


def load_model(path: str | Path, backend: str = "auto", config: ModelConfig | None = None) -> LFPVNet:
    """An LFPVNet from one of our checkpoints (training or weights-only) or a published SMID.pth.

    Ours carry their ModelConfig; a published checkpoint uses `config` (default: the SMID model).
    """
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        cfg = config or model_config_from_dict(obj["model_config"])
        net = LFPVNet(cfg, backend=backend)
        try:
            net.load_state_dict(obj["model"], strict=True)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {path}: weights do not fit the model config: {exc}") from exc
        return net
    state = obj.get("params", obj.get("state_dict", obj))  # published files may nest the weights
    if isinstance(state, dict) and is_original_state_dict(state):
        try:
            return LFPVNet.from_original_state_dict(state, config=config, backend=backend)
        except (KeyError, ValueError, TypeError) as exc:
            detail = exc.args[0] if exc.args else str(exc)
            if config is None:
                raise ValueError(_not_the_published_architecture(path, state)) from exc
            raise ValueError(f"checkpoint {path}: {detail}") from exc
    raise ValueError(
        f"checkpoint {path} is neither an lfpv_fast checkpoint nor a state dict of the published LFPV "
        "model (expected keys such as 'common_feature' and 'conv_first_1.weight')"
    )


def _not_the_published_architecture(path: str | Path, state: dict[str, Any]) -> str:
    first = state.get("conv_first_1.weight", state.get("module.conv_first_1.weight"))
    nf = f", nf={first.shape[0]} in this file" if torch.is_tensor(first) and first.dim() == 4 else ""
    return (f"checkpoint {path} is in the published format, which holds no model config and so is read as the "
            f"published SMID architecture (nf={ModelConfig().nf}); its weights are of another architecture{nf}. "
            "For a model trained with lfpv_fast use the run's final_weights.pth, which carries its config")


def weights_only_checkpoint(net: LFPVNet) -> dict[str, Any]:
    """The exported weights file: model state (banks included) and its config, nothing else."""
    return {"format": FORMAT, "model_config": asdict(net.config),
            "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
