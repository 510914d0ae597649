"""In-memory dataset container and tensor-only helpers (no file IO here)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageDataset:
    """A labelled dataset held as tensors.

    Images are float32 in [0, 1], shape (N, C, H, W); toy/tabular sets use (N, D).
    Normalisation is *not* applied: models receive ``(x - mean) / std`` through
    :func:`normalize`, and DSVs live in that normalised space.

    Attributes:
        name: registry name of the dataset.
        train_x: (N, C, H, W) or (N, D) float32 training inputs.
        train_y: (N,) int64 training labels in [0, num_classes).
        test_x: (M, ...) test inputs.
        test_y: (M,) test labels.
        classes: class names, index = label.
        mean: per-channel mean of train_x, shape (C,) (or (D,) for tabular).
        std: per-channel std of train_x, same shape as ``mean``.
        source: where the data was read from (path or "generated").
        features: tabular data: the feature (column) names, in order; () for images.
        meta: free-form string facts (load time, full split sizes).
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    mean: Tensor
    std: Tensor
    source: str = "generated"
    features: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. (1, 28, 28)."""
        return tuple(self.train_x.shape[1:])

    def with_train(self, x: Tensor, y: Tensor) -> ImageDataset:
        """Return a copy whose training split is (x, y)."""
        return replace(self, train_x=x, train_y=y)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std of (N, C, H, W) images or per-feature of (N, D) data.

    Returns:
        (mean, std), each of shape (C,) or (D,); std is floored at 1e-6.
    """
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    mean = x64.mean(dim=dims)
    std = x64.std(dim=dims).clamp_min(1e-6)
    return mean.float(), std.float()


def _view_stats(stat: Tensor, x: Tensor) -> Tensor:
    return stat.view(1, -1, *([1] * (x.dim() - 2))).to(x.device, x.dtype)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std with per-channel statistics broadcast over (N, C, H, W)."""
    return (x - _view_stats(mean, x)) / _view_stats(std, x)


def denormalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Inverse of :func:`normalize`."""
    return x * _view_stats(std, x) + _view_stats(mean, x)


def per_class_indices(
    y: Tensor, n_per_class: int, num_classes: int, generator: torch.Generator | None = None, at_most: bool = False
) -> Tensor:
    """Pick ``n_per_class`` indices of each class at random (seeded), sorted by class.

    Args:
        y: (N,) labels.
        n_per_class: how many of each class to keep.
        num_classes: number of classes C.
        generator: explicit RNG; the same seed always gives the same indices.
        at_most: keep every sample of a class that has fewer than ``n_per_class`` (a cap, not a demand); the
            classes that have enough draw exactly as without it.

    Returns:
        (C * n_per_class,) int64 indices (fewer with ``at_most``), class 0 first.

    Raises:
        ValueError: when a class has fewer than ``n_per_class`` samples and ``at_most`` is off.
    """
    out = []
    for c in range(num_classes):
        idx = (y == c).nonzero(as_tuple=True)[0]
        if idx.numel() < n_per_class and not at_most:
            raise ValueError(
                f"class {c} has only {idx.numel()} samples, fewer than the {n_per_class} per class asked for"
            )
        perm = torch.randperm(idx.numel(), generator=generator)[:n_per_class]
        out.append(idx[perm])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def subset_per_class(ds: ImageDataset, n_per_class: int, seed: int = 0) -> ImageDataset:
    """Keep ``n_per_class`` training samples of each class (seeded); the test split is unchanged."""
    g = torch.Generator().manual_seed(seed)
    idx = per_class_indices(ds.train_y, n_per_class, ds.num_classes, g)
    return ds.with_train(ds.train_x[idx], ds.train_y[idx])


def split_validation(ds: ImageDataset, val_per_class: int, seed: int = 0) -> tuple[ImageDataset, Tensor, Tensor]:
    """Hold out ``val_per_class`` training samples per class for model selection.

    Returns:
        (dataset without the held-out samples, val_x, val_y).
    """
    g = torch.Generator().manual_seed(seed)
    val_idx = per_class_indices(ds.train_y, val_per_class, ds.num_classes, g)
    keep = torch.ones(ds.train_y.numel(), dtype=torch.bool)
    keep[val_idx] = False
    return ds.with_train(ds.train_x[keep], ds.train_y[keep]), ds.train_x[val_idx], ds.train_y[val_idx]


def class_counts(y: Tensor, num_classes: int) -> list[int]:
    """Number of samples of each class."""
    return torch.bincount(y, minlength=num_classes).tolist()
