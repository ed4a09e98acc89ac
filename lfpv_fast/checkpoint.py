"""Checkpoint files: atomic writes, and loading a model from ours or from the published format.

Everything is read with torch.load(weights_only=True): no file is ever unpickled.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lfpv_fast.model import LFPVNet, ModelConfig

FORMAT = "lfpv_fast"


def _default_file_mode() -> int:
    """0666 minus the umask: what open() would give; mkstemp's 0600 would hide files from the group."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash (even kill -9) at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (weights_only=True), with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, or pickled objects we refuse
        raise ValueError(f"checkpoint {path} could not be read as a weights-only torch file: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def is_original_state_dict(obj: dict[str, Any]) -> bool:
    """True for a state dict of the published code (recognised by its keys)."""
    keys = {k[len("module."):] if k.startswith("module.") else k for k in obj}
    return "common_feature" in keys and "conv_first_1.weight" in keys


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**values)


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
            raise ValueError(f"checkpoint {path}: {exc}") from exc
    raise ValueError(
        f"checkpoint {path} is neither an lfpv_fast checkpoint nor a state dict of the published LFPV "
        "model (expected keys such as 'common_feature' and 'conv_first_1.weight')"
    )


def weights_only_checkpoint(net: LFPVNet) -> dict[str, Any]:
    """The exported weights file: model state (banks included) and its config, nothing else."""
    from dataclasses import asdict

    return {"format": FORMAT, "model_config": asdict(net.config),
            "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
