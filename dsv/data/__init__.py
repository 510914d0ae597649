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

__all__ = [
    "ImageDataset",
    "channel_stats",
    "class_counts",
    "denormalize",
    "normalize",
    "per_class_indices",
    "split_validation",
    "subset_per_class",
]
