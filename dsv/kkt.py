"""DeepKKT losses (Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 6-9 and Algorithm 1).

Notation: Φ(x; θ*) is the frozen teacher, candidates (x_i, y_i) carry multipliers λ_i, and
L_i = CE(Φ(x_i; θ*), y_i). The KKT conditions of the training problem become losses:

* stationarity (Eq. 8): θ* = −Σ_i λ_i ∇_θ L_i, measured by a distance D over parameter entries;
* primal feasibility (Eq. 7): argmax_c Φ_c(x_i) = y_i, a gated cross-entropy;
* dual feasibility: λ_i ≥ 0 (handled by the optimiser in :mod:`dsv.extract`);
* manifold: the KKT terms again on augmented candidates A(x), plus TV and norm priors.

Σ_i λ_i ∇_θ L_i is computed as one weighted backward, ∇_θ(Σ_i λ_i L_i), with ``create_graph=True`` so
that the stationarity distance can be differentiated w.r.t. x and λ (a double backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dsv.augment import AugmentConfig, augment
from dsv.train import soft_cross_entropy

DISTANCES = ("l1", "l2")
PRIMALS = ("gated", "ungated")
PARAM_SUBSETS = ("all", "last")


@dataclass(frozen=True)
class KKTConfig:
    """Weights and variants of the DeepKKT objective (paper Eq. 9 / Algorithm 1).

    L_kkt = L_stat + β1·L_primal;  L_total = L_kkt(x) + η·L_kkt(A(x)) + β2·L_tv + β3·L_norm.

    Attributes:
        distance: D of Eq. 8. "l1" (default, paper text): mean over parameter entries of |θ* + Σλ∇L|;
            "l2" (Algorithm 1): mean of the squared entries.
        param_subset: parameters θ the stationarity condition is imposed on: "all" or "last" (final
            linear layer only; the paper inverts a model whose last layer was retrained).
        primal: "gated" (default, Eq. 7: zero loss for candidates already classified as their target)
            or "ungated" (plain cross-entropy, Algorithm 1).
        beta_primal: β1. Paper: 2e-3 (CIFAR-10 distillation), 2e-5 (ImageNet generation).
        beta_tv: β2, total-variation prior. Paper: 0 (CIFAR-10), 40 (ImageNet).
        beta_norm: β3, squared-norm prior. Paper: 0 (CIFAR-10), 1e-6 (ImageNet).
        eta: η, weight of the KKT terms on the augmented candidates. Paper: 5.
        augment: the augmentation A; paper: translate 0.125, crop 0.2, flip 0.5, noise (0.01 likely).
    """

    distance: str = "l1"
    param_subset: str = "all"
    primal: str = "gated"
    beta_primal: float = 2e-3
    beta_tv: float = 0.0
    beta_norm: float = 0.0
    eta: float = 5.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for key, val, allowed in (
            ("distance", self.distance, DISTANCES),
            ("primal", self.primal, PRIMALS),
            ("param_subset", self.param_subset, PARAM_SUBSETS),
        ):
            if val not in allowed:
                raise ValueError(f"kkt.{key} = {val!r} is not one of {', '.join(allowed)}")
        for key in ("beta_primal", "beta_tv", "beta_norm", "eta"):
            if getattr(self, key) < 0:
                raise ValueError(f"kkt.{key} must be >= 0, got {getattr(self, key)}")


def stationarity_params(model: nn.Module, subset: str = "all") -> list[nn.Parameter]:
    """The parameters θ the stationarity condition is imposed on ("all" or "last" = classifier layer)."""
    named = list(model.named_parameters())
    if subset == "last":
        chosen = [p for n, p in named if n.startswith("classifier.")]
        if not chosen:
            raise ValueError("param_subset='last' needs a model with a `classifier` layer")
        return chosen
    return [p for _, p in named]


def weighted_grad_sum(
    model: nn.Module, params: list[nn.Parameter], losses: Tensor, lam: Tensor, create_graph: bool
) -> list[Tensor]:
    """Σ_i λ_i ∇_θ L_i as one weighted backward: ∇_θ (Σ_i λ_i L_i).

    Args:
        model: the teacher (unused except for documentation of where ``losses`` came from).
        params: θ, the parameters to differentiate.
        losses: (K,) per-candidate losses L_i, in the graph of ``params``.
        lam: (K,) multipliers λ_i.
        create_graph: keep the graph so the result can be differentiated again (w.r.t. x and λ).

    Returns:
        One tensor per parameter, shaped like it.
    """
    del model
    return list(torch.autograd.grad((lam * losses).sum(), params, create_graph=create_graph))


def stationarity_distance(theta: list[Tensor], grad_sum: list[Tensor], distance: str = "l1") -> Tensor:
    """D(θ*, −Σλ∇L) of Eq. 8, averaged over all parameter entries.

    The residual is r = θ* + Σ_i λ_i ∇_θ L_i; "l1" returns mean |r|, "l2" returns mean r².
    """
    total = sum(t.numel() for t in theta)
    acc = theta[0].new_zeros(())
    for t, s in zip(theta, grad_sum):
        r = t.detach() + s
        acc = acc + (r.abs().sum() if distance == "l1" else (r * r).sum())
    return acc / total


def stationarity_loss(
    model: nn.Module, x: Tensor, y: Tensor, lam: Tensor, distance: str = "l1", subset: str = "all"
) -> Tensor:
    """L_stat (Eq. 8) for candidates x with targets y and multipliers λ, differentiable in x and λ.

    Args:
        model: frozen teacher in eval mode.
        x: (K, C, H, W) candidates.
        y: (K,) int or (K, C) soft targets.
        lam: (K,) multipliers.
        distance: "l1" or "l2".
        subset: "all" or "last".
    """
    params = stationarity_params(model, subset)
    losses = soft_cross_entropy(model(x), y)
    return stationarity_distance(params, weighted_grad_sum(model, params, losses, lam, True), distance)


def target_classes(y: Tensor) -> Tensor:
    """Hard class of each target: y itself for (K,) labels, argmax for (K, C) soft labels."""
    return y if y.dim() == 1 else y.argmax(dim=1)


def primal_loss(logits: Tensor, y: Tensor, gated: bool = True) -> Tensor:
    """L_primal of Eq. 7: (1/n) Σ_i L_i, with L_i = 0 when candidate i is already classified as y_i.

    Args:
        logits: (K, C) teacher logits.
        y: (K,) int or (K, C) soft targets (the gate uses the soft target's argmax).
        gated: apply the hinge-like gate (default, Eq. 7); False gives plain CE (Algorithm 1).

    Returns:
        Scalar loss.
    """
    ce = soft_cross_entropy(logits, y)
    if gated:
        wrong = (logits.argmax(dim=1) != target_classes(y)).to(ce.dtype)
        ce = ce * wrong
    return ce.mean()


def tv_loss(x: Tensor) -> Tensor:
    """Anisotropic total variation: mean |x[h+1]-x[h]| + mean |x[w+1]-x[w]| over (K, C, H, W)."""
    if x.dim() != 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def norm_loss(x: Tensor) -> Tensor:
    """Squared l2 norm prior: mean over candidates of ‖x_i‖²."""
    return x.flatten(1).pow(2).sum(dim=1).mean()


@dataclass(frozen=True)
class KKTTerms:
    """Values of the objective's terms at one step (detached scalars and logits)."""

    total: Tensor
    stat: Tensor
    primal: Tensor
    stat_aug: Tensor
    primal_aug: Tensor
    tv: Tensor
    norm: Tensor
    logits: Tensor  # (K, C) on the un-augmented candidates


def kkt_objective(
    model: nn.Module,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    lam: Tensor,
    cfg: KKTConfig,
    generator: torch.Generator,
) -> tuple[Tensor, KKTTerms]:
    """L_total = L_kkt(x) + η·L_kkt(A(x)) + β2·L_tv(x) + β3·L_norm(x) (Algorithm 1), with graph.

    Args:
        model: frozen teacher (eval mode).
        params: θ from :func:`stationarity_params`.
        x: (K, ...) candidates (requires grad).
        y: (K,) or (K, C) targets.
        lam: (K,) multipliers (requires grad).
        cfg: weights and variants.
        generator: draws the one random augmentation of this step.

    Returns:
        (differentiable total, detached :class:`KKTTerms`).
    """
    gated = cfg.primal == "gated"

    def kkt(inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = model(inputs)  # (K, C)
        losses = soft_cross_entropy(logits, y)  # (K,)
        s = weighted_grad_sum(model, params, losses, lam, create_graph=True)
        stat = stationarity_distance(params, s, cfg.distance)
        return stat, primal_loss(logits, y, gated), logits

    stat, primal, logits = kkt(x)
    total = stat + cfg.beta_primal * primal
    zero = x.new_zeros(())
    stat_a = primal_a = zero
    if cfg.eta > 0 and x.dim() == 4:
        stat_a, primal_a, _ = kkt(augment(x, cfg.augment, generator))
        total = total + cfg.eta * (stat_a + cfg.beta_primal * primal_a)
    tv = tv_loss(x) if cfg.beta_tv > 0 else zero
    nrm = norm_loss(x) if cfg.beta_norm > 0 else zero
    total = total + cfg.beta_tv * tv + cfg.beta_norm * nrm
    terms = KKTTerms(
        total=total.detach(), stat=stat.detach(), primal=primal.detach(), stat_aug=stat_a.detach(),
        primal_aug=primal_a.detach(), tv=tv.detach(), norm=nrm.detach(), logits=logits.detach(),
    )
    return total, terms


def stationarity_residual(
    model: nn.Module, x: Tensor, y: Tensor, lam: Tensor, distance: str = "l1", subset: str = "all"
) -> tuple[float, float]:
    """Stationarity residual and the same relative to its value at λ = 0 (which is D(θ*, 0) = mean|θ*|).

    A relative residual near 1 means the candidates' gradients explain almost none of θ*: the
    stationarity term has not found support vectors, whatever else the run reports.

    Returns:
        (D(θ*, −Σλ∇L), D(θ*, −Σλ∇L) / D(θ*, 0)).
    """
    params = stationarity_params(model, subset)
    losses = soft_cross_entropy(model(x), y)
    s = weighted_grad_sum(model, params, losses, lam, create_graph=False)
    d = float(stationarity_distance(params, s, distance))
    d0 = float(stationarity_distance(params, [torch.zeros_like(p) for p in params], distance))
    return d, d / max(d0, 1e-30)
