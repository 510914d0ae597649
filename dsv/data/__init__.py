"""Datasets: an in-memory container, tensor helpers and a registry of readers."""

from dsv.data.core import (
    ImageDataset,
    channel_stats,
    class_counts,
    denormalize,
    normalize,
    per_class_indices,
    split_validation,
    subset_per_class,
)
from dsv.data.readers import resize_images
from dsv.data.registry import DATASET_NAMES, DataConfig, load_dataset

__all__ = [
    "DATASET_NAMES",
    "DataConfig",
    "ImageDataset",
    "channel_stats",
    "class_counts",
    "denormalize",
    "load_dataset",
    "normalize",
    "per_class_indices",
    "resize_images",
    "split_validation",
    "subset_per_class",
]
