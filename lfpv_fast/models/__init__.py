"""Networks: backbones (each declares its LFPV sites, see `backbone.py`) and the LFPV plug-in."""

from lfpv_fast.models.backbone import Backbone, Site

__all__ = ["Backbone", "Site"]
