"""Run configuration: one YAML file describes a whole run (model, data, train, val, logging).

The YAML is loaded into plain dataclasses. Every key is checked: an unknown key is an error naming
the file, the key and the closest valid key; a value of the wrong type names the key and the type
that was expected. `--set a.b=value` on the command line goes through the same checks
(`load_config(path, overrides=["a.b=value"])`), and an error about an override names the override, not
the file (which may not contain the key at all).

The sections live with what they configure: the model in `lfpv_fast.models.config`, the data (and the table of
dataset kinds) in `lfpv_fast.data.config`; this module reads the YAML into them and checks across sections (the
sizes the data must reach are the model's: `validate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# ConfigError (defined below the data layer, which raises it too), DataConfig, MAX_RESIZE_PIXELS and
# resolve_data_file are also importable from here, their first home.
from lfpv_fast.data.config import MAX_RESIZE_PIXELS, DataConfig, check_data  # noqa: F401
from lfpv_fast.data.errors import ConfigError
from lfpv_fast.data.lists import configs_dir, resolve_data_file  # noqa: F401
from lfpv_fast.models import backbone_entry
from lfpv_fast.models.config import LEGACY_LFPV_KEYS, LFPVConfig, ModelConfig
from lfpv_fast.ops.backends import BackendName

# The largest train.lr accepted: Adam moves each weight by about lr per step.
MAX_LR = 1.0
# The most values a config (or one --set value) may hold once its YAML aliases are expanded: a run config holds
# about 80, and a few levels of aliases that repeat aliases (a "billion laughs" document) expand past any memory.
MAX_YAML_VALUES = 10_000
# train.seed seeds numpy's global generator too, which takes seeds below 2**32.
MAX_SEED = 2**32 - 1
# Values quoted in error messages are cut to this many characters, so that every error stays one short line.
MAX_QUOTED_CHARS = 200


def quote(value: Any) -> str:
    """repr(value), cut to MAX_QUOTED_CHARS (error messages quote what they were given, never a megabyte of it)."""
    text = _bounded_repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else f"{text[:MAX_QUOTED_CHARS]}... ({len(text)} characters)"


def _bounded_repr(value: Any) -> str:
    # repr of a deeply shared structure can be gigabytes: only small containers are repr'ed whole.
    if isinstance(value, (list, tuple, dict)) and _expanded_size(value, MAX_QUOTED_CHARS) > MAX_QUOTED_CHARS:
        kind = type(value).__name__
        return f"<a {kind} of {len(value)} entries, holding more than {MAX_QUOTED_CHARS} values>"
    return repr(value)


def _expanded_size(value: Any, limit: int) -> int:
    """How many values `value` holds with shared (aliased) parts counted each time they appear; stops past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def _shown(text: str) -> str:
    """A text given on the command line, cut to MAX_QUOTED_CHARS for an error message."""
    return text if len(text) <= MAX_QUOTED_CHARS else f"{text[:MAX_QUOTED_CHARS]}..."


