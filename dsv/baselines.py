"""Core-set baselines: pick ``k`` real training images per class (DeepCore's family).

Every selector returns (C * k,) int64 indices into the training set, grouped by class (class 0 first),
exactly ``k`` per class, in the selector's own order within a class (greedy order for herding and
k-center, most-to-least important for the scored methods). All randomness comes from an explicit
``torch.Generator``; the same seed gives the same indices.

Inputs by family:

* ``random``: labels only.
* ``herding``, ``kcenter``: features (N, D), e.g. the teacher's ``embed()`` of the training set.
* ``kkt_herding``: features and logits of the teacher (herding after a KKT support filter).
* ``forgetting``, ``el2n``: the normalised images (N, ...) and a :class:`ProxyConfig`; they train their
  own small proxy model(s) with :func:`dsv.train.fit`.
* ``entropy``, ``least_confidence``, ``margin``: logits (N, C) of a trained model (e.g. the teacher).

Use :func:`select` (or the :data:`SELECTORS` registry) to call any of them by name; :func:`dsv.sets.build_set`
builds the training set of any set-building method (these, DM, the top-k of a λ ranking).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv.checks import at_least, one_of
from dsv.models import ModelConfig, build_seeded
from dsv.train import FitConfig, TrainEvent, fit, predict_logits


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy model trained by the training-dynamics selectors (forgetting events, EL2N).

    Attributes:
        model: proxy architecture (DeepCore uses the evaluation network; the default is a ConvNet-3 of
            width 64, much cheaper than width 128 on a CPU).
        fit: optimizer, batch size and augmentation of the proxy training. ``fit.epochs`` (or
            ``fit.steps``) is the forgetting run's length.
        el2n_models: number of independently initialised proxies whose EL2N scores are averaged
            (Paul et al. average 10).
        el2n_epochs: epochs each EL2N proxy trains before scoring ("early in training"; Paul et al.
            score at ~10% of training).
    """

    model: ModelConfig = ModelConfig(name="convnet", width=64)
    fit: FitConfig = field(
        default_factory=lambda: FitConfig(
            optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=10, batch_size=256,
            augment="flip_crop",
        )
    )
    el2n_models: int = 4
    el2n_epochs: int = 2

    def __post_init__(self) -> None:
        at_least(self, 1, "el2n_models", "el2n_epochs")


def _class_members(y: Tensor, k: int, num_classes: int) -> list[Tensor]:
    """(n_c,) indices of each class, checking that every class has at least ``k`` samples."""
    if k < 1:
        raise ValueError(f"k (images per class) must be >= 1, got {k}")
    if y.dim() != 1:
        raise ValueError(f"y must be (N,) integer labels, got shape {tuple(y.shape)}")
    y = y.cpu()
    out = []
    for c in range(num_classes):
        idx = (y == c).nonzero(as_tuple=True)[0]
        if idx.numel() < k:
            raise ValueError(f"class {c} has only {idx.numel()} samples, fewer than the k={k} per class asked for")
        out.append(idx)
    return out


def _check_rows(name: str, t: Tensor, n: int) -> None:
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} rows but y has {n} labels")


