"""Checkpoint files, the one home of their format: writing (atomic), reading (weights_only), validation.

Two kinds of file are ours: a training checkpoint (`training_checkpoint`: everything an exact resume needs)
and a weights-only file (`weights_only_checkpoint`: the model and its config). `load_model` also reads the
published format (a state dict of the published network). Everything is read with
torch.load(weights_only=True): no file is ever unpickled.

Every reader here checks what it reads before anything uses it: a file that is not a checkpoint, a missing or
empty entry, a model config with an unknown key, weights of another shape, NaN/inf weights, a random state that
cannot be restored. Each problem is a one-line ValueError naming the file and what is wrong, which the tools
print as their `error:` line; so train, evaluate, enhance and the app all refuse the same files the same way.
"""

from __future__ import annotations

import random
import re
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfpv_fast.config import MAX_LR, ConfigError, model_config_to_dict, section_from_dict
from lfpv_fast.io.files import OutputWriteError, atomic_write, atomic_write_text
from lfpv_fast.models import LFPVNet, ModelConfig, retinexformer, snr_aware
from lfpv_fast.models.bounds import build_on_meta, check_network_fits_memory, weights_mismatch
from lfpv_fast.training.run_folder import (
    CONFIG,
    FINAL_WEIGHTS,
    RunFolder,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
)

__all__ = ["CHECKPOINT_VERSION", "FORMAT", "CheckpointWriteError", "atomic_save", "atomic_write_text",
           "capture_rng", "check_training_checkpoint", "checkpoint_step", "export_weights", "is_original_state_dict",
           "is_published_architecture", "latest_checkpoint", "list_checkpoints", "load_model", "load_weights",
           "published_state_dict", "read_checkpoint", "restore_rng", "restore_training_state", "training_checkpoint",
           "weights_only_checkpoint", "write_checkpoint"]

FORMAT = "lfpv_fast"
CHECKPOINT_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_TRAINING_KEYS = ("format", "model", "optimizer", "scheduler", "step", "rng", "loader")


# ---------------------------------------------------------------------------------------------
# Writing


class CheckpointWriteError(OutputWriteError):
    """A checkpoint could not be written (a full disk, a read-only folder); the message is one line naming the
    file, and no partial file is left behind."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (see lfpv_fast.io.files).

    A crash (even kill -9) at any point leaves either the old file or the new one, never a torn file. A write
    that fails (ENOSPC, EROFS, ...) removes its temporary file and raises CheckpointWriteError.
    """
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write as RuntimeError("[enforce fail ...] unexpected pos ...") whose
        # context is the OSError saying why; name that reason, not torch's internals.
        reason = _os_error_in_chain(exc)
        if reason is None:
            raise
        raise CheckpointWriteError(f"could not write {path}: {reason.strerror or reason} (nothing was left half "
                                   "written; the files written before are intact)") from exc


def _os_error_in_chain(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = RunFolder(run_dir).list_checkpoints()
    return found[-1] if found else None


def write_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Atomically write `folder`/step_<step>.pth, then delete all but the newest `keep`."""
    path = folder / checkpoint_name(step)
    atomic_save(state, path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def capture_rng() -> dict[str, Any]:
    """Every global RNG as tensors and plain Python values (readable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_name), "keys": [int(k) for k in np_keys], "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set every global RNG from capture_rng()'s dict (CUDA states only where the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))


def _numpy_state(n: dict[str, Any]) -> tuple:
    return (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])


def _python_state(p: dict[str, Any]) -> tuple:
    return (p["version"], tuple(p["state"]), p["gauss_next"])


def training_checkpoint(net: LFPVNet, optimizer: torch.optim.Optimizer, scheduler: Any, *, step: int,
                        best_psnr: float | None, config: dict[str, Any], loader_state: dict[str, Any],
                        world_size: int) -> dict[str, Any]:
    """Everything a bit-exact resume needs, as tensors and plain values (no pickled objects)."""
    return {
        "format": FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model_config_to_dict(net.config),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "best_psnr": best_psnr,
        "config": config,
        "rng": capture_rng(),
        "draw_generator": net.draw_generator.get_state(),
        "loader": {k: int(v) for k, v in loader_state.items()},
        "world_size": world_size,
    }


