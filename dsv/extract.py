"""Deep Support Vector synthesis (paper §4, Algorithm 1). Generation and editing: :mod:`dsv.generate`.

Candidates x_i (with targets y_i) and multipliers λ_i are optimised jointly under the DeepKKT
objective of :mod:`dsv.kkt` while the teacher stays frozen and in eval mode. λ is optimised in units
of a per-run scale s (λ_i = s·u_i, u_i initialised to 1), where s is the best *uniform* multiplier for
the initial candidates (closed form of the l2 stationarity problem) unless ``lam_init`` fixes it; the
λ learning rate is therefore relative and the same default works for any teacher and candidate count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.certificate import scale_invariant_names
from dsv.checks import at_least, one_of, positive
from dsv.data.core import per_class_indices
from dsv.kkt import KKTConfig, kkt_objective, soft_cross_entropy, stationarity_params, weighted_grad_sum
from dsv.lam import margins, per_sample_grads, solve_nnls

DUALS = ("drop", "clamp", "softplus")
LAM_SOLVERS = ("adam", "nnls")
KEEP_BY = ("support", "lambda")
INITS = ("nshot", "0shot", "noise")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class ExtractConfig:
    """Optimisation of candidates and multipliers (everything the paper leaves unreported is here).

    Attributes:
        steps: optimisation steps. Unreported in the paper.
        lr_x: learning rate of the candidates (normalised input units). Unreported; draft notes say 1e-3.
        lr_lam: learning rate of λ, relative to its scale s (see module docstring). Draft notes say 0.1
            (absolute); relative 1.0 lets λ grow to the ~30x its initial scale that the measured runs
            needed within 150 steps (at 0.1 the stationarity residual had barely moved).
        optimizer: "adam" or "sgd" (momentum 0.9) for both x and λ. Unreported; Adam chosen.
        lam_init: initial λ for every candidate; None = the best uniform λ for the initial candidates.
        dual: how λ ≥ 0 is enforced. "drop" = the paper's Algorithm 1 (a candidate whose λ turns
            negative is discarded); "clamp" (λ projected to 0, candidate kept; the shipped default, a
            deviation: on Fashion-MNIST IPC 10 the paper's rules kept 21/100 candidates and their
            students scored 47.98% vs 71.98%, benchmarks/results/ablation-fashion_mnist.md) and "softplus" (λ = softplus(ρ), also a deviation).
        lam_solver: "adam" (λ = s·u optimised jointly with x by ``optimizer``, with ``lr_lam``; the dual
            rule applies) or "nnls" (every ``lam_every`` steps λ is set to the exact solution of the
            non-negative least-squares problem min_{λ≥0} ‖θ* + Σ_i λ_i ∇_θ L_i‖² for the current
            candidates, warm-started from the current λ; x then follows the gradient of L_stat at that
            λ: λ ≥ 0 by construction, no learning rate, no drift).
        lam_every: steps between two NNLS solves ("nnls" only).
        lam_steps: iterations of one NNLS solve ("nnls" only).
        spare: extra candidates per class as a multiple of IPC (used by :func:`init_candidates`:
            IPC·(1 + spare) are optimised); survivors beyond IPC are trimmed by ``keep_by``.
        keep_by: how survivors beyond IPC are chosen: "support" (largest support score λ_i·‖∇_θ L_i‖,
            see :mod:`dsv.lam`) or "lambda" (largest λ, the paper's ranking).
        clamp_pixels: keep candidates inside the valid pixel range [0, 1] (mapped to normalised space).
        kkt: the objective's weights and variants.
        log_every: trace interval in steps.
        max_lam_ratio: stop with an error when max λ exceeds this multiple of the initial scale
            (divergence guard).
    """

    steps: int = 200
    lr_x: float = 0.01
    lr_lam: float = 1.0
    optimizer: str = "adam"
    lam_init: float | None = None
    dual: str = "clamp"
    lam_solver: str = "adam"
    lam_every: int = 1
    lam_steps: int = 100
    spare: float = 0.0
    keep_by: str = "support"
    clamp_pixels: bool = True
    kkt: KKTConfig = field(default_factory=KKTConfig)
    log_every: int = 10
    max_lam_ratio: float = 1e6

    def __post_init__(self) -> None:
        at_least(self, 0, "steps")
        positive(self, "lr_x", "lr_lam")
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("dual", self.dual, DUALS)
        if self.lam_init is not None and not self.lam_init > 0:
            raise ValueError(f"lam_init must be > 0 (or null for automatic), got {self.lam_init}")
        one_of("lam_solver", self.lam_solver, LAM_SOLVERS)
        one_of("keep_by", self.keep_by, KEEP_BY)
        at_least(self, 1, "lam_every", "lam_steps")
        at_least(self, 0, "spare")
        at_least(self, 1, "log_every")


@dataclass(frozen=True)
class ExtractEvent:
    """Progress of :func:`extract`, passed to its callback every ``log_every`` steps."""

    step: int
    total_steps: int
    metrics: dict[str, float]


@dataclass
class DSVResult:
    """The deep support vectors that survived, with diagnostics.

    Attributes:
        x: (M, C, H, W) DSVs in normalised input space.
        y: (M,) int targets or (M, C) soft targets.
        lam: (M,) multipliers λ (> 0 unless the caller asked to keep λ = 0 candidates).
        support: (M,) support scores λ_i·‖∇_θ L_i‖ (θ = the stationarity subset).
        margin: (M,) teacher margin towards the (hard) target: its logit minus the largest other.
        probs: (M, C) teacher probabilities.
        entropy: (M,) teacher prediction entropy (nats).
        source_index: (M,) index of each survivor in the initial candidate tensor.
        survivors_per_class: candidates left per (hard) target class, after trimming.
        dropped: candidates removed by the dual rule ("drop") or, at the end, for λ = 0.
        trace: one dict per logged step (step, loss, stat, primal, stat_aug, tv, norm, entropy,
            acc_target, survivors, lam_mean, residual_rel).
        lam_scale: the λ scale s used.
        dual: the dual rule used ("drop" is the paper's).
    """

    x: Tensor
    y: Tensor
    lam: Tensor
    probs: Tensor
    entropy: Tensor
    support: Tensor
    margin: Tensor
    source_index: Tensor
    survivors_per_class: list[int]
    dropped: int
    trace: list[dict[str, float]]
    lam_scale: float
    dual: str


def entropy_of(logits: Tensor) -> Tensor:
    """Prediction entropy in nats of (K, C) logits, (K,)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def soft_targets(class_a: int, class_b: int, delta: float, num_classes: int) -> Tensor:
    """y = (1 − δ)·onehot(a) + δ·onehot(b) (paper §5.4; δ = 0.6 in the paper). Shape (C,)."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    y = torch.zeros(num_classes)
    y[class_a] += 1.0 - delta
    y[class_b] += delta
    return y


def init_candidates(
    kind: str,
    per_class: int,
    num_classes: int,
    in_shape: tuple[int, ...],
    generator: torch.Generator,
    real_x: Tensor | None = None,
    real_y: Tensor | None = None,
    other_x: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Initial candidates, ``per_class`` of each class, class 0 first.

    Args:
        kind: "nshot" (one real image per candidate, from ``real_x``/``real_y``), "0shot" (images of
            another dataset ``other_x``, already shaped like ``in_shape`` and normalised; no real image
            of the task is used) or "noise" (standard normal in normalised space).
        per_class: candidates per class (IPC·(1 + spare), rounded up).
        num_classes: C.
        in_shape: (C, H, W) of one input.
        generator: the only source of randomness.
        real_x, real_y: the real pool for "nshot" (normalised).
        other_x: the foreign pool for "0shot" (normalised, shape (N, *in_shape)).

    Returns:
        (x0 (K, *in_shape), y0 (K,) int64), K = per_class·C.
    """
    y0 = torch.arange(num_classes).repeat_interleave(per_class)
    if kind == "nshot":
        if real_x is None or real_y is None:
            raise ValueError("init 'nshot' needs real images (real_x, real_y)")
        idx = per_class_indices(real_y, per_class, num_classes, generator)
        return real_x[idx].clone(), real_y[idx].clone()
    if kind == "0shot":
        if other_x is None:
            raise ValueError("init '0shot' needs images of another dataset (other_x)")
        if tuple(other_x.shape[1:]) != tuple(in_shape):
            raise ValueError(f"0-shot images have shape {tuple(other_x.shape[1:])}, the teacher expects {in_shape}")
        k = per_class * num_classes
        idx = torch.randint(other_x.shape[0], (k,), generator=generator) if other_x.shape[0] < k else torch.randperm(
            other_x.shape[0], generator=generator
        )[:k]
        return other_x[idx].clone(), y0
    if kind == "noise":
        return torch.randn((per_class * num_classes, *in_shape), generator=generator), y0
    raise ValueError(f"init = {kind!r} is not one of {', '.join(INITS)}")


def best_uniform_lambda(teacher: nn.Module, x: Tensor, y: Tensor, subset: str = "all") -> float:
    """The scalar c minimising ‖θ* + c·Σ_i ∇_θ L_i‖² (closed form), floored at a tiny positive value.

    This is the λ every candidate would share if all had the same multiplier; it sets the scale of λ.
    """
    params = stationarity_params(teacher, subset, x[:8])
    losses = soft_cross_entropy(teacher(x), y)
    g = weighted_grad_sum(teacher, params, losses, torch.ones_like(losses), create_graph=False)
    num = -sum(float((p.detach() * gi).sum()) for p, gi in zip(params, g))
    den = sum(float((gi * gi).sum()) for gi in g)
    c = num / den if den > 0 else 0.0
    if not math.isfinite(c) or c <= 0:
        # Gradients point away from θ* on average: fall back to the weight-decay scale 1/K.
        c = 1.0 / max(x.shape[0], 1)
    return c


class _FrozenTeacher:
    """Context: teacher in eval mode with grads enabled on θ; restores both on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.training)
        for p, f in zip(self.model.parameters(), self.flags):
            p.requires_grad_(f)


def _optimizer(params: list[dict], name: str) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params)
    return torch.optim.SGD(params, momentum=0.9)


def extract(
    teacher: nn.Module,
    x0: Tensor,
    y0: Tensor,
    cfg: ExtractConfig,
    seed: int = 0,
    callback: Callable[[ExtractEvent], None] | None = None,
    pixel_bounds: tuple[Tensor, Tensor] | None = None,
    keep_per_class: int | None = None,
    keep_zero_lambda: bool = False,
) -> DSVResult:
    """Optimise candidates and λ under the DeepKKT objective (Algorithm 1).

    Args:
        teacher: trained classifier Φ(·; θ*); never updated (its parameters are bit-identical after).
        x0: (K, C, H, W) initial candidates in normalised space (also (K, D) for tabular teachers).
        y0: (K,) int targets or (K, C) soft targets.
        cfg: optimisation settings.
        seed: seeds the augmentation draws.
        callback: receives an :class:`ExtractEvent` every ``cfg.log_every`` steps.
        pixel_bounds: per-channel (per-feature for (K, D) inputs) (lo, hi) of the valid range in normalised
            space, shape (C,) or (D,) each;
            used when ``cfg.clamp_pixels``.
        keep_per_class: trim survivors to at most this many per class (by ``cfg.keep_by``); None keeps all.
        keep_zero_lambda: also return candidates whose λ ended at 0 (generation and editing, where the
            image is the product); by default a candidate with λ = 0 supports nothing and is not a DSV.

    Returns:
        :class:`DSVResult`.

    Raises:
        FloatingPointError: when the loss becomes NaN/inf or λ diverges; the message names the step and
            the last finite loss.
    """
    if x0.shape[0] != y0.shape[0]:
        raise ValueError(f"x0 has {x0.shape[0]} candidates but y0 has {y0.shape[0]}")
    device = next(teacher.parameters()).device
    g = torch.Generator().manual_seed(seed)
    k = x0.shape[0]
    num_classes_hint = int(y0.shape[1]) if y0.dim() == 2 else None
    nnls = cfg.lam_solver == "nnls"
    with _FrozenTeacher(teacher) as model:
        x = x0.detach().clone().to(device=device, dtype=next(teacher.parameters()).dtype).requires_grad_(True)
        params = stationarity_params(model, cfg.kkt.param_subset, x.detach()[:8])
        if cfg.kkt.param_subset == "all":
            _warn_invariant(model, x.detach()[:8])
        y = y0.to(device)
        scale = cfg.lam_init if cfg.lam_init is not None else best_uniform_lambda(model, x.detach(), y, cfg.kkt.param_subset)
        # u parameterises λ = scale·u (drop/clamp/nnls) or λ = scale·softplus(u) (softplus).
        u0 = 1.0 if cfg.dual != "softplus" or nnls else math.log(math.e - 1.0)
        u = torch.full((k,), u0, device=device, dtype=x.dtype, requires_grad=True)
        groups = [{"params": [x], "lr": cfg.lr_x}] + ([] if nnls else [{"params": [u], "lr": cfg.lr_lam}])
        opt = _optimizer(groups, cfg.optimizer)
        alive = torch.ones(k, dtype=torch.bool, device=device)
        lo = hi = None
        if cfg.clamp_pixels and pixel_bounds is not None:
            lo = pixel_bounds[0].to(device).view(1, -1, *([1] * (x.dim() - 2)))
            hi = pixel_bounds[1].to(device).view(1, -1, *([1] * (x.dim() - 2)))
        d0 = _distance_at_zero(params, cfg.kkt.distance)
        theta = torch.cat([p.detach().flatten() for p in params])
        trace: list[dict[str, float]] = []
        last_finite = float("nan")
        everyone = torch.arange(k, device=device)
        drop = cfg.dual == "drop" and not nnls
        softplus = cfg.dual == "softplus" and not nnls
        for step in range(cfg.steps + 1):
            # Only the paper's drop rule changes the candidate set; the other rules need no host sync here.
            idx = alive.nonzero(as_tuple=True)[0] if drop else everyone
            if drop and idx.numel() == 0:
                break
            if nnls and step % cfg.lam_every == 0:
                with torch.no_grad():
                    gm = per_sample_grads(model, x.detach(), y, cfg.kkt.param_subset, chunk=256)
                    lam_now = solve_nnls(gm, theta, cfg.lam_steps, lam0=scale * u.detach())
                    u.copy_(lam_now / scale)
            lam_all = scale * (F.softplus(u) if softplus else u)
            if nnls:
                lam_all = lam_all.detach()
            xs, ys, lams = (x, y, lam_all) if not drop else (x[idx], y[idx], lam_all[idx])
            total, terms = kkt_objective(model, params, xs, ys, lams, cfg.kkt, g)
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss_val = float(terms.total)
                if not math.isfinite(loss_val):
                    raise FloatingPointError(
                        f"non-finite DeepKKT loss ({loss_val}) at step {step}; {_last_finite(last_finite)}"
                    )
                last_finite = loss_val
                row = _trace_row(step, terms, ys, lams, d0)
                trace.append(row)
                if callback is not None:
                    callback(ExtractEvent(step=step, total_steps=cfg.steps, metrics=row))
            if step == cfg.steps:
                break
            if nnls:
                (gx,) = torch.autograd.grad(total, [x])
                opt.zero_grad(set_to_none=True)
                x.grad = gx
            else:
                gx, gu = torch.autograd.grad(total, [x, u])
                opt.zero_grad(set_to_none=True)
                x.grad, u.grad = gx, gu
            opt.step()
            with torch.no_grad():
                if lo is not None and hi is not None:
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                if drop:
                    alive &= u >= 0
                elif cfg.dual == "clamp" and not nnls:
                    u.clamp_(min=0.0)
                # NaN compares false: test "not finite or too large" so a NaN λ cannot switch the guard off.
                if step % cfg.log_every == 0 and not bool((u.abs() <= cfg.max_lam_ratio).all()):
                    raise FloatingPointError(
                        f"λ diverged at step {step}: max λ/scale = {float(u.abs().max()):.3g} > "
                        f"{cfg.max_lam_ratio:g}; {_last_finite(last_finite)}"
                    )
        with torch.no_grad():
            lam_all = scale * (F.softplus(u) if softplus else u)
            if not keep_zero_lambda:
                alive &= lam_all > 0
            idx = alive.nonzero(as_tuple=True)[0]
            hard = (y0.argmax(1) if y0.dim() == 2 else y0).to(device)
            logits_all = model(x.detach())
            gnorm = torch.zeros(k, dtype=x.dtype, device=device)
            if idx.numel():
                gm = per_sample_grads(model, x.detach()[idx], y[idx], cfg.kkt.param_subset, chunk=256)
                gnorm[idx] = gm.norm(dim=1)
            support = lam_all * gnorm
            if keep_per_class is not None:
                idx = _trim(idx, hard, support if cfg.keep_by == "support" else lam_all, keep_per_class)
            logits = logits_all[idx] if idx.numel() else x.new_zeros((0, num_classes_hint or 1))
            ncls = logits_all.shape[1]
            counts = torch.bincount(hard[idx].cpu(), minlength=ncls).tolist()
            return DSVResult(
                x=x[idx].detach().cpu(),
                y=y0[idx.cpu()].clone(),
                lam=lam_all[idx].detach().cpu(),
                probs=F.softmax(logits, dim=1).cpu(),
                entropy=entropy_of(logits).cpu(),
                support=support[idx].cpu(),
                margin=margins(logits, hard[idx]).cpu() if idx.numel() else x.new_zeros(0).cpu(),
                source_index=idx.cpu(),
                survivors_per_class=counts,
                dropped=int((~alive).sum()),
                trace=trace,
                lam_scale=float(scale),
                dual=cfg.dual if not nnls else "nnls",
            )


def _warn_invariant(model: nn.Module, example: Tensor) -> None:
    """Warn once per model when θ = all parameters includes scale-invariant ones (no λ can fit them)."""
    names = scale_invariant_names(model, example)
    if names and id(model) not in _WARNED:
        _WARNED.add(id(model))
        warnings.warn(
            f"param_subset='all' on a normalised network: {len(names)} parameter tensors (e.g. {names[0]}) are "
            "scale-invariant, so their gradients are orthogonal to them and stationarity cannot hold for any λ; "
            "use param_subset 'free' or 'last', or a norm-free teacher (see dsv.certificate)",
            stacklevel=3,
        )


_WARNED: set[int] = set()


def _last_finite(loss: float) -> str:
    """The error-message tail naming the last finite loss, or that none was logged (failure at step 0)."""
    return f"last finite loss {loss:.6g}" if math.isfinite(loss) else "no finite loss was logged before it"


def _distance_at_zero(params: list[nn.Parameter], distance: str) -> float:
    total = sum(p.numel() for p in params)
    if distance == "l1":
        return sum(float(p.detach().abs().sum()) for p in params) / total
    return sum(float(p.detach().pow(2).sum()) for p in params) / total


def _trim(idx: Tensor, hard: Tensor, lam: Tensor, keep: int) -> Tensor:
    out = []
    for c in hard[idx].unique():
        members = idx[hard[idx] == c]
        order = lam[members].argsort(descending=True)
        out.append(members[order[:keep]])
    return torch.cat(out).sort().values if out else idx


def _trace_row(step: int, terms, y: Tensor, lam: Tensor, d0: float) -> dict[str, float]:  # noqa: ANN001
    from dsv.kkt import target_classes

    logits = terms.logits
    return {
        "step": float(step),
        "loss": float(terms.total),
        "stat": float(terms.stat),
        "primal": float(terms.primal),
        "stat_aug": float(terms.stat_aug),
        "tv": float(terms.tv),
        "norm": float(terms.norm),
        "entropy": float(entropy_of(logits).mean()),
        "acc_target": float((logits.argmax(1) == target_classes(y)).float().mean()),
        "survivors": float(lam.numel()),
        "lam_mean": float(lam.detach().mean()),
        "residual_rel": float(terms.stat) / max(d0, 1e-30),
    }
