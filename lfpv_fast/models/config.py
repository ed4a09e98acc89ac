"""The model section of a run config: which backbone, its options, and the LFPV plug-in's settings.

In YAML:

    model:
      backbone: retinexformer        # a name in lfpv_fast.models.BACKBONES, or "package.module:factory"
      options: {n_feat: 40}          # the backbone's own options (its options dataclass; defaults fill the rest)
      lfpv: {enabled: true, bank_size: 16, patch_size: 4, updater_width: null, site: null}
      init_from: null                # a published checkpoint of the backbone to start from (fresh LFPVs)

Configs written before backbones existed hold one flat section (`model: {nf: 16, bank_size: 16, ...}`): the
SNR-Aware options and three LFPV keys side by side. They still load unchanged: `ModelConfig(**flat)` and the
YAML reader map each flat key to its place (`LEGACY_LFPV_KEYS`; `updater_width` was a multiple of nf then).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

# The flat keys of the first config format that belong to the LFPV plug-in; every other flat key was an
# SNR-Aware option.
LEGACY_LFPV_KEYS = ("bank_size", "patch_size", "updater_width")
# The published updaters are conv stacks 4 x C wide (C: the site's channels).
PUBLISHED_UPDATER_MULTIPLE = 4


@dataclass
class LFPVConfig:
    """The LFPV plug-in: two banks of `bank_size` feature vectors and `patch_size` x `patch_size` feature
    patches, updated from the features at `site` and fused back into them."""

    enabled: bool = True  # false: the plain backbone (no banks, no updaters, one output)
    bank_size: int = 16
    patch_size: int = 4
    # Hidden width of the four updater conv stacks. null: 4 x the site's channels, as published (256 at C=64,
    # 640 at C=160: ~42 M training-only parameters there); set a number to keep it fixed as C grows.
    updater_width: int | None = None
    site: str | None = None  # where the LFPVs attach; null: the backbone's default site

    def __post_init__(self) -> None:
        for name in ("bank_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.lfpv.{name} must be >= 1, got {getattr(self, name)}")
        if self.updater_width is not None and self.updater_width < 1:
            raise ValueError(f"model.lfpv.updater_width must be >= 1 or null, got {self.updater_width}")

    def hidden_width(self, channels: int) -> int:
        return self.updater_width if self.updater_width is not None else PUBLISHED_UPDATER_MULTIPLE * channels


@dataclass(init=False)
class ModelConfig:
    """Architecture. The defaults are the published SMID model (SNR-Aware backbone with LFPVs).

    ModelConfig(backbone=, options=, lfpv=, init_from=), or the first format's flat keywords
    (ModelConfig(nf=8, bank_size=4)): flat keywords go on top of `options` and `lfpv`.
    Reading a flat field (config.nf, config.bank_size, config.d_model) reads it from options or lfpv.
    """

    backbone: str = "snr_aware"
    options: Any = None  # the backbone's options dataclass (a dict of keywords for a "module:factory" backbone)
    lfpv: LFPVConfig = field(default_factory=LFPVConfig)
    # A published checkpoint of the backbone whose weights start training (not part of the architecture).
    init_from: str | None = field(default=None, compare=False)

    def __init__(self, backbone: str = "snr_aware", options: Any = None, lfpv: LFPVConfig | dict | None = None,
                 init_from: str | None = None, **flat: Any) -> None:
        from lfpv_fast.models import backbone_entry

        entry = backbone_entry(backbone)
        if isinstance(options, dict) or options is None:
            options = dict(options or {})
        elif not isinstance(options, entry.options):
            raise TypeError(f"model.options for backbone {backbone!r} must be {entry.options.__name__} or a dict, "
                            f"got {type(options).__name__}")
        lfpv = dataclasses.asdict(lfpv) if isinstance(lfpv, LFPVConfig) else dict(lfpv or {})
        if flat:
            if entry.legacy_flat_keys is None:
                raise TypeError(f"unexpected keyword(s) {sorted(flat)}: backbone {backbone!r} takes its options in "
                                "`options` and the LFPV settings in `lfpv`")
            options = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else options
            for key, value in flat.items():
                if key == "updater_width":
                    nf = options.get("nf", entry.options().nf)
                    lfpv[key] = None if value == PUBLISHED_UPDATER_MULTIPLE else value * nf
                elif key in LEGACY_LFPV_KEYS:
                    lfpv[key] = value
                elif key in entry.legacy_flat_keys:
                    options[key] = value
                else:
                    raise TypeError(f"ModelConfig got an unexpected keyword {key!r}")
        if isinstance(options, dict) and entry.options is not dict:
            options = entry.options(**options)
        self.backbone = backbone
        self.options = options
        self.lfpv = LFPVConfig(**lfpv)
        self.init_from = init_from
        entry.check(self)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not attributes: the flat fields of the first format.
        if name.startswith("_") or "options" not in self.__dict__:
            raise AttributeError(name)
        if name in ("bank_size", "patch_size"):
            return getattr(self.lfpv, name)
        if hasattr(self.options, name):
            return getattr(self.options, name)
        raise AttributeError(f"ModelConfig has no field {name!r} (backbone {self.backbone!r})")

    @property
    def site(self) -> Any:
        """The Site the LFPVs attach to (the backbone's default when lfpv.site is null)."""
        sites, default, _ = backbone_geometry(self.backbone, _freeze(self.options))
        name = self.lfpv.site or default
        if name not in sites:
            raise ValueError(f"model.lfpv.site {name!r}: backbone {self.backbone!r} has sites {sorted(sites)}")
        return sites[name]

    @property
    def align(self) -> int:
        """Input sides are resized to a multiple of this: the backbone's own alignment, and with LFPVs a whole
        number of bank patches at the site (16 for the published model)."""
        _, _, align = backbone_geometry(self.backbone, _freeze(self.options))
        if not self.lfpv.enabled:
            return align
        return math.lcm(align, self.site.stride * self.lfpv.patch_size)

    def feature_hw(self, height: int, width: int) -> tuple[int, int]:
        """Size of the site's feature map for an input of height x width (after the alignment)."""
        a, s = self.align, self.site.stride
        return height // a * a // s, width // a * a // s


def _freeze(options: Any) -> tuple:
    values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))


@functools.lru_cache(maxsize=32)
def backbone_geometry(backbone: str, frozen_options: tuple) -> tuple[dict, str, int]:
    """(sites, default site, align) of a backbone, read from one built on the meta device (no memory, no init)."""
    import torch

    from lfpv_fast.models import backbone_entry

    entry = backbone_entry(backbone)
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen_options}
    with torch.device("meta"):
        net = entry.build(entry.options(**options) if entry.options is not dict else options, "reference")
    return dict(net.sites), net.default_site, int(net.align)