def weights_only_checkpoint(net: LFPVNet) -> dict[str, Any]:
    """The exported weights file: model state (banks included) and its config, nothing else."""
    return {"format": FORMAT, "model_config": model_config_to_dict(net.config),
            "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


# ---------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a torch file safely (weights_only=True); one that is not a dict of them is a one-line ValueError.

    `what` names the file in messages ("checkpoint", "VGG19 weights file").
    """
    path = Path(path)
    if path.is_dir():
        if what == "checkpoint":
            raise ValueError(f"checkpoint {path} is a folder, expected a checkpoint file (.pth), e.g. a run's "
                             f"{FINAL_WEIGHTS}")
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means "not a file we can read": say which kind
        # `from None`: torch's own text would suggest weights_only=False, which would run code from the file.
        raise ValueError(_why_unreadable(path, exc, what)) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path}: expected a dict of weights, got {_kind(obj)}")
    return obj


def _why_unreadable(path: Path, exc: Exception, what: str) -> str:
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        return f"{what} {path} is empty (0 bytes): not a torch file"
    pickled = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if pickled:
        return (f"{what} {path} holds a pickled Python object ({pickled.group(1)}), which lfpv_fast never "
                "loads (it reads tensors and plain values only); save the weights as a state dict instead: "
                "torch.save(model.state_dict(), path)")
    if head == _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            return f"{what} {path} is truncated or damaged (a torch file cut short: an incomplete copy or write?)"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{what} {path} is a damaged torch file ({first_line[:200]})"
    return f"{what} {path} is not a torch file (not written by torch.save)"


def _kind(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_weights(state: Any, path: str | Path, entry: str = "model") -> dict[str, torch.Tensor]:
    """A state dict as read from `path`: a non-empty dict of tensors, none holding NaN or inf."""
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: '{entry}' must be a dict of tensors (the weights), got {_kind(state)}")
    if not state:
        raise ValueError(f"checkpoint {path}: '{entry}' holds no weights (an empty dict)")
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise ValueError(f"checkpoint {path}: '{entry}' entry {key!r} is {_kind(value)}, not a tensor")
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"checkpoint {path}: tensor {key!r} holds {bad} NaN/inf value(s) of {value.numel()}; "
                                 "these weights cannot enhance anything (saved from a run that diverged?)")
    return state


def model_config_of(obj: dict[str, Any], path: str | Path) -> ModelConfig:
    """The ModelConfig stored in one of our files, every key checked (unknown keys, types, ranges)."""
    values = obj.get("model_config")
    if not isinstance(values, dict):
        got = "no 'model_config' entry" if "model_config" not in obj else f"'model_config' is {_kind(values)}"
        raise ValueError(f"checkpoint {path}: {got}; an lfpv_fast checkpoint holds its model config as a dict")
    try:
        return section_from_dict(ModelConfig, values, f"checkpoint {path}: model_config")
    except ConfigError as exc:
        raise ValueError(f"{exc} (a file from another version of lfpv_fast, or edited?)") from None


# Buffers of the first format's state dicts (everything else there is a parameter, in the optimizer's order).
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def upgrade_first_format(obj: dict[str, Any]) -> dict[str, Any]:
    """A file of ours written before backbones (a flat 'model_config'), in today's layout, changed in place.

    Its SNR-Aware weights were named encoder.* / decoder.* (today backbone.encoder.*, backbone.decoder.*), and its
    parameters were in the order encoder, lfpv, decoder (today backbone.encoder, backbone.decoder, lfpv): an
    optimizer state saved then is renumbered to today's order, so a resumed run continues exactly.
    """
    config, state = obj.get("model_config"), obj.get("model")
    if not isinstance(config, dict) or "backbone" in config or not isinstance(state, dict):
        return obj
    old_params = [k for k in state if isinstance(k, str) and not k.startswith("bank_")
                  and not k.endswith(_BUFFER_SUFFIXES)]
    renamed = {_today_name(k): v for k, v in state.items()}
    obj["model"] = renamed
    optimizer = obj.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict):
        group = {"backbone.encoder": 0, "backbone.decoder": 1, "lfpv": 2}
        new_params = sorted((_today_name(k) for k in old_params), key=lambda k: group.get(k.split(".")[0] if
                            k.startswith("lfpv") else ".".join(k.split(".")[:2]), 3))
        index = {name: i for i, name in enumerate(new_params)}
        to_new = {i: index[_today_name(name)] for i, name in enumerate(old_params)}
        optimizer["state"] = {to_new.get(i, i): v for i, v in optimizer["state"].items()}
        for param_group in optimizer.get("param_groups", []):
            if isinstance(param_group, dict) and isinstance(param_group.get("params"), list):
                param_group["params"] = sorted(to_new.get(i, i) for i in param_group["params"])
    return obj


def _today_name(key: str) -> str:
    return f"backbone.{key}" if isinstance(key, str) and key.startswith(("encoder.", "decoder.")) else key


def check_weights_fit(net: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """The state dict has the network's keys and shapes (`net` may live on the meta device); else one line."""
    own = net.state_dict()
    mismatch = weights_mismatch(own, state)
    if mismatch:
        config = getattr(net, "config", None)
        model = f"the model config {_describe_config(config)}" if isinstance(config, ModelConfig) else "the model"
        raise ValueError(f"checkpoint {path}: its weights do not fit {model}: {mismatch}")
    # Weights cast to integers lost their values (int32 truncates every weight to 0 or so): refused. Floating
    # weights of another precision (float16, bfloat16, float64) are converted explicitly by load_weights.
    cast = [k for k, v in own.items() if v.is_floating_point() and not state[k].is_floating_point()]
    if cast:
        raise ValueError(f"checkpoint {path}: {len(cast)} weight tensor(s) hold {state[cast[0]].dtype} values where "
                         f"the model has floating-point weights (e.g. {cast[0]!r}): weights cast to integers have "
                         "lost their values; use the file as it was saved")


def load_weights(net: LFPVNet | torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a checked state dict strictly; a mismatch is one line naming the first keys that differ."""
    check_weights_fit(net, state, path)
    own = net.state_dict()
    # Floating weights of another precision (a file saved in float16, say) become the model's dtype here,
    # explicitly: float16 -> float32 is exact; float64 -> float32 rounds as training in float32 would.
    state = {k: v.to(own[k].dtype) if v.dtype != own[k].dtype else v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # dtypes that cannot be copied, and the like: torch's first line is enough
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        raise ValueError(f"checkpoint {path}: its weights cannot be loaded: {first_line[:200]}") from None


def _describe_config(config: ModelConfig) -> str:
    """The fields that differ from the published model, e.g. (nf=8, layers=1); (published SMID) if none."""
    if config.backbone != "snr_aware":
        return f"(backbone {config.backbone}, {model_config_to_dict(config)['options']}, lfpv {asdict(config.lfpv)})"
    default = ModelConfig()
    changed = [f"{k}={v}" for k, v in asdict(config.options).items() if v != getattr(default.options, k)]
    changed += [f"lfpv.{k}={v}" for k, v in asdict(config.lfpv).items() if v != getattr(default.lfpv, k)]
    return f"({', '.join(changed)})" if changed else "(the published SMID model)"


# The published formats live with their backbones (lfpv_fast.models.snr_aware, lfpv_fast.models.retinexformer).
is_original_state_dict = snr_aware.is_published_state_dict
published_state_dict = snr_aware.published_state_dict


def published_retinexformer_state_dict(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The weights of a published Retinexformer file (BasicSR's {'params': ...} or 'params_ema'), else None."""
    if obj.get("format") == FORMAT:
        return None
    return retinexformer.published_weights(obj)


def is_published_architecture(config: ModelConfig) -> bool:
    """True for the published SMID model, the only architecture that the published LFPV format can describe."""
    return config == ModelConfig()


def is_published_retinexformer(config: ModelConfig) -> bool:
    """True for plain Retinexformer (no LFPVs), which the published Retinexformer format (BasicSR) holds."""
    return config.backbone == "retinexformer" and not config.lfpv.enabled


def export_weights(net: LFPVNet, folder: RunFolder) -> str:
    """A finished run's exports: its weights-only file, and the same in a published format where the network is
    one that format can describe. Returns the summary's note on the published file (written or why not)."""
    atomic_save(weights_only_checkpoint(net), folder.final_weights)
    original = folder.final_original
    if is_published_architecture(net.config):
        atomic_save(net.to_original_state_dict(), original)
        return f"; published format: {original}"
    if is_published_retinexformer(net.config):
        atomic_save(retinexformer.published_checkpoint(net.backbone), original)
        return f"; published Retinexformer format: {original}"
    # The published format has no room for a config: a reader takes it for the SMID architecture.
    return (f"; {original.name} is not written: the published format holds only the published architecture (the "
            "default model section)")


def load_model(path: str | Path, backend: str = "auto", config: ModelConfig | None = None, *,
               loaded: dict[str, Any] | None = None) -> LFPVNet:
    """An LFPVNet from one of our checkpoints (training or weights-only) or a published SMID.pth.

    Ours carry their ModelConfig; a published checkpoint uses `config` (default: the SMID model). `loaded`: the
    file as read_checkpoint(path) returned it, for a caller that has read it already (the file is read once).
    """
    obj = read_checkpoint(path) if loaded is None else loaded
    if obj.get("format") == FORMAT:
        upgrade_first_format(obj)
        cfg = config or model_config_of(obj, path)
        if "model" not in obj:
            raise ValueError(f"checkpoint {path} has no 'model' entry: it holds no weights "
                             f"(entries: {', '.join(map(str, obj))})")
        state = check_weights(obj["model"], path)
        # Shapes and size are checked on a network built on the meta device (no memory): a small file whose
        # config claims a huge network is refused before that network is built.
        check_weights_fit(build_on_meta(lambda: LFPVNet(cfg, backend=backend)), state, path)
        _check_fits_memory(cfg, backend, path)
        net = LFPVNet(cfg, backend=backend)
        load_weights(net, state, path)
        return net
    state = published_state_dict(obj)
    if state is not None:
        check_weights(state, path, entry="state dict")
        cast = [k for k, v in state.items() if torch.is_tensor(v) and not v.is_floating_point()
                and not str(k).endswith("num_batches_tracked")]  # the only integer entries of the published model
        if cast:
            raise ValueError(f"checkpoint {path}: {len(cast)} weight tensor(s) hold {state[cast[0]].dtype} values "
                             f"(e.g. {cast[0]!r}): weights cast to integers have lost their values; use the file as "
                             "it was saved")
        try:
            # On the meta device first (see above): the published format holds no config, `config` may be any.
            with warnings.catch_warnings():  # loading into meta tensors is a no-op, which torch warns about
                warnings.simplefilter("ignore")
                build_on_meta(lambda: LFPVNet(config, backend=backend)).load_original_state_dict(state)
            _check_fits_memory(config or ModelConfig(), backend, path)
            return LFPVNet.from_original_state_dict(state, config=config, backend=backend)
        except (KeyError, ValueError, TypeError) as exc:
            detail = exc.args[0] if exc.args else str(exc)
            if config is None:
                raise ValueError(_not_the_published_architecture(path, state)) from exc
            raise ValueError(f"checkpoint {path}: {detail}") from exc
    state = published_retinexformer_state_dict(obj)
    if state is not None:
        return _published_retinexformer(state, path, config, backend)
    raise ValueError(f"checkpoint {path} is neither an lfpv_fast checkpoint nor {snr_aware.PUBLISHED_FORMAT} nor "
                     f"{retinexformer.PUBLISHED_FORMAT}")


def init_backbone(net: LFPVNet, path: str | Path) -> None:
    """model.init_from: the backbone's weights from a published checkpoint of it (the LFPVs stay fresh).

    A published Retinexformer file (BasicSR) for a retinexformer backbone; a published LFPV file (SNR-Aware)
    for a snr_aware backbone (its backbone weights only); a file of ours (its backbone.* weights).
    """
    obj = read_checkpoint(path)
    backbone = net.config.backbone
    if obj.get("format") == FORMAT:
        upgrade_first_format(obj)
        state = check_weights(obj.get("model"), path)
        prefix = "backbone."
        load_weights(net.backbone, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, path)
        return
    if backbone == "retinexformer" and (state := published_retinexformer_state_dict(obj)) is not None:
        check_weights(state, path, entry="params")
        try:
            net.backbone.load_published_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"model.init_from {path}: {exc}") from None
        return
    if backbone == "snr_aware" and (state := published_state_dict(obj)) is not None:
        check_weights(state, path, entry="state dict")
        lfpv = snr_aware.published_lfpv_settings(state)
        donor = LFPVNet(ModelConfig(backbone, net.config.options, lfpv), backend="reference")
        try:
            snr_aware.load_published(donor, state)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"model.init_from {path}: {exc.args[0] if exc.args else exc}") from None
        net.backbone.load_state_dict(donor.backbone.state_dict())
        return
    raise ValueError(f"model.init_from {path}: not a checkpoint of the {backbone} backbone (expected a published "
                     f"{backbone} file or an lfpv_fast checkpoint)")


