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
    fig, axes = plt.subplots(n_cls, cols, figsize=(max(cols * 0.9 + 1.2, 4.0), n_cls * 0.9 + 0.4), squeeze=False)
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


def image_matrix(rows: Sequence[Tensor], row_labels: Sequence[str], col_labels: Sequence[Sequence[str]] | Sequence[str],
                 title: str) -> Figure:
    """Rows of images (interpolation strips, edits), labelled per row and per column.

    Args:
        rows: one (K, C, H, W) tensor per row, pixel units [0, 1].
        row_labels: one label per row (left).
        col_labels: one label per column (the same for every row), or one list per row.
        title: figure title.
    """
    cols = max((r.shape[0] for r in rows), default=1)
    fig, axes = plt.subplots(len(rows), cols, figsize=(max(cols * 1.0 + 1.4, 4.0), len(rows) * 1.15 + 0.5),
                             squeeze=False)
    per_row = bool(col_labels) and not isinstance(col_labels[0], str)
    for i, r in enumerate(rows):
        labels = col_labels[i] if per_row else col_labels
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < r.shape[0]:
                img = r[j].detach().cpu().clamp(0, 1)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
                if j < len(labels):
                    ax.set_title(str(labels[j]), fontsize=6)
            if j == 0:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=7)
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


def ranked_bars(rows: Sequence[dict], title: str) -> Figure:
    """Test accuracy (mean ± std) of every method, one panel per IPC, best first (result rows of
    ``tasks.evaluate``)."""
    import matplotlib.pyplot as plt

    ipcs = sorted({r["ipc"] for r in rows if r.get("acc_mean") is not None and r["method"] != "full"})
    fig, axes = plt.subplots(1, max(1, len(ipcs)), figsize=(4.5 * max(1, len(ipcs)), 3.6), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        sel = sorted((r for r in rows if r["ipc"] == ipc and r.get("acc_mean") is not None and r["method"] != "full"),
                     key=lambda r: -r["acc_mean"])
        names = [r["method"] + (f" ({r['label_type']})" if r["label_type"] != "hard" else "") for r in sel]
        vals = [100 * r["acc_mean"] for r in sel]
        errs = [100 * (r.get("acc_std") or 0.0) for r in sel]
        colors = ["#d62728" if r.get("best") else ("#1f77b4" if r["method"].startswith("dsv_") else "#7f7f7f")
                  for r in sel]
        ax.barh(range(len(sel)), vals, xerr=errs, color=colors)
        ax.set_yticks(range(len(sel)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(f"IPC {ipc}")
        if vals:
            ax.set_xlim(max(0.0, min(vals) - 10), min(100.0, max(vals) + 5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