def yaml_error_line(exc: yaml.YAMLError, where: str) -> str:
    """A YAML syntax error as one line: `where:line:column: not valid YAML: what is wrong (while what)`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    detail = problem + (f" ({context})" if context else "")
    if mark is None:
        return f"{where}: not valid YAML: {detail}"
    if where.startswith("--set"):  # a one-line value: the column says where
        return f"{where}: the value is not valid YAML: {detail} at column {mark.column + 1}"
    return f"{where}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {detail}"


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand past MAX_YAML_VALUES values (a YAML bomb); a syntax
    error is a one-line ConfigError naming `where`, the line and the column."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(exc, where)) from None
    if _expanded_size(value, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise ConfigError(f"{where}: the YAML holds more than {MAX_YAML_VALUES} values once its aliases (*name) "
                          "are expanded; a run config holds about 80 (aliases that repeat aliases: a YAML bomb?)")
    return value


@dataclass
class TrainConfig:
    iterations: int = 200_000
    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    # Cosine annealing with restarts, as published: restart period and floor.
    restart_period: int = 200_000
    eta_min: float = 1e-7
    pixel_weight: float = 1.0
    perceptual_weight: float = 0.1
    # Path of torchvision-format VGG19 weights; null switches the perceptual term off.
    vgg_weights: str | None = None
    seed: int = 0
    checkpoint_every: int = 5000
    # Also a checkpoint once this many minutes have passed since the last one (null: by steps only): bounds the
    # work a hard kill (kill -9, a node lost) can lose when steps are slow.
    checkpoint_minutes: float | None = None
    keep_checkpoints: int = 3
    # Under torchrun: how long a collective waits for a rank that died or stalled before the run fails with an
    # error naming it (the process-group timeout). Long enough for rank 0's validation and checkpoint writes.
    dist_timeout_s: float = 1800.0
    # What to do when the loss or a gradient is NaN/Inf: stop, or skip the step.
    nonfinite: Literal["stop", "skip"] = "stop"
    # With nonfinite=skip: stop (exit 1) after this many skipped steps in a row (a run that is not learning).
    max_consecutive_skips: int = 10
    # Fast-path switches ("auto" means on where a GPU is used, off on the CPU).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: BackendName = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    bf16: Literal["auto", "on", "off"] = "auto"
    channels_last: bool = False
    fused_adam: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: bool = False
    # Bit-identical reruns with the same seed (deterministic algorithms, no cuDNN autotuning, fixed CPU threads).
    deterministic: bool = False
    # Intra-op CPU threads (torch.set_num_threads); null: torch's default, or 1 when deterministic.
    cpu_threads: int | None = None


@dataclass
class ValConfig:
    every: int = 5000
    # Validation images limit (null: all test frames) and how many grids to save as PNG.
    max_images: int | None = None
    save_images: int = 4


@dataclass
class LoggingConfig:
    every: int = 100
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Where the config came from (not a YAML key).
    source: str = field(default="<defaults>", compare=False, repr=False)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "val": ValConfig,
    "logging": LoggingConfig,
}


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or a packaged config by name (`demo`, `smid.yaml`)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for candidate in (configs_dir() / p.name, configs_dir() / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {str(path)!r} not found (also looked in {configs_dir()})")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        # YAML reads on/off as booleans; accept them for "on"/"off" switches.
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            return "on" if value else "off"
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept what Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {quote(value)} ({type(value).__name__})")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    if cls is ModelConfig:
        return _build_model_section(values, where)
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {quote(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(str(key), names, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


MODEL_KEYS = ("backbone", "options", "lfpv", "init_from")


def _build_model_section(values: dict[str, Any], where: str) -> ModelConfig:
    """The model section: backbone, options, lfpv, init_from; or the first format's flat SNR-Aware keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {quote(values)}")
    backbone = values.get("backbone", "snr_aware")
    if not isinstance(backbone, str):
        raise ConfigError(f"{where}.backbone: expected a backbone name (str), got {quote(backbone)}")
    try:
        entry = backbone_entry(backbone)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    flat_keys = (*(entry.legacy_flat_keys or ()), *LEGACY_LFPV_KEYS) if entry.legacy_flat_keys else ()
    flat = {k: v for k, v in values.items() if k in flat_keys}
    for key in values:
        if key not in MODEL_KEYS and key not in flat_keys:
            raise _unknown_key(str(key), [*MODEL_KEYS, *flat_keys], where)
    if flat and ("options" in values or "lfpv" in values):
        raise ConfigError(f"{where}: flat key {next(iter(flat))!r} (the first config format) cannot be mixed with "
                          "'options'/'lfpv'; put it under model.options or model.lfpv")
    options: Any = values.get("options") or {}
    if entry.options is not dict:
        options = dataclasses.asdict(_build_section(entry.options, options, f"{where}.options"))
    elif not isinstance(options, dict):
        raise ConfigError(f"{where}.options: expected a mapping of keys, got {quote(options)}")
    lfpv = dataclasses.asdict(_build_section(LFPVConfig, values.get("lfpv") or {}, f"{where}.lfpv"))
    init_from = _coerce(values.get("init_from"), str | None, f"{where}.init_from")
    hints = typing.get_type_hints(entry.options) if entry.options is not dict else {}
    hints.update(typing.get_type_hints(LFPVConfig))
    hints["updater_width"] = int
    flat = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in flat.items()}
    try:
        return ModelConfig(backbone, options, lfpv, init_from, **flat)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The model section as plain values (nested: backbone, options, lfpv, init_from)."""
    values = dataclasses.asdict(config)
    if not isinstance(values["options"], dict):
        values["options"] = dict(values["options"])
    return values


def section_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """One config dataclass (e.g. ModelConfig) from a dict, every key and type checked; errors start with `where`."""
    return _build_section(cls, values, where)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Build and validate a RunConfig from a nested dict (as read from YAML)."""
    cfg = _build_config(raw, source)
    validate(cfg)
    return cfg