def _published_retinexformer(state: dict[str, Any], path: str | Path, config: ModelConfig | None,
                             backend: str) -> LFPVNet:
    """A published Retinexformer file as plain Retinexformer (no LFPVs: the file holds none); its options from
    `config` when that names the retinexformer backbone, else the published ones (n_feat 40, [1, 2, 2])."""
    check_weights(state, path, entry="params")
    options = config.options if config is not None and config.backbone == "retinexformer" else None
    plain = ModelConfig("retinexformer", options, {"enabled": False})
    try:
        # On the meta device first (as for our files): the keys and shapes, then the size, before it is built.
        with warnings.catch_warnings():  # loading into meta tensors is a no-op, which torch warns about
            warnings.simplefilter("ignore")
            build_on_meta(lambda: LFPVNet(plain, backend=backend)).backbone.load_published_state_dict(state)
        _check_fits_memory(plain, backend, path)
        net = LFPVNet(plain, backend=backend)
        net.backbone.load_published_state_dict(state)
    except ValueError as exc:
        detail = str(exc)  # _check_fits_memory's line already names the file
        raise ValueError(detail if detail.startswith(f"checkpoint {path}") else f"checkpoint {path}: {detail}") \
            from None
    return net


def _check_fits_memory(config: ModelConfig, backend: str, path: str | Path) -> None:
    """The network of `config` plus its activations on the smallest input fit the memory available here."""
    from lfpv_fast.inference.whole_image import available_memory, estimate_peak_bytes

    smallest = estimate_peak_bytes(config, 1, config.align, config.align).whole_image
    check_network_fits_memory(build_on_meta(lambda: LFPVNet(config, backend=backend)), path,
                              available_memory(torch.device("cpu")), smallest)


