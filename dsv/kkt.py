"""DeepKKT losses (Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 6-9 and Algorithm 1).

Notation: Φ(x; θ*) is the frozen teacher, candidates (x_i, y_i) carry multipliers λ_i, and
L_i = CE(Φ(x_i; θ*), y_i). The KKT conditions of the training problem become losses:

* stationarity (Eq. 8): θ* = −Σ_i λ_i ∇_θ L_i, measured by a distance D over parameter entries;
* primal feasibility (Eq. 7): argmax_c Φ_c(x_i) = y_i, a gated cross-entropy;
* dual feasibility: λ_i ≥ 0 (handled by the optimiser in :mod:`dsv.extract`);
* manifold: the KKT terms again on augmented candidates A(x), plus TV and norm priors.

Σ_i λ_i ∇_θ L_i is computed as one weighted backward, ∇_θ(Σ_i λ_i L_i), with ``create_graph=True`` so
that the stationarity distance can be differentiated w.r.t. x and λ (a double backward).

Speed and memory (``KKTConfig.impl``, ``chunk_size``, ``memory_budget_mb``; numbers in
benchmarks/results/perf.md):

* ``impl="fast"`` (the default "auto" picks it when θ is all parameters) evaluates the teacher through a view whose instance/group norms are written
  with primitive ops (``var_mean``, ``rsqrt``, ``addcmul``). The function and θ are the same (the view
  shares the teacher's parameters); only autograd's double backward changes: PyTorch's fused norm kernel
  has a slow composite double backward (``NativeBatchNormBackwardBackward0``), which was the largest
  single cost of a DeepKKT step. ``impl="reference"`` keeps the plain model (the naive path).
* Memory-bounded exact path: when the candidates do not fit the budget they are split into chunks.
  Pass 1 computes S = Σ_chunks Σ_i λ_i ∇_θ L_i without a graph and g = ∂D/∂S from the full S; pass 2
  recomputes each chunk's Σλ∇L with a graph and backpropagates ⟨g, S_chunk⟩ plus the chunk's primal
  terms (all separable over candidates). The gradients w.r.t. x and λ equal the one-shot path's; the
  returned total is a surrogate with the exact value and those gradients.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsv.augment import augment, parse_augment
from dsv.checks import one_of
from dsv.kernel import (
    DISTANCES,
    PARAM_SUBSETS,
    frozen,
    relative_residual,
    soft_cross_entropy,
    stationarity_distance,
    stationarity_params,
    target_classes,
    weighted_grad_sum,
)
from dsv.models import final_linear

PRIMALS = ("gated", "ungated")
IMPLS = ("auto", "fast", "reference")
# Peak bytes of a one-shot DeepKKT step per candidate ≈ this factor × the float bytes of one candidate's
# forward activations (the double-backward graph keeps several copies of every activation). Calibrated
# against the measured peak RSS in benchmarks/results/perf.md (measured/estimated ratio is reported there).
GRAPH_BYTES_FACTOR = 5.0


@dataclass(frozen=True)
class KKTConfig:
    """Weights and variants of the DeepKKT objective (paper Eq. 9 / Algorithm 1).

    L_kkt = L_stat + β1·L_primal;  L_total = L_kkt(x) + η_s·L_stat(A(x)) + η_p·β1·L_primal(A(x)) + β2·L_tv + β3·L_norm
    (+ β_r·L_repel, an addition of ours, off by default).

    The paper's single η weighs both terms on the augmented copy (η_s = η_p = η = 5). They are split here
    because they do different jobs: λ is fitted to the candidates x, so stationarity on A(x) pulls x's
    gradients towards a residual λ was not fitted for, while the primal term on A(x) asks for a prediction
    that survives the augmentation (robustness). ``eta_stat = 0`` also skips the second double backward.

    Attributes:
        distance: D of Eq. 8. "l1" (default, paper text): mean over parameter entries of |θ* + Σλ∇L|;
            "l2" (Algorithm 1): mean of the squared entries.
        param_subset: parameters θ the stationarity condition is imposed on: "all" (the paper's Eq. 8),
            "last" (final linear layer only, found by structure; the paper inverts a model whose last
            layer was retrained) or "free" (all but the parameters a following instance/group norm
            makes scale-invariant, for which no λ can satisfy stationarity: see dsv.certificate). Default "last", a
            deviation: with "all" the relative stationarity residual of a ConvNet teacher stays where it started
            (the term never acts), with "last" it falls (benchmarks/results/ablation-fashion_mnist.md).
        beta_stat: weight of L_stat (1 = the paper). 0 removes the stationarity term from the candidates'
            objective (the ablation "without L_stat"; λ is still fitted and reported).
        primal: "gated" (default, Eq. 7: zero loss for candidates already classified as their target)
            or "ungated" (plain cross-entropy, Algorithm 1).
        beta_primal: β1. Paper: 2e-3 (CIFAR-10 distillation), 2e-5 (ImageNet generation).
        beta_tv: β2, total-variation prior. Paper: 0 (CIFAR-10), 40 (ImageNet).
        beta_norm: β3, squared-norm prior. Paper: 0 (CIFAR-10), 1e-6 (ImageNet).
        beta_repel: weight of the within-class repulsion (:func:`repulsion`, our addition for candidates that
            start without real images: without it the candidates of a class settle on one mode). 0 = off.
        eta_stat: η_s, weight of the stationarity term on the augmented candidates A(x). Paper: η = 5.
        eta_primal: η_p, weight of the primal term on A(x). Paper: η = 5.
        augment: the augmentation A (:func:`dsv.augment.parse_augment`); "kkt" is the paper's: one of translate
            0.125, crop 0.2, flip 0.5, noise (0.01 likely) per step.
        impl: "fast" (norms as primitive ops, see module docstring), "reference" (the plain model) or
            "auto" (default: "fast" when θ is all parameters, "reference" for the last layer, where no
            second derivative goes through a norm and the fused kernels win: benchmarks/results/perf.md). Same
            function, same gradients.
        chunk_size: candidates per chunk of the memory-bounded exact path; 0 = decide from
            ``memory_budget_mb`` (all at once when that is 0 too).
        memory_budget_mb: peak memory allowed for the step's graph, in MiB; 0 = unlimited. Used only when
            ``chunk_size`` is 0: chunk = budget // :func:`estimate_bytes_per_candidate`.
    """

    distance: str = "l1"
    param_subset: str = "last"
    beta_stat: float = 1.0
    primal: str = "gated"
    beta_primal: float = 2e-3
    beta_tv: float = 0.0
    beta_norm: float = 0.0
    beta_repel: float = 0.0
    eta_stat: float = 5.0
    eta_primal: float = 5.0
    augment: str = "kkt"
    impl: str = "auto"
    chunk_size: int = 0
    memory_budget_mb: float = 0.0

    def __post_init__(self) -> None:
        for key, allowed in (("impl", IMPLS), ("distance", DISTANCES), ("primal", PRIMALS),
                             ("param_subset", PARAM_SUBSETS)):
            one_of(key, getattr(self, key), allowed)
        for key in ("beta_stat", "beta_primal", "beta_tv", "beta_norm", "beta_repel", "eta_stat", "eta_primal",
                    "chunk_size", "memory_budget_mb"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        parse_augment(self.augment)


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
    with frozen(model):
        params, s = _params_and_grad_sum(model, x, y, lam, subset, create_graph=True)
        return stationarity_distance(params, s, distance)


def _params_and_grad_sum(model: nn.Module, x: Tensor, y: Tensor, lam: Tensor, subset: str, create_graph: bool
                         ) -> tuple[list[nn.Parameter], list[Tensor]]:
    """θ (the ``subset``) and Σ_i λ_i ∇_θ L_i at candidates x (the opening of every stationarity evaluation)."""
    params = stationarity_params(model, subset, x.detach())
    losses = soft_cross_entropy(model(x), y)
    return params, weighted_grad_sum(params, losses, lam, create_graph)


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


def repulsion(features: Tensor, y: Tensor) -> Tensor:
    """Within-class similarity of a batch of images, to be minimised: the mean pairwise cosine of their features
    within each class, the features centred on the batch's (detached) mean feature. A contrastive repulsion in
    the spirit of CMI (Fang et al. 2021): it pushes the images of one class apart in the network's feature space,
    so they cannot all settle on the class's single most typical image. 0 when no class has two images.

    Args:
        features: (K, F) features, e.g. the input of the teacher's final layer (:class:`capture_features`).
        y: (K,) int or (K, C) soft targets (argmax).
    """
    hard = target_classes(y)
    f = features.flatten(1)
    f = torch.nn.functional.normalize(f - f.mean(0, keepdim=True).detach(), dim=1)
    same = (hard[:, None] == hard[None, :]) & ~torch.eye(hard.numel(), dtype=torch.bool, device=hard.device)
    pairs = same.sum()
    if int(pairs) == 0:
        return f.new_zeros(())
    return (f @ f.T)[same].sum() / pairs


class capture_features:  # noqa: N801 (a context manager used like a function)
    """Context: records the input of ``model``'s final linear layer (its penultimate features) on every forward;
    ``.last`` is the latest, with its graph."""

    def __init__(self, model: nn.Module) -> None:
        self.layer = final_linear(model)[1]
        self.last: Tensor | None = None

    def __enter__(self) -> capture_features:
        self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def _hook(self, _m: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        self.last = inputs[0]

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


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
    residual: Tensor  # relative l2 stationarity residual on x, see relative_residual
    repel: Tensor  # within-class repulsion of x (0 when beta_repel is 0)


def kkt_objective(
    model: nn.Module,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    lam: Tensor,
    cfg: KKTConfig,
    generator: torch.Generator,
) -> tuple[Tensor, KKTTerms]:
    """L_total = L_kkt(x) + η_s·L_stat(A(x)) + η_p·β1·L_primal(A(x)) + β2·L_tv(x) + β3·L_norm(x), with graph
    (Algorithm 1, with the paper's η split into ``cfg.eta_stat`` and ``cfg.eta_primal``).

    Dispatches on ``cfg.impl`` (teacher as is, or through :func:`primitive_norm_view`) and on the chunk
    size (:func:`resolve_chunk_size`): one shot when all candidates fit, else the memory-bounded exact
    path of :func:`_kkt_chunked`. Every path returns the same value and the same gradients w.r.t. ``x``
    and ``lam`` for the same generator state.

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
    net = primitive_norm_view(model) if resolved_impl(cfg) == "fast" else model
    chunk = resolve_chunk_size(model, x, cfg)
    if chunk >= x.shape[0]:
        return _kkt_one_shot(net, params, x, y, lam, cfg, generator)
    return _kkt_chunked(net, params, x, y, lam, cfg, generator, chunk)


def _augmented(x: Tensor, cfg: KKTConfig) -> bool:
    """Whether the objective has KKT terms on an augmented copy (images only)."""
    return x.dim() == 4 and (cfg.eta_stat > 0 or cfg.eta_primal > 0)


def _repels(x: Tensor, cfg: KKTConfig) -> bool:
    """Whether the objective has the repulsion term; it is taken on the augmented copy (one per-sample draw per
    candidate), so that even two identical candidates see different views and move apart."""
    return cfg.beta_repel > 0


def _kkt_one_shot(
    net: nn.Module,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    lam: Tensor,
    cfg: KKTConfig,
    generator: torch.Generator,
) -> tuple[Tensor, KKTTerms]:
    """All candidates in one graph: a double backward for x and, when η_s > 0, one for A(x). See
    :func:`kkt_objective`."""
    gated = cfg.primal == "gated"

    def stationarity(logits: Tensor) -> tuple[Tensor, list[Tensor]]:
        s = weighted_grad_sum(params, soft_cross_entropy(logits, y), lam, create_graph=True)
        return stationarity_distance(params, s, cfg.distance), s

    zero = x.new_zeros(())
    logits = net(x)  # (K, C)
    stat, s = stationarity(logits)
    primal = primal_loss(logits, y, gated)
    total = cfg.beta_stat * stat + cfg.beta_primal * primal
    stat_a = primal_a = rep = zero
    if _augmented(x, cfg) or _repels(x, cfg):
        xa = augment(x, cfg.augment, generator) if x.dim() == 4 else x
        with capture_features(net) as cap:
            logits_a = net(xa)
        if cfg.eta_stat > 0:
            stat_a, _ = stationarity(logits_a)
        if _augmented(x, cfg):
            primal_a = primal_loss(logits_a, y, gated)
        if cfg.beta_repel > 0:
            assert cap.last is not None
            rep = repulsion(cap.last, y)
        total = (total + cfg.eta_stat * cfg.beta_stat * stat_a + cfg.eta_primal * cfg.beta_primal * primal_a
                 + cfg.beta_repel * rep)
    tv = tv_loss(x) if cfg.beta_tv > 0 else zero
    nrm = norm_loss(x) if cfg.beta_norm > 0 else zero
    total = total + cfg.beta_tv * tv + cfg.beta_norm * nrm
    terms = KKTTerms(
        total=total.detach(), stat=stat.detach(), primal=primal.detach(), stat_aug=stat_a.detach(),
        primal_aug=primal_a.detach(), tv=tv.detach(), norm=nrm.detach(), logits=logits.detach(),
        residual=relative_residual(params, s), repel=rep.detach(),
    )
    return total, terms


def _kkt_chunked(
    net: nn.Module,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    lam: Tensor,
    cfg: KKTConfig,
    generator: torch.Generator,
    chunk: int,
) -> tuple[Tensor, KKTTerms]:
    """Memory-bounded exact path: at most ``chunk`` candidates' double-backward graph alive at once.

    Pass 1 (no graph): S = Σ_chunks Σ_i λ_i ∇_θ L_i for x and for A(x), the distances and g = ∂D/∂S.
    Pass 2 (per chunk, graph freed after each): ∇_{x,λ} of w·⟨g, S_chunk⟩ + w·β1·(chunk's share of
    L_primal), w = 1 for x and η for A(x). The gradient w.r.t. A(x) is pulled back through the
    augmentation once at the end, and the priors are taken on the full x (cheap, separable).

    Returns:
        (surrogate total whose value is L_total and whose gradients w.r.t. x and λ are L_total's,
        detached :class:`KKTTerms`).
    """
    gated = cfg.primal == "gated"
    k = x.shape[0]
    spans = [(a, min(a + chunk, k)) for a in range(0, k, chunk)]
    total_entries = sum(p.numel() for p in params)
    xl = x.detach().requires_grad_(True)  # leaf standing in for the caller's x
    lam_d = lam.detach()
    # (inputs, weight of its stationarity term, weight of its primal term)
    copies: list[tuple[Tensor, float, float]] = [(xl, 1.0, 1.0)]
    xa_graph = None
    if (_augmented(x, cfg) or _repels(x, cfg)) and x.dim() == 4:
        xa_graph = augment(xl, cfg.augment, generator)  # (K, C, H, W), graph to xl
    if _augmented(x, cfg):
        assert xa_graph is not None
        copies.append((xa_graph.detach(), cfg.eta_stat, cfg.eta_primal))

    zero = x.new_zeros(())
    stats: list[Tensor] = []
    primals: list[Tensor] = []
    directions: list[list[Tensor] | None] = []
    logits_x: Tensor | None = None
    residual = zero
    for inputs, w_stat, _ in copies:  # pass 1
        s_full = [torch.zeros_like(p) for p in params]
        logits_parts = []
        for a, b in spans:
            logits = net(inputs[a:b])
            if w_stat > 0:
                losses = soft_cross_entropy(logits, y[a:b])
                for acc, gp in zip(s_full, weighted_grad_sum(params, losses, lam_d[a:b], create_graph=False)):
                    acc.add_(gp)
            logits_parts.append(logits.detach())
        logits_all = torch.cat(logits_parts)
        primals.append(primal_loss(logits_all, y, gated))
        if logits_x is None:
            logits_x, residual = logits_all, relative_residual(params, s_full)
        if w_stat == 0:
            stats.append(zero)
            directions.append(None)
            continue
        stats.append(stationarity_distance(params, s_full, cfg.distance).detach())
        resid = [p.detach() + sp for p, sp in zip(params, s_full)]
        # g = w·∂D/∂S: l1 → sign(r)/P (sign(0) = 0, as autograd's abs), l2 → 2r/P.
        scale = w_stat * cfg.beta_stat / total_entries
        directions.append([(r.sign() if cfg.distance == "l1" else 2.0 * r) * scale for r in resid])

    grad_inputs = [torch.zeros_like(xl) for _ in copies]
    grad_lam = torch.zeros_like(lam_d)
    for c, ((inputs, _, w_primal), gdir) in enumerate(zip(copies, directions)):  # pass 2
        gin = grad_inputs[c]
        for a, b in spans:
            xi = inputs[a:b].detach().requires_grad_(True)
            li = lam_d[a:b].clone().requires_grad_(True)
            logits = net(xi)
            obj = zero
            if gdir is not None:
                losses = soft_cross_entropy(logits, y[a:b])
                s = weighted_grad_sum(params, losses, li, create_graph=True)
                obj = torch.stack([(gp * sp).sum() for gp, sp in zip(gdir, s)]).sum()
            if cfg.beta_primal > 0 and w_primal > 0:
                obj = obj + (w_primal * cfg.beta_primal * (b - a) / k) * primal_loss(logits, y[a:b], gated)
            if not obj.requires_grad:
                continue
            gx_c, gl_c = torch.autograd.grad(obj, [xi, li], allow_unused=True)
            if gx_c is not None:
                gin[a:b] += gx_c
            if gl_c is not None:
                grad_lam[a:b] += gl_c
    gx = grad_inputs[0]
    if len(copies) > 1:
        assert xa_graph is not None
        (ga,) = torch.autograd.grad(xa_graph, xl, grad_outputs=grad_inputs[1], retain_graph=True)
        gx = gx + ga
    tv = nrm = rep = zero
    if cfg.beta_tv > 0 or cfg.beta_norm > 0 or cfg.beta_repel > 0:
        with torch.enable_grad():
            tv = tv_loss(xl) if cfg.beta_tv > 0 else zero
            nrm = norm_loss(xl) if cfg.beta_norm > 0 else zero
            if cfg.beta_repel > 0:  # pairwise over all candidates: one forward of the features, no double backward
                with capture_features(net) as cap:
                    net(xa_graph if xa_graph is not None else xl)
                assert cap.last is not None
                rep = repulsion(cap.last, y)
            (gp,) = torch.autograd.grad(cfg.beta_tv * tv + cfg.beta_norm * nrm + cfg.beta_repel * rep, xl)
        gx = gx + gp
        tv, nrm, rep = tv.detach(), nrm.detach(), rep.detach()
    stat, primal = stats[0], primals[0].detach()
    stat_a, primal_a = (stats[1], primals[1].detach()) if len(copies) > 1 else (zero, zero)
    value = cfg.beta_stat * stat + cfg.beta_primal * primal
    if len(copies) > 1:
        value = value + cfg.eta_stat * cfg.beta_stat * stat_a + cfg.eta_primal * cfg.beta_primal * primal_a
    value = value + cfg.beta_tv * tv + cfg.beta_norm * nrm + cfg.beta_repel * rep
    link = (x * gx).sum() + (lam * grad_lam).sum()  # carries the exact gradients back to x and λ
    total = link - link.detach() + value
    assert logits_x is not None
    terms = KKTTerms(
        total=value, stat=stat, primal=primal, stat_aug=stat_a, primal_aug=primal_a, tv=tv, norm=nrm,
        logits=logits_x, residual=residual, repel=rep,
    )
    return total, terms


def group_norm_primitive(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """GroupNorm (instance norm when ``groups`` = channels) from primitive ops, (B, C, ...) -> same.

    y = x·a + (b − μ·a) with a = w / sqrt(σ² + eps) per (sample, channel): one full-size op in the
    forward, and a double backward made of reductions and elementwise ops (no fused-kernel composite).
    """
    b, c = x.shape[:2]
    bshape = (1, c) + (1,) * (x.dim() - 2)
    if groups == c:
        var, mu = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0, keepdim=True)  # (B, C, 1, 1)
    else:
        var, mu = torch.var_mean(x.reshape(b, groups, -1), dim=2, correction=0, keepdim=True)  # (B, G, 1)
        shape = (b, c) + (1,) * (x.dim() - 2)
        var = var.repeat_interleave(c // groups, dim=1).reshape(shape)
        mu = mu.repeat_interleave(c // groups, dim=1).reshape(shape)
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a = a * weight.view(bshape)
    shift = -mu * a
    if bias is not None:
        shift = shift + bias.view(bshape)
    return torch.addcmul(shift, x, a)


class _PrimitiveNorm(nn.Module):
    """Wraps an InstanceNorm2d/GroupNorm and evaluates it with :func:`group_norm_primitive`."""

    def __init__(self, norm: nn.Module, groups: int) -> None:
        super().__init__()
        self.norm = norm
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n = self.norm
        return group_norm_primitive(x, self.groups, n.weight, n.bias, n.eps)  # type: ignore[arg-type]


def primitive_norm_view(model: nn.Module) -> nn.Module:
    """The same function as ``model`` with its instance/group norms written as primitive ops.

    A shallow view: containers on the path to a norm are shallow copies whose child lists point to the
    original submodules (so parameters, buffers and train/eval flags are the teacher's own objects);
    ``model`` itself is not modified. Norms that use running statistics are left as they are. Rebuilt
    per call (microseconds), so it never goes stale.
    """
    if isinstance(model, nn.InstanceNorm2d) and not model.track_running_stats:
        return _PrimitiveNorm(model, model.num_features)
    if isinstance(model, nn.GroupNorm):
        return _PrimitiveNorm(model, model.num_groups)
    children = model._modules
    new = {n: (primitive_norm_view(m) if m is not None else None) for n, m in children.items()}
    if all(new[n] is children[n] for n in children):
        return model
    view = copy.copy(model)
    view.__dict__["_modules"] = new
    return view


_BYTES_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def resolved_impl(cfg: KKTConfig) -> str:
    """The implementation ``cfg.impl`` stands for ("auto" picks by parameter subset)."""
    if cfg.impl != "auto":
        return cfg.impl
    return "fast" if cfg.param_subset == "all" else "reference"


def estimate_bytes_per_candidate(model: nn.Module, x: Tensor, impl: str = "fast") -> int:
    """Estimated peak bytes of a one-shot DeepKKT step per candidate (graph + double-backward buffers).

    Counts the bytes autograd saves for one candidate's forward (parameters excluded) and multiplies by
    :data:`GRAPH_BYTES_FACTOR`. Cached per (model, input shape, dtype, device).

    Args:
        model: the teacher.
        x: (K, ...) candidates; only shape, dtype and device are used.
        impl: "fast" (through :func:`primitive_norm_view`) or "reference".
    """
    cache = _BYTES_CACHE.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype, str(x.device), impl)
    if key in cache:
        return cache[key]
    net = primitive_norm_view(model) if impl == "fast" else model
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        if t.data_ptr() not in param_ptrs:
            saved += t.numel() * t.element_size()
        return t

    probe = torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device, requires_grad=True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(probe)
    est = max(1, int(math.ceil(GRAPH_BYTES_FACTOR * saved)))
    cache[key] = est
    return est


def resolve_chunk_size(model: nn.Module, x: Tensor, cfg: KKTConfig) -> int:
    """Candidates per chunk: ``cfg.chunk_size``, else the memory budget's, else all K (one shot).

    Args:
        model: the teacher (not the view).
        x: (K, ...) candidates.
        cfg: ``chunk_size``, ``memory_budget_mb`` and ``impl``.
    """
    k = x.shape[0]
    if cfg.chunk_size > 0:
        return min(cfg.chunk_size, k)
    if cfg.memory_budget_mb > 0:
        per = estimate_bytes_per_candidate(model, x, resolved_impl(cfg))
        return max(1, min(k, int(cfg.memory_budget_mb * 2**20 // per)))
    return k


def stationarity_residual(model: nn.Module, x: Tensor, y: Tensor, lam: Tensor, subset: str = "all") -> float:
    """The relative l2 stationarity residual ‖θ* + Σλ∇L‖₂ / ‖θ*‖₂ of candidates (x, y) with multipliers λ.

    A value near 1 means the candidates' gradients explain almost none of θ*: the stationarity term has not
    found support vectors, whatever else the run reports. See :func:`relative_residual`.
    """
    with frozen(model), torch.enable_grad():
        params, s = _params_and_grad_sum(model, x, y, lam, subset, create_graph=False)
    return float(relative_residual(params, s))
