"""Datalists, offline sample data sets and MONAI transform presets."""

from .datalist import (
    VALIDATION_FRACTION,
    VALIDATION_SEED,
    DatalistError,
    datalist_domains,
    load_datalist,
    training_subset,
    validation_split,
    write_datalist,
)
from .datasets import SkippingDataset
from .sample_data import (
    SAMPLE_DATASETS,
    sample_data_root,
    sample_dataset,
    simulate_fundus,
    simulate_ultrasound,
)
from .samplers import DomainEpisodeSampler
from .transforms import (
    DropTrailingSingletond,
    MatchChannelsd,
    classification_transforms,
    segmentation_transforms,
)

__all__ = [
    "SAMPLE_DATASETS",
    "VALIDATION_FRACTION",
    "VALIDATION_SEED",
    "DatalistError",
    "DomainEpisodeSampler",
    "DropTrailingSingletond",
    "MatchChannelsd",
    "SkippingDataset",
    "classification_transforms",
    "datalist_domains",
    "load_datalist",
    "training_subset",
    "validation_split",
    "sample_data_root",
    "sample_dataset",
    "segmentation_transforms",
    "simulate_fundus",
    "simulate_ultrasound",
    "write_datalist",
]