def _not_the_published_architecture(path: str | Path, state: dict[str, Any]) -> str:
    found = snr_aware.published_nf(state)
    nf = f", nf={found} in this file" if found is not None else ""
    return (f"checkpoint {path} is in the published format, which holds no model config and so is read as the "
            f"published SMID architecture (nf={ModelConfig().nf}); its weights are of another architecture{nf}. "
            f"For a model trained with lfpv_fast use the run's {FINAL_WEIGHTS}, which carries its config")


# ---------------------------------------------------------------------------------------------
# Training checkpoints: checked whole before a resume changes anything


def check_training_checkpoint(obj: dict[str, Any], path: str | Path, model_config: ModelConfig) -> None:
    """Everything a resume will read, checked without touching any state: the entries exist and have the right
    form, the model config is the run's, the weights are finite and the random states can be restored."""
    upgrade_first_format(obj)  # a file from before backbones: today's names and parameter order
    missing = [k for k in _TRAINING_KEYS if k not in obj]
    if obj.get("format") != FORMAT or missing:
        raise ValueError(f"checkpoint {path} is not a training checkpoint of lfpv_fast (missing {missing}); "
                         "weights-only files can be evaluated but not resumed")
    version = obj.get("version", CHECKPOINT_VERSION)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {version!r}; this lfpv_fast reads version "
                         f"{CHECKPOINT_VERSION} (a file from a newer release?)")
    stored = model_config_of(obj, path)
    if stored != model_config:
        raise ValueError(f"checkpoint {path} was trained with model config {asdict(stored)}, but the run config has "
                         f"{asdict(model_config)}; resume with the run's {CONFIG}")
    check_weights(obj["model"], path)
    step = obj["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint {path}: 'step' must be a whole number >= 0, got {step!r}")
    best = obj.get("best_psnr")
    if best is not None and not isinstance(best, (int, float)):
        raise ValueError(f"checkpoint {path}: 'best_psnr' must be a number or None, got {_kind(best)}")
    optimizer = obj["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list) and optimizer["param_groups"]
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        raise ValueError(f"checkpoint {path}: 'optimizer' is not an optimizer state (expected a dict with 'state' "
                         f"and a non-empty list 'param_groups'), got {_describe_value(optimizer)}")
    if not (isinstance(obj["scheduler"], dict) and obj["scheduler"]):
        raise ValueError(f"checkpoint {path}: 'scheduler' is not a scheduler state, got "
                         f"{_describe_value(obj['scheduler'])}")
    loader = obj["loader"]
    if not (isinstance(loader, dict) and loader and all(isinstance(v, int) for v in loader.values())):
        raise ValueError(f"checkpoint {path}: 'loader' must be the loader's position (a dict of whole numbers such "
                         f"as epoch and batch), got {_describe_value(loader)}")
    _check_rng(obj["rng"], path)
    try:
        torch.Generator().set_state(obj.get("draw_generator"))
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"checkpoint {path}: 'draw_generator' is not a saved torch.Generator state "
                         f"({_describe_value(obj.get('draw_generator'))}: {_first_line(exc)})") from None


