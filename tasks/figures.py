"""Matplotlib figures logged to MLflow (Agg backend; no display needed). Logging only: no artifact
the pipeline reads is produced here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402


def image_grid(x: Tensor, labels: Tensor, class_names: Sequence[str], title: str, per_class: int = 10) -> Figure:
    """Up to ``per_class`` images of every class, one row per class.

    Args:
        x: (N, C, H, W) images in pixel units [0, 1].
        labels: (N,) int labels.
        class_names: name of each class.
        title: figure title.
        per_class: columns.
    """
    n_cls = len(class_names)
    cols = max(1, min(per_class, max((int((labels == c).sum()) for c in range(n_cls)), default=1)))
    fig, axes = plt.subplots(n_cls, cols, figsize=(cols * 0.9 + 1.2, n_cls * 0.9 + 0.4), squeeze=False)
    for c in range(n_cls):
        idx = (labels == c).nonzero(as_tuple=True)[0][:cols]
        for j in range(cols):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < idx.numel():
                img = x[idx[j]].detach().cpu().clamp(0, 1)
                if img.dim() == 3 and img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                elif img.dim() == 3:
                    ax.imshow(img.permute(1, 2, 0).numpy())
            if j == 0:
                ax.set_ylabel(class_names[c][:12], rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def lam_histograms(lam: Tensor, labels: Tensor, class_names: Sequence[str]) -> Figure:
    """Histogram of λ for each class (small multiples)."""
    n_cls = len(class_names)
    cols = min(5, n_cls)
    rows = math.ceil(n_cls / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 1.8), squeeze=False)
    for c in range(rows * cols):
        ax = axes[c // cols][c % cols]
        if c >= n_cls:
            ax.axis("off")
            continue
        vals = lam[labels == c].detach().cpu().numpy()
        ax.hist(vals, bins=30, color="tab:blue")
        ax.set_title(class_names[c][:14], fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("λ per class", fontsize=9)
    fig.tight_layout()
    return fig


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str) -> Figure:
    """Line plot of named (x, y) series."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def scatter_labeled(xs: Sequence[float], ys: Sequence[float], names: Sequence[str], xlabel: str, ylabel: str,
                    title: str) -> Figure:
    """Scatter with a text label per point (per-class Σλ vs accuracy)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.scatter(list(xs), list(ys))
    for x, y, n in zip(xs, ys, names):
        ax.annotate(n[:10], (x, y), fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def close(fig: Any) -> None:
    plt.close(fig)
