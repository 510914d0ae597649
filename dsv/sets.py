"""Training sets by name: the one set builder of every method that is not a DSV set or the whole split."""

from __future__ import annotations

import torch
from torch import Tensor

from dsv.baselines import SELECTOR_INPUTS, ProxyConfig, select
from dsv.data.core import per_class_indices
from dsv.dm import DMConfig, distribution_matching
from dsv.lam import topk_by_rank

# The set builders beyond the selectors, and what each needs beyond the labels (the images ``x`` are always given).
RANKED: dict[str, str] = {"lambda_topk": "lambda", "support_topk": "support"}
SET_INPUTS: dict[str, tuple[str, ...]] = {**SELECTOR_INPUTS, "dm": ("dm",), "lambda_topk": ("ranking",),
                                          "support_topk": ("ranking",)}


def build_set(
    method: str,
    *,
    x: Tensor,
    y: Tensor,
    k: int,
    num_classes: int,
    seed: int,
    features: Tensor | None = None,
    logits: Tensor | None = None,
    proxy: ProxyConfig | None = None,
    dm: DMConfig | None = None,
    ranking: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The training set (images, labels) of a set-building method at ``k`` images per class.

    Args:
        method: a selector of :data:`SELECTORS` (``k`` real images per class, :func:`select`); "dm" (Distribution
            Matching in its few-shot setting: the real pool is ``k`` images per class, the budget of a random draw,
            and the synthetic set starts from noise, since started from that pool DM's loss is exactly zero); or
            "lambda_topk" / "support_topk" (the ``k`` best-ranked images per class of a λ fit).
        x, y: the (normalised) training images and their labels.
        seed: seeds the selection, the DM pool, start and run.
        features, logits, proxy: a selector's inputs (:data:`SELECTOR_INPUTS`).
        dm: DM's settings ("dm").
        ranking: (index into ``x``, label, rank within the class: 0 = best) of the images λ was fitted on
            ("lambda_topk" by λ, "support_topk" by the support score).
    """
    if method == "dm":
        if dm is None:
            raise ValueError("build_set('dm') needs dm= (a DMConfig)")
        g = torch.Generator().manual_seed(seed)
        pool = per_class_indices(y, k, num_classes, g)
        start = torch.randn((pool.numel(), *x.shape[1:]), generator=g)
        res = distribution_matching(x[pool], y[pool], start, y[pool], dm, seed=seed)
        return res.x.detach().cpu(), res.y.cpu()
    if method in RANKED:
        if ranking is None:
            raise ValueError(f"build_set({method!r}) needs ranking= (index, label, rank of a λ fit)")
        index, label, rank = ranking
        idx = index[topk_by_rank(rank, label, k)]
    else:
        idx = select(method, y=y, k=k, num_classes=num_classes, seed=seed, features=features, logits=logits, x=x,
                     proxy=proxy)
    return x[idx], y[idx]