def _build_config(raw: dict[str, Any], source: str) -> RunConfig:
    """Every key checked, errors naming `source`; the checks across keys (validate) are left to the caller."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {list(SECTIONS)}")
    sections = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise _unknown_key(str(key), list(SECTIONS), source)
        sections[key] = _build_section(SECTIONS[key], value or {}, f"{source}: {key}")
    cfg = RunConfig(**sections)
    cfg.source = source
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a nested dict of plain values (what the run folder's config.yaml holds)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}  # model: nested (backbone, options...)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML (so 3, 1e-4, null, [1, 2] work)."""
    shown = _shown(text)
    if "=" not in text:
        raise ConfigError(f"--set {shown}: expected the form section.key=value")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    nested = len(parts) == 3 and parts[0] == "model" and parts[1] in ("options", "lfpv")
    if (len(parts) != 2 and not nested) or not all(parts):
        raise ConfigError(f"--set {shown}: the key must be section.key, e.g. train.iterations (or "
                          "model.options.KEY / model.lfpv.KEY)")
    parsed = load_yaml(value, f"--set {shown}") if value.strip() else None
    return parts, parsed


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config (a path or a packaged name) and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); a "
                              "config is YAML saved as UTF-8") from None
        raw = load_yaml(text, str(p)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping with sections {list(SECTIONS)}")
    cfg = _build_config(raw, source)
    _apply_overrides(cfg, overrides)
    validate(cfg, f"{source} with {' '.join(f'--set {_shown(t)}' for t in overrides)}" if overrides else source)
    return cfg


def _apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> None:
    """`--set section.key=value` on top of the file's values; an error names the override it comes from."""
    changes: dict[str, dict[str, Any]] = {}
    given: dict[str, list[str]] = {}
    model_overrides = []
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "model":
            model_overrides.append((text, parts[1:], value))
            continue
        section, key = parts
        where = f"--set {_shown(text)}"
        if section not in SECTIONS:
            raise _unknown_key(section, list(SECTIONS), where)
        cls = SECTIONS[section]
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if key not in names:
            raise _unknown_key(key, names, f"{where}: {section}")
        hint = typing.get_type_hints(cls)[key]
        if value is None and hint is str and not text.partition("=")[2].strip():
            value = ""  # `--set data.lq_prefix=` clears a text key (an empty value is null only where null is valid)
        changes.setdefault(section, {})[key] = _coerce(value, hint, f"{where}: {section}.{key}")
        given.setdefault(section, []).append(where)
    if model_overrides:
        cfg.model = _override_model(cfg.model, model_overrides)
    # One replace per section: a section's own checks across its keys see all of its overrides at once.
    for section, values in changes.items():
        try:
            setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{', '.join(given[section])}: {section}: {exc}") from exc


def _override_model(model: ModelConfig, overrides: list[tuple[str, list[str], Any]]) -> ModelConfig:
    """`--set model.KEY=V`, `model.options.KEY=V`, `model.lfpv.KEY=V` (and the first format's flat keys,
    `model.nf=8`, which go to options or lfpv) applied together, then the section built and checked again."""
    values = model_config_to_dict(model)
    flat = backbone_entry(model.backbone).legacy_flat_keys or ()
    for _, path, value in overrides:
        if path == ["backbone"] and value != values["backbone"]:
            values["options"] = {}  # another backbone's options do not carry over
        if len(path) == 2:
            values[path[0]] = {**values[path[0]], path[1]: value}
        elif path[0] == "updater_width" and flat:  # first format: a multiple of nf
            nf = values["options"]["nf"]
            values["lfpv"]["updater_width"] = None if value == 4 else (value * nf if isinstance(value, int) else value)
        elif path[0] in ("bank_size", "patch_size"):
            values["lfpv"][path[0]] = value
        elif path[0] in flat:
            values["options"][path[0]] = value
        else:
            values[path[0]] = value
    where = ", ".join(f"--set {_shown(text)}" for text, _, _ in overrides)
    return _build_model_section(values, f"{where}: model")


def validate(cfg: RunConfig, where: str | None = None) -> None:
    """Checks across keys, done before any work starts; errors start with `where` (default: cfg.source)."""
    src = where or cfg.source
    t = cfg.train
    validate_data_sizes(cfg.data, cfg.model, src)
    try:
        check_data(cfg.data)
    except ValueError as exc:
        raise ConfigError(f"{src}: {exc}") from exc
    if t.iterations < 1:
        raise ConfigError(f"{src}: train.iterations must be >= 1, got {t.iterations}")
    if not 0 <= t.seed <= MAX_SEED:
        raise ConfigError(f"{src}: train.seed must be in [0, 2**32 - 1] (numpy's seeds), got {quote(t.seed)}")
    if t.checkpoint_every < 1 or cfg.val.every < 1 or cfg.logging.every < 1:
        raise ConfigError(f"{src}: train.checkpoint_every, val.every and logging.every must be >= 1")
    if len(t.betas) != 2:
        raise ConfigError(f"{src}: train.betas must be two numbers, got {t.betas}")
    if t.checkpoint_minutes is not None and not (math.isfinite(t.checkpoint_minutes) and t.checkpoint_minutes > 0):
        raise ConfigError(f"{src}: train.checkpoint_minutes must be > 0 or null, got {t.checkpoint_minutes}")
    if not (math.isfinite(t.dist_timeout_s) and t.dist_timeout_s >= 1):
        raise ConfigError(f"{src}: train.dist_timeout_s must be >= 1 (seconds), got {t.dist_timeout_s}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"{src}: train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    if t.restart_period < 1:
        raise ConfigError(f"{src}: train.restart_period must be >= 1, got {t.restart_period}")
    for key in ("lr", "eta_min", "weight_decay", "pixel_weight", "perceptual_weight"):
        if not math.isfinite(getattr(t, key)):
            raise ConfigError(f"{src}: train.{key} must be a finite number, got {getattr(t, key)}")
    if not 0 < t.lr <= MAX_LR:
        # Adam's step is about lr per weight: beyond 1 it overflows or diverges at once.
        raise ConfigError(f"{src}: train.lr must be in (0, {MAX_LR:g}], got {t.lr:g} (the published rate is 4e-4)")
    if not 0 <= t.eta_min <= t.lr:
        raise ConfigError(f"{src}: train.eta_min must be in [0, train.lr], got eta_min={t.eta_min:g}, lr={t.lr:g}")
    if t.weight_decay < 0:
        raise ConfigError(f"{src}: train.weight_decay must be >= 0, got {t.weight_decay}")
    if t.max_consecutive_skips < 1:
        raise ConfigError(f"{src}: train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
    if not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"{src}: train.betas must be in [0, 1), got {t.betas}")
    if t.pixel_weight < 0 or t.perceptual_weight < 0:
        raise ConfigError(f"{src}: train.pixel_weight and train.perceptual_weight must be >= 0")
    cores = os.cpu_count() or 1
    if t.cpu_threads is not None and not 1 <= t.cpu_threads <= cores:
        # More threads than cores only slows the ops down; far more cannot even be started.
        raise ConfigError(f"{src}: train.cpu_threads must be in [1, {cores}] (the CPU cores here) or null, "
                          f"got {t.cpu_threads}")
    if t.cuda_graphs and t.compile == "off":
        # CUDA graphs come from torch.compile's "reduce-overhead" mode (cudagraph trees).
        raise ConfigError(f"{src}: train.cuda_graphs=true needs train.compile 'on' or 'auto', got 'off'")
    if cfg.val.max_images is not None and cfg.val.max_images < 1:
        raise ConfigError(f"{src}: val.max_images must be >= 1 or null, got {cfg.val.max_images}")
    if cfg.val.save_images < 0:
        raise ConfigError(f"{src}: val.save_images must be >= 0, got {cfg.val.save_images}")


def validate_data_sizes(d: DataConfig, model: ModelConfig, src: str) -> None:
    """data.resize and data.crop against the model's smallest input side, its alignment (`ModelConfig.align`: e.g.
    lcm(4 x token_size, 4 x patch_size) for SNR-Aware with LFPVs): a crop under it would fail at the first step."""
    min_side = model.align
    lfpv = " with LFPVs" if model.lfpv.enabled else ""
    rule = f"the smallest input side of backbone {model.backbone!r}{lfpv}, its alignment model.align = {min_side}"
    if d.resize is not None and (len(d.resize) != 2 or min(d.resize) < min_side):
        raise ConfigError(f"{src}: data.resize must be [width, height], each >= {min_side} ({rule}), or null, "
                          f"got {quote(d.resize)}")
    if d.crop < min_side or (d.resize is not None and d.crop > min(d.resize)):
        raise ConfigError(f"{src}: data.crop must be in [{min_side}, min(data.resize)] ({min_side}: {rule}), "
                          f"got {d.crop}")
