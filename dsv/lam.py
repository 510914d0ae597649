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

from dsv.checks import at_least, one_of, positive
from dsv.kernel import (
    DISTANCES,
    LAM_SOLVERS,
    PARAM_SUBSETS,
    frozen,
    margins,
    per_sample_grads,
    relative_residual,
    solve_nnls,
    stationarity_params,
)


@dataclass(frozen=True)
class LambdaConfig:
    """Settings of λ fitting on real data.

    Attributes:
        batch_size: samples per stationarity problem (stratified); the per-sample gradient matrix of one
            batch (batch_size × P floats) must fit in memory.
        solver: "adam" (default, the first release: projected Adam on ``distance``; with the l1 distance it
            drifts off a known exact solution) or "nnls" (min_{λ≥0} ‖θ* + Gᵀλ‖², a non-negative least-squares
            problem, solved by accelerated projected gradient with step 1/‖GGᵀ‖ and adaptive restart, then an
            exact active-set finish; an exact solution is a fixed point, so the solver cannot drift off it). The
            default stays "adam": on Fashion-MNIST NNLS helped the top-λ core-set at IPC 1 and hurt it at IPC 10
            (benchmarks/results/fashion_mnist-paper-v2.md), and no second dataset was measured.
        steps: iterations of the solver per batch (NNLS stops earlier once converged).
        lr: Adam learning rate, relative to the λ scale (λ = s·u, u initialised to 1); "adam" only.
        distance: "l1" (paper default) or "l2" for the "adam" solver (also the distance of its reported
            residual); "nnls" solves and reports the l2 problem.
        param_subset: "all" or "last" (use "last" for large models: P is then the classifier's size).
        chunk: samples per vectorised per-sample-gradient call (bounds peak memory).
        max_bytes: refuse batches whose gradient matrix exceeds this many bytes (a clear error, not OOM).
    """

    batch_size: int = 1000
    solver: str = "adam"
    steps: int = 300
    lr: float = 0.05
    distance: str = "l1"
    param_subset: str = "all"
    chunk: int = 128
    max_bytes: int = 4 * 1024**3

    def __post_init__(self) -> None:
        one_of("solver", self.solver, LAM_SOLVERS)
        at_least(self, 2, "batch_size")
        at_least(self, 1, "steps")
        positive(self, "lr")
        one_of("distance", self.distance, DISTANCES)
        if self.param_subset not in PARAM_SUBSETS:
            raise ValueError(
                f"param_subset = {self.param_subset!r} is not one of {', '.join(PARAM_SUBSETS)}"
            )
        at_least(self, 1, "chunk")


@dataclass
class LambdaResult:
    """λ per real sample, its support score and margin, and ranks within the sample's class.

    Attributes:
        lam: (N,) multipliers on the full-data scale (see the module docstring).
        rank: (N,) rank of λ within the class (0 = highest λ).
        labels: (N,) classes.
        support: (N,) support score s_i = λ_i·‖∇_θ L_i‖: how much sample i contributes to rebuilding θ*.
            At a CE + weight-decay stationary point λ is uniform and the support lives in the gradient
            (‖∇L_i‖ ∝ 1 − p_i for the last layer), so this, not λ, ranks support vectors.
        margin: (N,) teacher margin, logit of the true class minus the largest other logit.
        support_rank: (N,) rank of the support score within the class (0 = highest).
        residual_l2: relative l2 stationarity residual ‖θ + Gᵀλ‖/‖θ‖ per batch, at the end (1.0 = λ explains
            nothing).
    """

    lam: Tensor
    rank: Tensor
    labels: Tensor
    support: Tensor | None = None
    margin: Tensor | None = None
    support_rank: Tensor | None = None
    residual_l2: list[float] = field(default_factory=list)

    def topk(self, k: int, by: str = "lambda") -> Tensor:
        """Indices of the k top samples of every class by "lambda" or "support", class 0 first, (C·k,)."""
        rank = self.rank if by == "lambda" else self.support_rank
        if rank is None:
            raise ValueError(f"no {by!r} ranking in this result")
        return topk_by_rank(rank, self.labels, k)


def topk_by_rank(rank: Tensor, labels: Tensor, k: int) -> Tensor:
    """Indices of the k best-ranked (rank 0 first) samples of every class, class 0 first, (C·k,)."""
    out = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero(as_tuple=True)[0]
        if members.numel() < k:
            raise ValueError(f"class {c} has only {members.numel()} samples, fewer than k={k}")
        out.append(members[rank[members].argsort()[:k]])
    return torch.cat(out)


@dataclass(frozen=True)
class LambdaEvent:
    """Progress of :func:`fit_lambdas`: one per finished batch."""

    batch: int
    total_batches: int
    residual_l2: float