def _top_scores(score: Tensor, y: Tensor, k: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """The ``k`` highest-scoring samples of each class, ties broken by a seeded random order.

    Args:
        score: (N,) importance scores (higher = picked first).
        y: (N,) labels.
        k: samples per class.
        num_classes: C.
        generator: breaks ties.

    Returns:
        (C * k,) int64 indices, class 0 first, descending score within a class.
    """
    score = score.detach().cpu().double()
    _check_rows("score", score, y.shape[0])
    out = []
    for idx in _class_members(y, k, num_classes):
        shuffled = idx[torch.randperm(idx.numel(), generator=generator)]
        # Stable sort of a random permutation: equal scores keep the seeded random order.
        order = torch.sort(score[shuffled], descending=True, stable=True).indices
        out.append(shuffled[order[:k]])
    return torch.cat(out).long()


def random_select(y: Tensor, k: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """``k`` uniformly random samples of each class. Returns (C * k,) int64 indices."""
    return torch.cat(
        [idx[torch.randperm(idx.numel(), generator=generator)[:k]] for idx in _class_members(y, k, num_classes)]
    ).long()


def herding(features: Tensor, y: Tensor, k: int, num_classes: int) -> Tensor:
    """Greedy feature-mean matching per class (Welling 2009; iCaRL / DeepCore's herding).

    Within class c with features φ_i and mean μ_c, step t picks the unchosen i minimising
    ‖μ_c − (Σ_{j∈S} φ_j + φ_i) / (|S| + 1)‖₂, so the running mean of the chosen features tracks μ_c.
    Deterministic (ties go to the lowest index); features are used as given (normalise them first if
    the feature scale should not matter).

    Args:
        features: (N, D) features of the training set.
        y: (N,) labels.
        k: samples per class.
        num_classes: C.

    Returns:
        (C * k,) int64 indices, class 0 first, in greedy order within a class.
    """
    _check_rows("features", features, y.shape[0])
    feats = features.detach().flatten(1).double()
    out = []
    for idx in _class_members(y, k, num_classes):
        f = feats[idx.to(feats.device)]  # (n_c, D)
        mu = f.mean(dim=0)  # (D,)
        taken = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
        running = torch.zeros_like(mu)  # Σ of chosen features
        picks = []
        for t in range(k):
            dist = (mu - (running + f) / (t + 1)).norm(dim=1)  # (n_c,) candidate running-mean errors
            dist[taken] = float("inf")
            i = int(torch.argmin(dist))
            taken[i] = True
            running += f[i]
            picks.append(i)
        out.append(idx[torch.tensor(picks, dtype=torch.long)])
    return torch.cat(out).long()


def uniform_support(features: Tensor, logits: Tensor, y: Tensor) -> Tensor:
    """Each sample's support score at a KKT point of the final layer, up to the common factor λ.

    At a stationary point of mean CE + (ω/2)‖θ‖² every λ_i equals 1/(nω) (uniform), so the support score
    λ_i·‖∇_θ L_i‖ over the final layer (W, b) is proportional to ‖∇_{W,b} L_i‖ = ‖p_i − e_{y_i}‖₂·‖(h_i, 1)‖₂,
    with h_i the layer's input (``features``) and p_i the softmax of ``logits``. Large = a high-loss sample far
    out in feature space (what EL2N ranks first).

    Returns:
        (N,) float64 scores.
    """
    _check_rows("features", features, y.shape[0])
    _check_rows("logits", logits, y.shape[0])
    p = logits.detach().cpu().double().softmax(dim=1)
    err = (p - F.one_hot(y.cpu().long(), p.shape[1]).double()).norm(dim=1)
    h = features.detach().cpu().double().flatten(1)
    return err * (h.pow(2).sum(dim=1) + 1.0).sqrt()


KKT_FILTER = 0.2


def kkt_herding(features: Tensor, logits: Tensor, y: Tensor, k: int, num_classes: int, drop: float = KKT_FILTER
                ) -> Tensor:
    """Herding among the samples that support the teacher least: a KKT-filtered core-set.

    Within each class the fraction ``drop`` of samples with the largest support score
    (:func:`uniform_support`: the highest-loss, least typical samples, which a student trained from scratch
    on a handful of images learns least from) is set aside, then :func:`herding` picks ``k`` from the rest,
    matching the mean feature of the rest. ``drop = 0`` is herding.

    Returns:
        (C * k,) int64 indices, class 0 first, in greedy order within a class.
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    support = uniform_support(features, logits, y)
    keep = torch.zeros(y.shape[0], dtype=torch.bool)
    for idx in _class_members(y, k, num_classes):
        n_keep = max(k, idx.numel() - int(drop * idx.numel()))
        keep[idx[support[idx].argsort(stable=True)[:n_keep]]] = True
    kept = keep.nonzero(as_tuple=True)[0]
    return kept[herding(features[kept.to(features.device)], y.cpu()[kept], k, num_classes)]


def kcenter_greedy(features: Tensor, y: Tensor, k: int, num_classes: int) -> Tensor:
    """k-center greedy per class in feature space (Sener & Savarese 2018).

    The first center is the sample closest to the class mean (deterministic, so k = 1 gives the most
    typical sample rather than a random one); each next center is the sample farthest from its nearest
    chosen center (ties go to the lowest index).

    Args:
        features: (N, D) features of the training set.
        y: (N,) labels.
        k: samples per class.
        num_classes: C.

    Returns:
        (C * k,) int64 indices, class 0 first, in greedy order within a class.
    """
    _check_rows("features", features, y.shape[0])
    feats = features.detach().flatten(1).double()
    out = []
    for idx in _class_members(y, k, num_classes):
        f = feats[idx.to(feats.device)]  # (n_c, D)
        first = int(torch.argmin((f - f.mean(dim=0)).norm(dim=1)))
        picks = [first]
        nearest = (f - f[first]).norm(dim=1)  # (n_c,) distance to the nearest chosen center
        for _ in range(k - 1):
            i = int(torch.argmax(nearest))
            picks.append(i)
            nearest = torch.minimum(nearest, (f - f[i]).norm(dim=1))
        out.append(idx[torch.tensor(picks, dtype=torch.long)])
    return torch.cat(out).long()


def _proxy_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def forgetting_scores(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    proxy: ProxyConfig,
    generator: torch.Generator,
    callback: Callable[[TrainEvent], None] | None = None,
) -> Tensor:
    """Forgetting-event counts (Toneva et al. 2019) of every training sample.

    A proxy model trains on (x, y) for ``proxy.fit``'s budget; at each of its progress reports (every
    epoch, or every 1/10 of the steps) the whole un-augmented set is classified, and a forgetting event
    is a correct → incorrect transition between consecutive reports. Samples never classified correctly
    get the largest score (number of reports + 1), as in Toneva et al. (evaluating the whole set per
    epoch rather than each sample when its minibatch is seen is a simplification).

    Args:
        x: (N, ...) normalised inputs.
        y: (N,) labels.
        num_classes: C.
        proxy: proxy architecture and training budget.
        generator: seeds the proxy's initialisation and batch order.
        callback: forwarded to :func:`dsv.train.fit`.

    Returns:
        (N,) float64 scores (higher = more forgotten).
    """
    _check_rows("x", x, y.shape[0])
    seed = _proxy_seed(generator)
    model = build_seeded(proxy.model, tuple(x.shape[1:]), num_classes, seed)
    y_cpu = y.cpu()
    history: list[Tensor] = []

    def record(event: TrainEvent) -> None:
        history.append(predict_logits(model, x).argmax(dim=1) == y_cpu)  # (N,) correct at this report
        if callback is not None:
            callback(event)

    fit(model, x, y, proxy.fit, seed=seed, callback=record)
    return forgetting_counts(torch.stack(history))


def forgetting_counts(correct: Tensor) -> Tensor:
    """Count forgetting events from a record of per-sample correctness.

    Args:
        correct: (R, N) bool, whether sample n was classified correctly at report r.

    Returns:
        (N,) float64: number of r with correct[r-1, n] and not correct[r, n]; samples never correct get
        R + 1, more than any sample that was learned can reach.
    """
    correct = correct.bool()
    forgets = (correct[:-1] & ~correct[1:]).sum(dim=0).double()  # (N,)
    forgets[~correct.any(dim=0)] = correct.shape[0] + 1.0
    return forgets


def el2n_scores(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    proxy: ProxyConfig,
    generator: torch.Generator,
    callback: Callable[[TrainEvent], None] | None = None,
) -> Tensor:
    """EL2N scores (Paul et al. 2021): E_models ‖softmax(f(x)) − onehot(y)‖₂ early in training.

    Args:
        x: (N, ...) normalised inputs.
        y: (N,) labels.
        num_classes: C.
        proxy: ``proxy.el2n_models`` proxies each trained ``proxy.el2n_epochs`` epochs.
        generator: seeds each proxy's initialisation and batch order.
        callback: forwarded to :func:`dsv.train.fit`.

    Returns:
        (N,) float64 scores (higher = harder).
    """
    _check_rows("x", x, y.shape[0])
    onehot = F.one_hot(y.cpu().long(), num_classes).double()  # (N, C)
    fit_cfg = replace(proxy.fit, epochs=proxy.el2n_epochs, steps=0)
    total = torch.zeros(y.shape[0], dtype=torch.float64)
    for _ in range(proxy.el2n_models):
        seed = _proxy_seed(generator)
        model = build_seeded(proxy.model, tuple(x.shape[1:]), num_classes, seed)
        fit(model, x, y, fit_cfg, seed=seed, callback=callback)
        probs = predict_logits(model, x).double().softmax(dim=1)  # (N, C)
        total += (probs - onehot).norm(dim=1)
    return total / proxy.el2n_models


UNCERTAINTIES = ("entropy", "least_confidence", "margin")


def uncertainty_scores(logits: Tensor, kind: str) -> Tensor:
    """Uncertainty of a trained model's predictions (DeepCore's uncertainty family).

    Args:
        logits: (N, C) logits.
        kind: "entropy" (−Σ p log p), "least_confidence" (1 − max p) or "margin"
            (−(p_top1 − p_top2), so a small margin scores high).

    Returns:
        (N,) float64 scores (higher = more uncertain).
    """
    if kind not in UNCERTAINTIES:
        raise ValueError(f"uncertainty kind = {kind!r} is not one of {', '.join(UNCERTAINTIES)}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {tuple(logits.shape)}")
    logp = logits.detach().cpu().double().log_softmax(dim=1)
    p = logp.exp()
    if kind == "entropy":
        return -(p * logp).sum(dim=1)
    if kind == "least_confidence":
        return 1.0 - p.max(dim=1).values
    top2 = p.topk(2, dim=1).values
    return -(top2[:, 0] - top2[:, 1])


Selector = Callable[..., Tensor]


# What each input of select() is, for the message when a selector lacks one.
_INPUT_HELP = {
    "features": "(N, D) features, e.g. the teacher's embed() of the training set",
    "logits": "(N, C) logits of a trained model, e.g. the teacher",
    "x": "(N, ...) normalised training images for the proxy model",
}


def _by_score(score: Callable[..., Tensor]) -> Selector:
    """A selector that takes each class's ``k`` highest scores (ties in a seeded random order), checking the
    class sizes before scoring (a proxy model's training is not wasted on a class that is too small)."""
    def run(*, y: Tensor, k: int, num_classes: int, generator: torch.Generator, **inputs: Any) -> Tensor:
        _class_members(y, k, num_classes)
        return _top_scores(score(y=y, num_classes=num_classes, generator=generator, **inputs), y, k, num_classes,
                           generator)

    return run


def _uncertainty(kind: str) -> Callable[..., Tensor]:
    def score(*, y: Tensor, logits: Tensor, **_: Any) -> Tensor:
        _check_rows("logits", logits, y.shape[0])
        return uncertainty_scores(logits, kind)

    return score


def _dynamics(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def score(*, y: Tensor, num_classes: int, generator: torch.Generator, x: Tensor, proxy: ProxyConfig | None = None,
              callback: Callable[[TrainEvent], None] | None = None, **_: Any) -> Tensor:
        return fn(x, y, num_classes, proxy or ProxyConfig(), generator, callback)

    return score


# Every selector by name, called with keywords: y, k, num_classes, generator and the inputs it needs (below).
SELECTORS: dict[str, Selector] = {
    "random": lambda *, y, k, num_classes, generator, **_: random_select(y, k, num_classes, generator),
    "herding": lambda *, y, k, num_classes, features, **_: herding(features, y, k, num_classes),
    "kcenter": lambda *, y, k, num_classes, features, **_: kcenter_greedy(features, y, k, num_classes),
    "kkt_herding": lambda *, y, k, num_classes, features, logits, **_: kkt_herding(features, logits, y, k,
                                                                                    num_classes),
    "forgetting": _by_score(_dynamics(forgetting_scores)),
    "el2n": _by_score(_dynamics(el2n_scores)),
    **{kind: _by_score(_uncertainty(kind)) for kind in UNCERTAINTIES},
}
# The inputs of select() beyond the labels that each selector needs: the one place that knows, so a caller can
# compute only those (``tasks.distill`` does, lazily).
SELECTOR_INPUTS: dict[str, tuple[str, ...]] = {
    "random": (), "herding": ("features",), "kcenter": ("features",), "kkt_herding": ("features", "logits"),
    "forgetting": ("x",), "el2n": ("x",),
    "entropy": ("logits",), "least_confidence": ("logits",), "margin": ("logits",),
}
assert set(SELECTOR_INPUTS) == set(SELECTORS)


def select(
    method: str,
    *,
    y: Tensor,
    k: int,
    num_classes: int,
    seed: int,
    features: Tensor | None = None,
    logits: Tensor | None = None,
    x: Tensor | None = None,
    proxy: ProxyConfig | None = None,
    callback: Callable[[TrainEvent], None] | None = None,
) -> Tensor:
    """Select ``k`` training samples per class with a named core-set method.

    Args:
        method: a key of :data:`SELECTORS`.
        y: (N,) int labels of the training set.
        k: samples per class (the IPC).
        num_classes: C.
        seed: seeds the generator (random choice, tie-breaking, proxy training).
        features: (N, D) features; needed by "herding" and "kcenter".
        logits: (N, C) logits of a trained model; needed by "entropy", "least_confidence", "margin".
        x: (N, ...) normalised training inputs; needed by "forgetting" and "el2n".
        proxy: proxy model and budget for "forgetting" and "el2n" (default :class:`ProxyConfig`).
        callback: progress of the proxy training ("forgetting", "el2n").

    Returns:
        (C * k,) int64 indices on the CPU, class 0 first, exactly ``k`` per class.

    Raises:
        ValueError: unknown method, a missing input, or a class with fewer than ``k`` samples.
    """
    one_of("selector method", method, tuple(SELECTORS))
    given = {"features": features, "logits": logits, "x": x}
    for name in SELECTOR_INPUTS[method]:
        if given[name] is None:
            raise ValueError(f"selector {method!r} needs {name}= ({_INPUT_HELP[name]})")
    g = torch.Generator().manual_seed(seed)
    return SELECTORS[method](
        y=y.cpu(), k=k, num_classes=num_classes, generator=g, features=features, logits=logits, x=x,
        proxy=proxy, callback=callback,
    )