def _check_rng(rng: Any, path: str | Path) -> None:
    """Restore each saved random state into a scratch generator: what would fail in restore_rng fails here."""
    try:
        if not isinstance(rng, dict):
            raise TypeError(f"expected a dict, got {_kind(rng)}")
        torch.Generator().set_state(rng["torch"])
        if not (isinstance(rng["cuda"], list) and all(torch.is_tensor(s) and s.dtype == torch.uint8
                                                      for s in rng["cuda"])):
            raise TypeError("'cuda' must be a list of uint8 tensors")
        np.random.RandomState().set_state(_numpy_state(rng["numpy"]))
        random.Random().setstate(_python_state(rng["python"]))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        reason = f"missing {exc}" if isinstance(exc, KeyError) else _first_line(exc)
        raise ValueError(f"checkpoint {path}: 'rng' is not a saved random state ({reason})") from None


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


def _describe_value(value: Any) -> str:
    if isinstance(value, dict):
        return "an empty dict" if not value else f"a dict with keys {sorted(map(str, value))[:6]}"
    return _kind(value)


def restore_training_state(obj: dict[str, Any], path: str | Path, *, optimizer: torch.optim.Optimizer,
                           scheduler: Any, draw_generator: torch.Generator, loader: Any) -> tuple[int, float | None]:
    """Put a checked training checkpoint's state into the run's objects (and the global RNGs).

    Returns (step, best_psnr). A state that does not fit (an optimizer of another model) is a one-line ValueError.
    """
    check_optimizer_state(obj["optimizer"], optimizer, path)
    check_scheduler_state(obj["scheduler"], optimizer, path)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("loader", loader)):
        try:
            target.load_state_dict(obj[name])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            reason = f"missing {exc}" if isinstance(exc, KeyError) else _first_line(exc)
            raise ValueError(f"checkpoint {path}: its '{name}' state does not fit this run ({reason})") from None
    restore_rng(obj["rng"])
    draw_generator.set_state(obj["draw_generator"])
    return int(obj["step"]), obj.get("best_psnr")


