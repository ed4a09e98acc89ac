"""Datasets: SMID as published (`smid`), image-pair folders and the LOL presets (`images`), the offline demo
dataset (`demo`, also as PNG pairs), the prepared cache's format (`cache`), the data section of a run config and
the table of dataset kinds (`config.DataConfig`, `config.DATASETS`), config -> pairs (`source`), and the data
layer's errors (`errors.DataError`, `errors.ConfigError`)."""

from lfpv_fast.data.demo import DemoPaths, make_demo_dataset
from lfpv_fast.data.errors import DataError
from lfpv_fast.data.smid import Pair, load_frame, resize_linear

__all__ = ["DataError", "DemoPaths", "Pair", "load_frame", "make_demo_dataset", "resize_linear"]
