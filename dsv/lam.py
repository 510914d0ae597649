"""λ fitting on real data: core-set selection by Lagrange multipliers (paper §5.2).

The inputs are fixed to real training images, so each per-sample gradient g_i = ∇_θ L_i is a constant
and the stationarity problem becomes convex in λ:

    min_{λ ≥ 0}  D(θ*, −G^T λ),   G = [g_1; …; g_m]  (m × P).

Large datasets are split into stratified random batches of equal size m. Each batch is an unbiased
subsample of the training set, so it is a complete stationarity problem of its own: for a teacher
trained with weight decay ω on n samples, θ* = −(1/(nω)) Σ_i g_i ≈ −(1/(mω)) Σ_{i∈batch} g_i. A batch's
λ is therefore n/m times the full-data λ, and we report λ·m/n: the same scale for every batch, so λ
is comparable across batches and ranks are taken over the whole class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dsv.kkt import DISTANCES, PARAM_SUBSETS, stationarity_params
from dsv.train import soft_cross_entropy


@dataclass(frozen=True)
class LambdaConfig:
    """Settings of λ fitting on real data.

    Attributes:
        batch_size: samples per stationarity problem (stratified); the per-sample gradient matrix of one
            batch (batch_size × P floats) must fit in memory.
        steps: Adam steps on λ per batch.
        lr: Adam learning rate, relative to the λ scale (λ = s·u, u initialised to 1).
        distance: "l1" (paper default) or "l2".
        param_subset: "all" or "last" (use "last" for large models: P is then the classifier's size).
        chunk: samples per vectorised per-sample-gradient call (bounds peak memory).
        max_bytes: refuse batches whose gradient matrix exceeds this many bytes (a clear error, not OOM).
    """

    batch_size: int = 1000
    steps: int = 300
    lr: float = 0.05
    distance: str = "l1"
    param_subset: str = "all"
    chunk: int = 128
    max_bytes: int = 4 * 1024**3

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"coreset.batch_size must be >= 2, got {self.batch_size}")
        if self.steps < 1:
            raise ValueError(f"coreset.steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"coreset.lr must be > 0, got {self.lr}")
        if self.distance not in DISTANCES:
            raise ValueError(f"coreset.distance = {self.distance!r} is not one of {', '.join(DISTANCES)}")
        if self.param_subset not in PARAM_SUBSETS:
            raise ValueError(
                f"coreset.param_subset = {self.param_subset!r} is not one of {', '.join(PARAM_SUBSETS)}"
            )
        if self.chunk < 1:
            raise ValueError(f"coreset.chunk must be >= 1, got {self.chunk}")


@dataclass
class LambdaResult:
    """λ per real sample and its rank within the sample's class (0 = highest λ)."""

    lam: Tensor  # (N,)
    rank: Tensor  # (N,) int64
    labels: Tensor  # (N,) int64
    residual_rel: list[float] = field(default_factory=list)  # per batch, at the end (1.0 = λ explains nothing)

    def topk(self, k: int) -> Tensor:
        """Indices of the k highest-λ samples of every class, class 0 first, (C·k,)."""
        out = []
        for c in self.labels.unique().tolist():
            members = (self.labels == c).nonzero(as_tuple=True)[0]
            if members.numel() < k:
                raise ValueError(f"class {c} has only {members.numel()} samples, fewer than k={k}")
            out.append(members[self.rank[members].argsort()[:k]])
        return torch.cat(out)


@dataclass(frozen=True)
class LambdaEvent:
    """Progress of :func:`fit_lambdas`: one per finished batch."""

    batch: int
    total_batches: int
    residual_rel: float


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor, subset: str = "all", chunk: int = 128) -> Tensor:
    """G = [∇_θ L_i]_i as an (N, P) matrix, via torch.func (vmap of grad).

    Args:
        model: classifier in eval mode.
        x: (N, ...) inputs.
        y: (N,) labels.
        subset: "all" or "last" parameters.
        chunk: samples per vmap call.
    """
    chosen = {id(p) for p in stationarity_params(model, subset)}
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    params = {n: p.detach() for n, p in model.named_parameters() if id(p) in chosen}
    rest = {n: p.detach() for n, p in model.named_parameters() if id(p) not in chosen}
    buffers = dict(model.named_buffers())

    def loss_one(ps: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**ps, **rest, **buffers}, (xi.unsqueeze(0),))
        return soft_cross_entropy(out, yi.unsqueeze(0)).squeeze(0)

    g_fn = vmap(grad(loss_one), in_dims=(None, 0, 0))
    rows = []
    for i in range(0, x.shape[0], chunk):
        gs = g_fn(params, x[i : i + chunk], y[i : i + chunk])
        rows.append(torch.cat([gs[n].flatten(1) for n in names], dim=1))
    return torch.cat(rows)


