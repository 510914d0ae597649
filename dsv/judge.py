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
        intra_class_cos: :func:`intra_class_cosine` of the set's judge features (1.0 = each class is copies of one
            image). ReLU features lie in the positive orthant, so real images score high too: compare with
            ``real_intra_class_cos``.
        real_intra_class_cos: the same for the reference (real images, same classes and counts).
        collapse: the within-class cosine of the set's judge features around the reference's mean feature of
            each class: about 0 for real images (they spread around their class mean), 1 for copies of one image;
            high when a class's images share one direction away from the real class, i.e. one mode.
    """

    acc: float
    conf: float
    frechet: float
    n: int
    intra_class_cos: float = float("nan")
    real_intra_class_cos: float = float("nan")
    collapse: float = float("nan")


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


def intra_class_cosine(feats: Tensor, y: Tensor, center: Tensor | None = None) -> float:
    """Diversity of a set: the mean pairwise cosine similarity of its features within a class, averaged over
    the classes with at least two members. 1.0 for a class made of copies.

    Args:
        feats: (N, F) features (e.g. the judge's, :func:`features`).
        y: (N,) int or (N, C) soft labels (argmax).
        center: subtracted from the features first: (F,) for all, or (N, F) one per image (e.g. the real mean
            of each image's class: then real images score about 0 and copies of one image still 1).

    Returns:
        The mean within-class cosine (NaN when no class has two members).
    """
    hard = y.argmax(1) if y.dim() == 2 else y
    f = feats.double() - (0.0 if center is None else center.double())  # center: (F,) or (N, F)
    f = F.normalize(f, dim=1)
    per_class = []
    for c in hard.unique():
        fc = f[hard == c]
        m = fc.shape[0]
        if m < 2:
            continue
        gram = fc @ fc.T
        per_class.append(float((gram.sum() - gram.diagonal().sum()) / (m * (m - 1))))
    return sum(per_class) / len(per_class) if per_class else float("nan")


def nearest(x: Tensor, pool: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """For each image of ``x`` (N, ...), the Euclidean distance to its nearest image in ``pool`` (M, ...) and that
    image's index, ((N,), (N,)).

    Two uses: a memorisation check (a synthetic image much closer to a training image than real test images are
    is a copy of it) and a judge of another family than the teacher: the label of the nearest training image
    in pixel space (1-NN) shares none of a ConvNet's blind spots, so images that only fool ConvNets score low.
    """
    a = x.flatten(1).double()
    best = torch.full((a.shape[0],), float("inf"), dtype=torch.float64)
    where = torch.zeros(a.shape[0], dtype=torch.long)
    for i in range(0, pool.shape[0], chunk):
        b = pool[i : i + chunk].flatten(1).double()
        d, j = torch.cdist(a, b).min(dim=1)
        closer = d < best
        best = torch.where(closer, d, best)
        where = torch.where(closer, j + i, where)
    return best, where


def judge_score(judge: nn.Module, x: Tensor, y: Tensor, reference: Tensor) -> JudgeScore:
    """Judge accuracy and confidence on the intended classes ``y`` ((N,) int or (N, C) soft: argmax), and the
    Fréchet distance to ``reference`` images (real images of the same classes, ideally the same count)."""
    hard = y.argmax(1) if y.dim() == 2 else y
    probs = F.softmax(predict_logits(judge, x), dim=1)
    conf = probs.gather(1, hard.view(-1, 1).long()).squeeze(1)
    fx, fr = features(judge, x), features(judge, reference)
    ref_y = _reference_labels(hard)
    class_mean = {int(c): fr[ref_y == c].mean(0) for c in ref_y.unique()}
    centers = torch.stack([class_mean[int(c)] for c in hard]) if len(class_mean) else None
    return JudgeScore(
        acc=float((probs.argmax(1) == hard).float().mean()),
        conf=float(conf.mean()),
        frechet=frechet_distance(fx, fr),
        n=int(x.shape[0]),
        intra_class_cos=intra_class_cosine(fx, hard),
        real_intra_class_cos=intra_class_cosine(fr, ref_y),
        collapse=intra_class_cosine(fx, hard, centers),
    )


def _reference_labels(hard: Tensor) -> Tensor:
    """The labels of a :func:`matched_real` reference drawn for targets ``hard``: class by class, ascending."""
    classes, counts = torch.unique(hard, return_counts=True)
    return classes.repeat_interleave(counts)


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
