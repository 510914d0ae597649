"""Independent measures of an image set: a judge classifier and a Fréchet distance in its feature space.

The judge is a classifier of another architecture and seed trained on the real training split, never the
teacher the images were made from (images optimised against one network can fool it without looking like
anything). No pretrained Inception weights are available offline, so the Fréchet distance is taken between
the judge's penultimate features (``embed``) of the set and of real images of the same classes, with the
same number of images of each class: the distance shrinks with more images, so only sets of equal size
and class mix are compared, and the distance between two disjoint real draws of that size is the floor
(:func:`judge_report` reports it beside every set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.train import predict_logits


@dataclass(frozen=True)
class JudgeScore:
    """How the judge sees one image set.

    Attributes:
        acc: fraction of images the judge assigns to their intended (hard) class.
        conf: mean judge probability of the intended class.
        frechet: Fréchet distance between the judge features of the set and of the reference images.
        n: images in the set.
    """

    acc: float
    conf: float
    frechet: float
    n: int


@torch.no_grad()
def features(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """The judge's penultimate features (``model.embed``), (N, F) float64 on the CPU."""
    return predict_logits(model, x, batch_size, embed=True).double()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between two feature sets (N, F), (M, F).

    Tr((Σ_a Σ_b)^½) is the sum of the square roots of the eigenvalues of Σ_a^½ Σ_b Σ_a^½ (symmetric PSD),
    computed in float64 with eigh, so no complex square roots or SciPy are needed.
    """
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(ca)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    mid = root_a @ cb @ root_a
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)


def judge_score(judge: nn.Module, x: Tensor, y: Tensor, reference: Tensor) -> JudgeScore:
    """Judge accuracy and confidence on the intended classes ``y`` ((N,) int or (N, C) soft: argmax), and the
    Fréchet distance to ``reference`` images (real images of the same classes, ideally the same count)."""
    hard = y.argmax(1) if y.dim() == 2 else y
    probs = F.softmax(predict_logits(judge, x), dim=1)
    conf = probs.gather(1, hard.view(-1, 1).long()).squeeze(1)
    return JudgeScore(
        acc=float((probs.argmax(1) == hard).float().mean()),
        conf=float(conf.mean()),
        frechet=frechet_distance(features(judge, x), features(judge, reference)),
        n=int(x.shape[0]),
    )


def matched_real(y: Tensor, real_y: Tensor, generator: torch.Generator, exclude: Tensor | None = None,
                 strict: bool = True) -> Tensor:
    """Indices into ``real_y`` with as many images of every class as the (hard) targets ``y`` have, drawn
    without replacement (and outside ``exclude``, a boolean mask), so a set and its reference match in size
    and class mix. ``strict=False`` takes what a class has when it has fewer (small test splits)."""
    hard = y.argmax(1) if y.dim() == 2 else y
    out = []
    for c, k in zip(*torch.unique(hard, return_counts=True)):
        pool = (real_y == c) if exclude is None else (real_y == c) & ~exclude
        members = pool.nonzero(as_tuple=True)[0]
        if members.numel() < int(k) and strict:
            raise ValueError(f"class {int(c)} has {members.numel()} real images, {int(k)} are needed for the reference")
        out.append(members[torch.randperm(members.numel(), generator=generator)[: int(k)]])
    return torch.cat(out)