def solve_lambdas(
    g: Tensor, theta: Tensor, distance: str = "l1", steps: int = 300, lr: float = 0.05
) -> tuple[Tensor, float]:
    """Projected Adam on min_{λ≥0} D(θ, −G^T λ) for a fixed gradient matrix.

    Args:
        g: (m, P) per-sample gradients.
        theta: (P,) flattened θ*.
        distance: "l1" (mean |r|) or "l2" (mean r²), r = θ + G^T λ.
        steps, lr: Adam budget; lr is relative to the best uniform λ.

    Returns:
        (λ (m,), relative residual D(θ, −G^Tλ)/D(θ, 0)).
    """
    s = g.sum(0)
    c = float(-(theta @ s) / (s @ s).clamp_min(1e-30))
    scale = c if c > 0 else 1.0 / g.shape[0]
    u = torch.ones(g.shape[0], dtype=g.dtype, device=g.device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)

    def dist(lam: Tensor) -> Tensor:
        r = theta + g.t() @ lam
        return r.abs().mean() if distance == "l1" else (r * r).mean()

    for _ in range(steps):
        loss = dist(scale * u)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            u.clamp_(min=0.0)
    with torch.no_grad():
        lam = scale * u.detach()
        d0 = theta.abs().mean() if distance == "l1" else (theta * theta).mean()
        return lam, float(dist(lam) / d0.clamp_min(1e-30))


def fit_lambdas(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: LambdaConfig,
    seed: int = 0,
    callback: Callable[[LambdaEvent], None] | None = None,
) -> LambdaResult:
    """Learn λ for fixed real images under the stationarity loss and rank them within each class.

    Args:
        teacher: trained classifier (frozen; put in eval mode for the duration).
        x: (N, ...) normalised real training images.
        y: (N,) labels.
        cfg: batch size, steps, distance.
        seed: fixes the stratified batch split.
        callback: one :class:`LambdaEvent` per batch.

    Returns:
        :class:`LambdaResult` with λ on the full-data scale (see module docstring).
    """
    n = x.shape[0]
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    params = stationarity_params(teacher, cfg.param_subset)
    p_total = sum(p.numel() for p in params)
    m = min(cfg.batch_size, n)
    if m * p_total * 4 > cfg.max_bytes:
        raise MemoryError(
            f"coreset: a batch of {m} samples needs {m * p_total * 4 / 1e9:.1f} GB of per-sample gradients "
            f"(P={p_total}) > max_bytes={cfg.max_bytes / 1e9:.1f} GB; lower coreset.batch_size or set "
            f"coreset.param_subset: last"
        )
    theta = torch.cat([p.detach().flatten() for p in params]).to(device)
    g = torch.Generator().manual_seed(seed)
    # Stratified split: shuffle within each class, then deal samples round-robin into batches.
    order = _stratified_order(y, g)
    n_batches = max(1, round(n / m))
    batches = [order[b::n_batches] for b in range(n_batches)]
    lam = torch.zeros(n)
    residuals = []
    try:
        for b, idx in enumerate(batches):
            gm = per_sample_grads(teacher, x[idx].to(device), y[idx].to(device), cfg.param_subset, cfg.chunk)
            lam_b, rel = solve_lambdas(gm, theta, cfg.distance, cfg.steps, cfg.lr)
            lam[idx] = lam_b.cpu() * (idx.numel() / n)
            residuals.append(rel)
            if callback is not None:
                callback(LambdaEvent(batch=b + 1, total_batches=n_batches, residual_rel=rel))
    finally:
        teacher.train(was_training)
    return LambdaResult(lam=lam, rank=rank_within_class(lam, y), labels=y.clone(), residual_rel=residuals)


def _stratified_order(y: Tensor, g: torch.Generator) -> Tensor:
    parts = []
    for c in y.unique().tolist():
        members = (y == c).nonzero(as_tuple=True)[0]
        parts.append(members[torch.randperm(members.numel(), generator=g)])
    # Interleave classes so that every slice order[b::n_batches] is stratified.
    merged = torch.cat(parts)
    keys = torch.cat([torch.arange(p.numel()) / max(p.numel(), 1) for p in parts])
    return merged[keys.argsort(stable=True)]


def rank_within_class(lam: Tensor, y: Tensor) -> Tensor:
    """Rank of each sample's λ within its class: 0 = highest; ties broken by index."""
    rank = torch.empty_like(y)
    for c in y.unique().tolist():
        members = (y == c).nonzero(as_tuple=True)[0]
        order = members[lam[members].argsort(descending=True, stable=True)]
        rank[order] = torch.arange(order.numel())
    return rank


def class_lambda_sums(lam: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Σλ per class, (C,) (paper §5.1: correlates with per-class test accuracy)."""
    return torch.zeros(num_classes, dtype=lam.dtype).index_add_(0, y, lam)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two 1-D tensors."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))