# The largest learning rate a saved state may hold: train.lr's bound.
_MAX_SAVED_LR = MAX_LR


def _is_number(value: Any) -> bool:
    if torch.is_tensor(value):
        return value.numel() == 1 and not value.is_complex() and bool(torch.isfinite(value))
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _check_lr(value: Any, where: str, path: str | Path) -> None:
    if not (_is_number(value) and 0 <= float(value) <= _MAX_SAVED_LR):
        raise ValueError(f"checkpoint {path}: {where} must be a number in [0, {_MAX_SAVED_LR:g}], got "
                         f"{_cut(repr(value))}")


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def check_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """A saved Adam state that fits `optimizer` and can take a step: its groups and parameters match, the
    hyperparameters are sane (lr in [0, 1], betas in [0, 1), eps > 0, weight decay >= 0, all finite), and every
    moment has its parameter's shape and finite values (exp_avg_sq >= 0), every step count a whole number >= 0.
    torch's load_state_dict checks none of this; a bad value would crash or diverge at the first step."""
    groups = optimizer.param_groups
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(groups) or any(len(s["params"]) != len(g["params"])
                                               for s, g in zip(saved_groups, groups, strict=False)):
        raise ValueError(f"checkpoint {path}: its 'optimizer' state is for {len(saved_groups)} group(s) of "
                         f"{[len(s['params']) for s in saved_groups][:4]} parameters, this run has "
                         f"{[len(g['params']) for g in groups][:4]}")
    params: dict[Any, torch.Tensor] = {}
    for index, (group, live) in enumerate(zip(saved_groups, groups, strict=True)):
        where = f"'optimizer' group {index}"
        _check_lr(group.get("lr"), f"{where} lr", path)
        if "initial_lr" in group:
            _check_lr(group["initial_lr"], f"{where} initial_lr", path)
        betas = group.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_is_number(b) and 0 <= float(b) < 1 for b in betas)):
            raise ValueError(f"checkpoint {path}: {where} betas must be two numbers in [0, 1), got {_cut(repr(betas))}")
        eps = group.get("eps")
        if not (_is_number(eps) and float(eps) > 0):
            raise ValueError(f"checkpoint {path}: {where} eps must be a finite number > 0, got {_cut(repr(eps))}")
        decay = group.get("weight_decay", 0)
        if not (_is_number(decay) and float(decay) >= 0):
            raise ValueError(f"checkpoint {path}: {where} weight_decay must be a finite number >= 0, got "
                             f"{_cut(repr(decay))}")
        params.update(zip(group["params"], live["params"], strict=True))
    for key, entry in saved["state"].items():
        if key not in params:
            raise ValueError(f"checkpoint {path}: 'optimizer' state for parameter {_cut(repr(key))}, which no group "
                             "holds")
        if not isinstance(entry, dict):
            raise ValueError(f"checkpoint {path}: 'optimizer' state of parameter {key} is {_kind(entry)}, not a dict")
        shape = tuple(params[key].shape)
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if name not in entry:
                if name != "max_exp_avg_sq":
                    raise ValueError(f"checkpoint {path}: 'optimizer' state of parameter {key} has no {name!r}")
                continue
            moment = entry[name]
            if not (torch.is_tensor(moment) and moment.is_floating_point() and tuple(moment.shape) == shape):
                raise ValueError(f"checkpoint {path}: 'optimizer' {name} of parameter {key} is {_kind(moment)}, "
                                 f"expected a float tensor of the parameter's shape {shape}")
            if not bool(torch.isfinite(moment).all()) or (name != "exp_avg" and bool((moment < 0).any())):
                raise ValueError(f"checkpoint {path}: 'optimizer' {name} of parameter {key} holds NaN/inf"
                                 f"{'' if name == 'exp_avg' else ' or negative'} values")
        step = entry.get("step")
        if not (_is_number(step) and float(step) >= 0 and float(step) == int(float(step))):
            raise ValueError(f"checkpoint {path}: 'optimizer' step count of parameter {key} must be a whole number "
                             f">= 0, got {_cut(repr(step))}")


def check_scheduler_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """A saved LR scheduler state (LambdaLR) for this optimizer: one base lr per group, each sane, whole-number
    counters >= 0 (last_epoch >= -1)."""
    base = saved.get("base_lrs")
    if not (isinstance(base, list) and len(base) == len(optimizer.param_groups)):
        raise ValueError(f"checkpoint {path}: 'scheduler' base_lrs must be a list of {len(optimizer.param_groups)} "
                         f"learning rate(s), got {_cut(repr(base))}")
    for index, lr in enumerate(base):
        _check_lr(lr, f"'scheduler' base_lrs[{index}]", path)
    for index, lr in enumerate(saved.get("_last_lr") or []):
        _check_lr(lr, f"'scheduler' _last_lr[{index}]", path)
    for name, low in (("last_epoch", -1), ("_step_count", 0)):
        value = saved.get(name, low)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"checkpoint {path}: 'scheduler' {name} must be a whole number >= {low}, got "
                             f"{_cut(repr(value))}")
