"""Networks: backbones (each declares its LFPV sites, see `backbone.py`) and the LFPV plug-in."""

from lfpv_fast.models.backbone import Backbone, Site
from lfpv_fast.models.retinexformer import RetinexFormer

__all__ = ["Backbone", "RetinexFormer", "Site"]
