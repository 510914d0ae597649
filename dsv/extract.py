"""Deep Support Vector synthesis (paper §4, Algorithm 1). Generation and editing: :mod:`dsv.generate`.

:func:`extract_shard` is the whole job of one shard: draw the candidates of an init kind (real images, a
selector's picks, foreign images or noise), take the shard's slice, warm the teacher-only starts up with the
generator recipe, and run :func:`extract`, the DeepKKT optimisation.

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

from dsv.baselines import SELECTOR_INPUTS, SELECTORS, random_select
from dsv.checks import at_least, one_of, positive
from dsv.generate import GenerateConfig, generate_images, noise_start
from dsv.kernel import (
    LAM_SOLVERS,
    entropy,
    frozen,
    margins,
    per_sample_grads,
    scale_invariant_names,
    soft_cross_entropy,
    solve_nnls,
    stationarity_params,
    target_classes,
    uniform_lambda,
)
from dsv.kkt import KKTConfig, KKTTerms, kkt_objective
from dsv.train import OPTIMIZERS, predict_logits

DUALS = ("drop", "clamp", "softplus")
KEEP_BY = ("support", "lambda")
# Real images picked by a core-set selector of dsv.baselines that works on the teacher's features (and logits);
# "random" is not among them: "nshot" is that draw.
SELECTOR_INITS: tuple[str, ...] = ("herding", "kcenter", "kkt_herding")
INITS: tuple[str, ...] = ("nshot", "0shot", "noise", *SELECTOR_INITS)
# Inits that use no real image of the task: the generator warm-up applies to them.
TEACHER_ONLY: tuple[str, ...] = ("0shot", "noise")


@dataclass(frozen=True)
class ExtractConfig:
    """Optimisation of candidates and multipliers (everything the paper leaves unreported is here).

    Attributes:
        steps: optimisation steps. Unreported in the paper.
        lr_x: learning rate of the candidates (normalised input units). Unreported; draft notes say 1e-3.
        lr_lam: learning rate of λ, relative to its scale s (see module docstring). Draft notes say 0.1
            (absolute); relative 1.0 lets λ grow far beyond its initial scale within the step budget, as the
            stationarity term needs (at 0.1 its residual barely moves).
        optimizer: "adam" or "sgd" (momentum 0.9) for both x and λ. Unreported; Adam chosen.
        lam_init: initial λ for every candidate; None = the best uniform λ for the initial candidates.
        dual: how λ ≥ 0 is enforced. "drop" = the paper's Algorithm 1 (a candidate whose λ turns
            negative is discarded); "clamp" (λ projected to 0, candidate kept; the shipped default, a
            deviation: the paper's rules drop most candidates, and students of the survivors score far lower,
            benchmarks/results/ablation-fashion_mnist.md) and "softplus" (λ = softplus(ρ), also a deviation).
        lam_solver: "adam" (λ = s·u optimised jointly with x by ``optimizer``, with ``lr_lam``; the dual
            rule applies) or "nnls" (every ``lam_every`` steps λ is set to the exact solution of the
            non-negative least-squares problem min_{λ≥0} ‖θ* + Σ_i λ_i ∇_θ L_i‖² for the current
            candidates, warm-started from the current λ; x then follows the gradient of L_stat at that
            λ: λ ≥ 0 by construction, no learning rate, no drift).
        lam_every: steps between two NNLS solves ("nnls" only).
        lam_steps: iterations of one NNLS solve ("nnls" only).
        spare: extra candidates per class as a multiple of IPC (used by :func:`init_candidates`:
            IPC·(1 + spare) are optimised); the IPC returned per class are chosen as :func:`extract` says.
        keep_by: how candidates with λ > 0 are ranked for the IPC returned per class: "support" (largest
            support score λ_i·‖∇_θ L_i‖, see :mod:`dsv.lam`) or "lambda" (largest λ, the paper's ranking).
        target_mix: per-candidate targets (our addition, for candidates without real images): each candidate's
            hard target y_i is optimised as (1 − δ_i)·e_{y_i} + δ_i·e_{c_i}, δ_i ~ U(0, ``target_mix``) and c_i a
            random other class, drawn once, so the candidates of a class settle at different places; their label
            stays y_i (< 0.5 keeps y_i the argmax). 0 = off; hard targets only.
        repair_steps: after the optimisation, a candidate the teacher does not classify as its target gets
            at most this many steps of plain cross-entropy descent on x alone (learning rate ``lr_x``),
            stopping as soon as it is (primal feasibility); 0 = no repair.
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
    target_mix: float = 0.0
    repair_steps: int = 100
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
        at_least(self, 0, "spare", "repair_steps")
        at_least(self, 1, "log_every")
        positive(self, "max_lam_ratio")
        if not 0.0 <= self.target_mix < 0.5:
            raise ValueError(f"target_mix must be in [0, 0.5), got {self.target_mix}")


@dataclass(frozen=True)
class ExtractEvent:
    """Progress of :func:`extract`, passed to its callback every ``log_every`` steps."""

    step: int
    total_steps: int
    metrics: dict[str, float]


@dataclass
class DSVResult:
    """The deep support vectors, with diagnostics (see :func:`extract` for how they are chosen).

    Attributes:
        x: (M, C, H, W) DSVs in normalised input space.
        y: (M,) int targets or (M, C) soft targets.
        lam: (M,) multipliers λ (≥ 0; 0 for a candidate that filled a class's place without supporting θ*).
        support: (M,) support scores λ_i·‖∇_θ L_i‖ (θ = the stationarity subset).
        margin: (M,) teacher margin towards the (hard) target: its logit minus the largest other.
        probs: (M, C) teacher probabilities.
        entropy: (M,) teacher prediction entropy (nats).
        source_index: (M,) index of each DSV in the initial candidate tensor.
        per_class: DSVs returned per (hard) target class.
        dropped: candidates the paper's dual rule ("drop") discarded during the optimisation.
        lambda_zero: returned DSVs with λ = 0 (or dropped by the dual rule): they fill their class's places
            because fewer candidates than asked for ended with λ > 0.
        repaired: candidates the final primal repair moved into their target class.
        infeasible: returned DSVs the teacher still does not classify as their target (0 unless the repair
            failed and the class had no feasible candidate left).
        trace: one dict per logged step (step, loss, stat, primal, stat_aug, primal_aug, tv, norm, entropy,
            acc_target, survivors, lam_mean, residual_l2).
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
    per_class: list[int]
    dropped: int
    lambda_zero: int
    repaired: int
    infeasible: int
    trace: list[dict[str, float]]
    lam_scale: float
    dual: str


def init_candidates(
    kind: str,
    per_class: int,
    num_classes: int,
    in_shape: tuple[int, ...],
    generator: torch.Generator,
    real_x: Tensor | None = None,
    real_y: Tensor | None = None,
    other_x: Tensor | None = None,
    features: Tensor | None = None,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Initial candidates, ``per_class`` of each class, class 0 first.

    Args:
        kind: "nshot" (a random draw of real images: :func:`dsv.baselines.random_select`, so the same
            generator seed gives the random core-set's images), a selector of :data:`SELECTOR_INITS` (the
            real images that core-set method picks, e.g. "herding": DSVs refine the best selection), "0shot"
            (images of another dataset ``other_x``, already shaped like ``in_shape`` and normalised; no real
            image of the task is used) or "noise" (standard normal in normalised space).
        per_class: candidates per class (IPC·(1 + spare), rounded up). A selector's first IPC picks are
            its IPC-image core-set (greedy and random orders are prefix-stable).
        num_classes: C.
        in_shape: (C, H, W) of one input.
        generator: the only source of randomness.
        real_x, real_y: the real pool for "nshot" and the selectors (normalised).
        other_x: the foreign pool for "0shot" (normalised, shape (N, *in_shape)).
        features, logits: the teacher's (N, D) features / (N, C) logits of ``real_x``, for the selectors
            that need them (:data:`dsv.baselines.SELECTOR_INPUTS`).

    Returns:
        (x0 (K, *in_shape), y0 (K,) int64), K = per_class·C.
    """
    y0 = torch.arange(num_classes).repeat_interleave(per_class)
    if kind == "nshot" or kind in SELECTOR_INITS:
        if real_x is None or real_y is None:
            raise ValueError(f"init {kind!r} needs real images (real_x, real_y)")
        if kind == "nshot":
            idx = random_select(real_y, per_class, num_classes, generator)
        else:
            given = {"features": features, "logits": logits}
            missing = [n for n in SELECTOR_INPUTS[kind] if given[n] is None]
            if missing:
                raise ValueError(f"init {kind!r} needs the teacher's {' and '.join(missing)} of the real images")
            idx = SELECTORS[kind](y=real_y.cpu(), k=per_class, num_classes=num_classes, generator=generator,
                                  features=features, logits=logits)
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


@dataclass(frozen=True)
class Shard:
    """One DeepKKT problem: a stratified slice of the candidates of init kind ``init`` at IPC ``ipc``, with about
    ipc/shards candidates of every class (each shard is a complete problem and the shards' DSVs concatenate)."""

    init: str
    ipc: int
    shard: int
    shards: int

    @property
    def per_class(self) -> int:
        """This shard's share of the IPC (the first ``ipc % shards`` shards take one more)."""
        return self.ipc // self.shards + (1 if self.shard < self.ipc % self.shards else 0)

    @property
    def tag(self) -> str:
        return f"{self.init}_ipc{self.ipc}_shard{self.shard}"


def shard_seed(base: int, *parts: int) -> int:
    """A deterministic seed per (init, IPC, shard), independent of Python's hash randomisation."""
    h = base
    for p in parts:
        h = (h * 1_000_003 + p) % (2**31 - 1)
    return h


def extract_shard(
    teacher: nn.Module,
    shard: Shard,
    cfg: ExtractConfig,
    num_classes: int,
    in_shape: tuple[int, ...],
    seed: int = 0,
    *,
    real: tuple[Tensor, Tensor] | None = None,
    pool: Tensor | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    warmup: GenerateConfig | None = None,
    callback: Callable[[ExtractEvent], None] | None = None,
) -> DSVResult:
    """The DSVs of one shard: its candidates, warmed up (teacher-only inits) and optimised by :func:`extract`.

    The candidates of one (init, IPC) are drawn at once (IPC·(1 + ``cfg.spare``) per class, seeded) and then
    sliced, so the result does not depend on which process runs which shard. Real images are drawn as the
    core-set selectors draw them (a generator seeded with ``seed``): "nshot" with ``seed`` = the random row's seed
    starts from its images, and a selector init from that selector's picks. Teacher-only inits draw from
    :func:`shard_seed` (seed, init, IPC) and, with ``warmup``, are first inverted with that generator recipe
    (noise drawn at its coarsest grid, :func:`dsv.generate.noise_start`); images only.

    Args:
        teacher: the trained classifier (frozen).
        shard: which problem.
        cfg: the DeepKKT solver for this init kind.
        num_classes, in_shape: C and one input's shape.
        seed: the extraction seed.
        real: (x, y) the normalised real training split, for "nshot" and the selector inits.
        pool: (N, *in_shape) normalised images of another dataset, for "0shot".
        bounds: per-channel (lo, hi) of the valid range in normalised space (see :func:`extract`).
        warmup: the generator recipe of the teacher-only inits; None = DeepKKT from the raw starts.
        callback: receives the DeepKKT progress.

    Raises:
        FloatingPointError: when the optimisation diverges; the message names the shard.
    """
    device = next(teacher.parameters()).device
    real_x, real_y = real if real is not None else (None, None)
    kinds = [Shard(shard.init, shard.ipc, s, shard.shards) for s in range(shard.shards)]
    widths = [math.ceil(k.per_class * (1.0 + cfg.spare)) for k in kinds]
    total = sum(widths)
    kind = INITS.index(shard.init) if shard.init in INITS else -1  # init_candidates names an unknown kind
    g = torch.Generator().manual_seed(shard_seed(seed, kind, shard.ipc) if shard.init in TEACHER_ONLY else seed)
    features = logits = None
    if shard.init in SELECTOR_INITS and real_x is not None:  # the teacher's view of the real images
        needs = SELECTOR_INPUTS[shard.init]
        features = predict_logits(teacher, real_x, batch_size=256, embed=True) if "features" in needs else None
        logits = predict_logits(teacher, real_x) if "logits" in needs else None
    warm = warmup if shard.init in TEACHER_ONLY and len(in_shape) == 3 else None
    if shard.init == "noise" and warm is not None:
        y0 = torch.arange(num_classes).repeat_interleave(total)
        x0 = noise_start(y0.numel(), in_shape, warm, g)
    else:
        x0, y0 = init_candidates(shard.init, total, num_classes, in_shape, g, real_x, real_y, pool, features, logits)
    start = sum(widths[: shard.shard])
    keep = torch.cat([torch.arange(k * total + start, k * total + start + widths[shard.shard])
                      for k in range(num_classes)])
    x0, y0 = x0[keep], y0[keep]
    run_seed = shard_seed(seed, kind, shard.ipc, shard.shard)
    if warm is not None:
        x0 = generate_images(teacher, x0.to(device), y0.to(device), warm, seed=run_seed, pixel_bounds=bounds).x
    try:
        return extract(teacher, x0.to(device), y0.to(device), cfg, seed=run_seed, callback=callback,
                       pixel_bounds=bounds, keep_per_class=shard.per_class)
    except FloatingPointError as exc:  # the step and the last finite loss are named; the user needs the problem too
        raise FloatingPointError(f"extract shard {shard.shard + 1}/{shard.shards} (init {shard.init}, IPC "
                                 f"{shard.ipc}, {shard.per_class} per class) diverged: {exc}") from exc


def extract(
    teacher: nn.Module,
    x0: Tensor,
    y0: Tensor,
    cfg: ExtractConfig,
    seed: int = 0,
    callback: Callable[[ExtractEvent], None] | None = None,
    pixel_bounds: tuple[Tensor, Tensor] | None = None,
    keep_per_class: int | None = None,
) -> DSVResult:
    """Optimise candidates and λ under the DeepKKT objective (Algorithm 1), then return IPC DSVs per class.

    After the optimisation, every candidate the teacher does not classify as its target is repaired
    (``cfg.repair_steps``). Each class then returns ``keep_per_class`` candidates (all when None), chosen in
    this order: feasible candidates with λ > 0 by ``cfg.keep_by``; then feasible candidates with λ = 0 (or
    dropped by the paper's dual rule) by the teacher's margin; then infeasible ones by margin. So a class is
    never emptied and a distilled set always has IPC images per class; how many places were filled by
    λ = 0 candidates is reported (``lambda_zero``), as the paper asks for the survivors.

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
        keep_per_class: DSVs returned per class (at most the candidates of that class); None returns all.

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
    nnls = cfg.lam_solver == "nnls"
    with frozen(teacher, grad=True) as model:
        x = x0.detach().clone().to(device=device, dtype=next(teacher.parameters()).dtype).requires_grad_(True)
        params = stationarity_params(model, cfg.kkt.param_subset, x.detach()[:8])
        if cfg.kkt.param_subset == "all":
            _warn_invariant(model, x.detach()[:8])
        y = y0.to(device)
        if cfg.target_mix > 0 and y0.dim() == 1:
            with torch.no_grad():
                num_classes = int(model(x.detach()[:1]).shape[1])
            y = _mixed_targets(y0, cfg.target_mix, g, num_classes).to(device)
        scale = cfg.lam_init if cfg.lam_init is not None else uniform_lambda(model, x.detach(), y, cfg.kkt.param_subset)
        # u parameterises λ = scale·u (drop/clamp/nnls) or λ = scale·softplus(u) (softplus).
        u0 = 1.0 if cfg.dual != "softplus" or nnls else math.log(math.e - 1.0)
        u = torch.full((k,), u0, device=device, dtype=x.dtype, requires_grad=True)
        groups = [{"params": [x], "lr": cfg.lr_x}] + ([] if nnls else [{"params": [u], "lr": cfg.lr_lam}])
        opt = torch.optim.Adam(groups) if cfg.optimizer == "adam" else torch.optim.SGD(groups, momentum=0.9)
        alive = torch.ones(k, dtype=torch.bool, device=device)
        lo = hi = None
        if cfg.clamp_pixels and pixel_bounds is not None:
            lo = pixel_bounds[0].to(device).view(1, -1, *([1] * (x.dim() - 2)))
            hi = pixel_bounds[1].to(device).view(1, -1, *([1] * (x.dim() - 2)))
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
                row = _trace_row(step, terms, ys, lams)
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
            lam_all = (scale * (F.softplus(u) if softplus else u)).clamp_min(0) * alive
        hard = (y0.argmax(1) if y0.dim() == 2 else y0).to(device)
        xf = x.detach()
        repaired = _repair(model, xf, y, hard, cfg, lo, hi)
        with torch.no_grad():
            logits_all = model(xf)
            feasible = logits_all.argmax(1) == hard
            margin_all = margins(logits_all, hard)
            positive_idx = (lam_all > 0).nonzero(as_tuple=True)[0]
            gnorm = torch.zeros(k, dtype=x.dtype, device=device)
            if positive_idx.numel():
                gm = per_sample_grads(model, xf[positive_idx], y[positive_idx], cfg.kkt.param_subset, chunk=256)
                gnorm[positive_idx] = gm.norm(dim=1)
            support = lam_all * gnorm
            # Rank within class: tier (0: feasible with λ > 0, 1: feasible, 2: infeasible), then the score.
            tier = torch.where(feasible, torch.where(lam_all > 0, 0, 1), 2)
            score = torch.where(tier == 0, support if cfg.keep_by == "support" else lam_all, margin_all)
            idx = _choose(hard, tier, score, keep_per_class)
            logits = logits_all[idx]
            ncls = logits_all.shape[1]
            return DSVResult(
                x=xf[idx].cpu(),
                y=y0[idx.cpu()].clone(),
                lam=lam_all[idx].cpu(),
                probs=F.softmax(logits, dim=1).cpu(),
                entropy=entropy(logits).cpu(),
                support=support[idx].cpu(),
                margin=margin_all[idx].cpu(),
                source_index=idx.cpu(),
                per_class=torch.bincount(hard[idx].cpu(), minlength=ncls).tolist(),
                dropped=int((~alive).sum()),
                lambda_zero=int((lam_all[idx] == 0).sum()),
                repaired=repaired,
                infeasible=int((~feasible[idx]).sum()),
                trace=trace,
                lam_scale=float(scale),
                dual=cfg.dual if not nnls else "nnls",
            )


def _mixed_targets(y0: Tensor, mix: float, g: torch.Generator, num_classes: int) -> Tensor:
    """Hard targets (K,) as per-candidate soft targets (K, C) mixed toward a random other class (see
    ``ExtractConfig.target_mix``)."""
    delta = torch.rand(y0.shape[0], generator=g) * mix
    other = (y0.cpu() + torch.randint(1, num_classes, (y0.shape[0],), generator=g)) % num_classes
    eye = torch.eye(num_classes)
    return ((1 - delta)[:, None] * eye[y0.cpu()] + delta[:, None] * eye[other]).to(y0.device)


def _repair(model: nn.Module, x: Tensor, y: Tensor, hard: Tensor, cfg: ExtractConfig, lo: Tensor | None,
            hi: Tensor | None) -> int:
    """Move the candidates the teacher misclassifies into their target class, in place (primal feasibility).

    Plain cross-entropy descent on those candidates alone (Adam, ``cfg.lr_x``, pixel bounds kept); a candidate
    stops moving as soon as the teacher gives its target. Returns how many were misclassified and are not any
    more.
    """
    with torch.no_grad():
        bad = (model(x).argmax(1) != hard).nonzero(as_tuple=True)[0]
    if bad.numel() == 0 or cfg.repair_steps == 0:
        return 0
    xr = x[bad].clone().requires_grad_(True)
    yr, hr = y[bad], hard[bad]
    opt = torch.optim.Adam([xr], lr=cfg.lr_x)
    for _ in range(cfg.repair_steps):
        logits = model(xr)
        done = logits.argmax(1) == hr
        if bool(done.all()):
            break
        loss = (soft_cross_entropy(logits, yr) * (~done)).sum()
        (gx,) = torch.autograd.grad(loss, [xr])
        kept = xr.detach().clone()
        opt.zero_grad(set_to_none=True)
        xr.grad = gx
        opt.step()
        with torch.no_grad():
            xr[done] = kept[done]  # Adam's momentum would move a finished candidate on
            if lo is not None and hi is not None:
                xr.copy_(torch.maximum(torch.minimum(xr, hi), lo))
    with torch.no_grad():
        fixed = model(xr).argmax(1) == hr
        x[bad[fixed]] = xr.detach()[fixed]
    return int(fixed.sum())


def _choose(hard: Tensor, tier: Tensor, score: Tensor, keep: int | None) -> Tensor:
    """Per class, the ``keep`` candidates of lowest tier and, within a tier, highest score (all when None);
    returned sorted by index. Ties keep index order (a stable sort)."""
    out = []
    for c in hard.unique():
        members = (hard == c).nonzero(as_tuple=True)[0]
        by_score = members[torch.sort(score[members], descending=True, stable=True).indices]
        ranked = by_score[torch.sort(tier[by_score], stable=True).indices]
        out.append(ranked if keep is None else ranked[:keep])
    return torch.cat(out).sort().values if out else hard.new_zeros(0)


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


def _trace_row(step: int, terms: KKTTerms, y: Tensor, lam: Tensor) -> dict[str, float]:
    logits = terms.logits
    return {
        "step": float(step),
        "loss": float(terms.total),
        "stat": float(terms.stat),
        "primal": float(terms.primal),
        "stat_aug": float(terms.stat_aug),
        "primal_aug": float(terms.primal_aug),
        "tv": float(terms.tv),
        "norm": float(terms.norm),
        "entropy": float(entropy(logits).mean()),
        "acc_target": float((logits.argmax(1) == target_classes(y)).float().mean()),
        "survivors": float(lam.numel()),
        "lam_mean": float(lam.detach().mean()),
        "residual_l2": float(terms.residual),
        "repel": float(terms.repel),
    }