def solve_lambdas(
    g: Tensor, theta: Tensor, distance: str = "l1", steps: int = 300, lr: float = 0.05, solver: str = "nnls"
) -> tuple[Tensor, float]:
    """min_{λ≥0} D(θ, −G^T λ) for a fixed gradient matrix.

    Args:
        g: (m, P) per-sample gradients.
        theta: (P,) flattened θ*.
        distance: "l1" (mean |r|) or "l2" (mean r²), r = θ + G^T λ: the problem (and the reported
            residual) of "adam"; "nnls" solves the l2 problem. The returned residual is always the relative l2
            norm.
        steps: iteration budget.
        lr: Adam learning rate relative to the best uniform λ ("adam" only).
        solver: "nnls" (:func:`solve_nnls`, the l2 problem) or "adam" (projected Adam on ``distance``).

    Returns:
        (λ (m,), relative l2 residual ‖θ + Gᵀλ‖₂/‖θ‖₂).
    """
    s = g.sum(0)
    c = float(-(theta @ s) / (s @ s).clamp_min(1e-30))
    if solver == "nnls":
        # Warm start at the best uniform λ: the exact solution at a KKT point (uniform 1/(nω)) is then a
        # fixed point, and among many solutions the iteration stays near the uniform one instead of
        # jumping to a sparse vertex (P ≪ m makes the solution set large).
        with torch.no_grad():
            lam = solve_nnls(g, theta, steps, lam0=torch.full((g.shape[0],), max(c, 0.0), dtype=g.dtype, device=g.device))
            return lam, float(relative_residual([theta], [g.t() @ lam]))
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
        return lam, float(relative_residual([theta], [g.t() @ lam]))


def fit_lambdas(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: LambdaConfig,
    seed: int = 0,
    callback: Callable[[LambdaEvent], None] | None = None,
    n_train: int | None = None,
) -> LambdaResult:
    """Learn λ for fixed real images under the stationarity loss; rank them within each class.

    Args:
        teacher: trained classifier (frozen; put in eval mode for the duration).
        x: (N, ...) normalised real training images.
        y: (N,) labels.
        cfg: batch size, solver, steps, distance.
        seed: fixes the stratified batch split.
        callback: one :class:`LambdaEvent` per batch.
        n_train: size of the teacher's training set (the λ scale: a batch of m samples gets λ·m/n_train);
            defaults to N, right only when x is the whole training set.

    Returns:
        :class:`LambdaResult` with λ on the full-data scale (see module docstring), support scores and
        margins.
    """
    n = x.shape[0]
    n_scale = n if n_train is None else n_train
    if n_scale < 1:
        raise ValueError(f"n_train must be >= 1, got {n_scale}")
    device = next(teacher.parameters()).device
    with frozen(teacher):
        params = stationarity_params(teacher, cfg.param_subset, x[:8].to(device))
        p_total = sum(p.numel() for p in params)
        dtype = params[0].dtype
        m = min(cfg.batch_size, n)
        g = torch.Generator().manual_seed(seed)
        # Stratified split: shuffle within each class, then deal samples round-robin into batches.
        order = _stratified_order(y, g)
        n_batches = max(1, round(n / m))
        batches = [order[b::n_batches] for b in range(n_batches)]
        m_max = max(b.numel() for b in batches)  # up to 1.5·m when n/m rounds down
        need = m_max * p_total * torch.finfo(dtype).bits // 8
        if need > cfg.max_bytes:
            raise MemoryError(
                f"a batch of {m_max} samples needs {need / 1e9:.1f} GB of per-sample gradients "
                f"(P={p_total}) > max_bytes={cfg.max_bytes / 1e9:.1f} GB; lower batch_size or set "
                f"param_subset: last"
            )
        theta = torch.cat([p.detach().flatten() for p in params]).to(device)
        lam = torch.zeros(n, dtype=dtype)
        gnorm = torch.zeros(n, dtype=dtype)
        margin = torch.zeros(n, dtype=dtype)
        residuals = []
        for b, idx in enumerate(batches):
            xb, yb = x[idx].to(device=device, dtype=dtype), y[idx].to(device)
            gm = per_sample_grads(teacher, xb, yb, cfg.param_subset, cfg.chunk)
            lam_b, rel = solve_lambdas(gm, theta, cfg.distance, cfg.steps, cfg.lr, cfg.solver)
            lam[idx] = lam_b.cpu() * (idx.numel() / n_scale)
            gnorm[idx] = gm.norm(dim=1).cpu()
            with torch.no_grad():
                margin[idx] = margins(teacher(xb), yb).cpu()
            residuals.append(rel)
            if callback is not None:
                callback(LambdaEvent(batch=b + 1, total_batches=n_batches, residual_l2=rel))
        support = lam * gnorm
        return LambdaResult(lam=lam, rank=rank_within_class(lam, y, g), labels=y.clone(), support=support,
                            margin=margin, support_rank=rank_within_class(support, y, g), residual_l2=residuals)


def _stratified_order(y: Tensor, g: torch.Generator) -> Tensor:
    parts = []
    for c in y.unique().tolist():
        members = (y == c).nonzero(as_tuple=True)[0]
        parts.append(members[torch.randperm(members.numel(), generator=g)])
    # Interleave classes so that every slice order[b::n_batches] is stratified.
    merged = torch.cat(parts)
    keys = torch.cat([torch.arange(p.numel()) / max(p.numel(), 1) for p in parts])
    return merged[keys.argsort(stable=True)]


def rank_within_class(lam: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Rank of each sample's score within its class: 0 = highest. Ties are broken in a random order drawn from
    ``generator`` (by index without one): at a KKT point λ is uniform, and an index order would make "top-λ"
    mean "first in the file"."""
    rank = torch.empty_like(y)
    for c in y.unique().tolist():
        members = (y == c).nonzero(as_tuple=True)[0]
        if generator is not None:
            members = members[torch.randperm(members.numel(), generator=generator)]
        order = members[lam[members].argsort(descending=True, stable=True)]
        rank[order] = torch.arange(order.numel())
    return rank


def class_lambda_sums(lam: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Σλ per class, (C,) (paper §5.1: correlates with per-class test accuracy)."""
    return torch.zeros(num_classes, dtype=lam.dtype).index_add_(0, y, lam)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two 1-D tensors (NaN when either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")
