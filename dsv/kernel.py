"""The λ/gradient kernel: what extraction, λ fitting, the certificate and generation compute on a frozen classifier.

* :func:`frozen`: the model in eval mode with chosen ``requires_grad`` flags, both restored on exit;
* per-sample losses and scores: :func:`soft_cross_entropy`, :func:`margins`, :func:`entropy`,
  :func:`target_classes`;
* θ and its gradients: :func:`stationarity_params` ("all", "last", "free"), :func:`weighted_grad_sum`
  (Σ_i λ_i ∇_θ L_i as one backward), :func:`per_sample_grads` (G, one row per sample),
  :func:`full_batch_grad` (∇_θ of the mean loss over a dataset);
* the stationarity residual r = θ* + Σ_i λ_i ∇_θ L_i: :func:`stationarity_distance` (D of Eq. 8),
  :func:`relative_residual` (‖r‖₂/‖θ*‖₂, the one unit every trace reports), :func:`uniform_lambda` (the best
  common λ, in closed form), :func:`solve_nnls` (the exact λ ≥ 0 of the l2 problem);
* :func:`kkt_certificates`: the relative l1 residual at the uniform λ = 1/(nω) of a teacher trained with weight
  decay ω (0 at a KKT point; see :mod:`dsv.certificate`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dsv.models import final_linear

PARAM_SUBSETS = ("all", "last", "free")
DISTANCES = ("l1", "l2")
LAM_SOLVERS = ("adam", "nnls")  # λ ≥ 0 by projected Adam on the distance, or exactly (:func:`solve_nnls`)


@contextlib.contextmanager
def frozen(model: nn.Module, grad: bool | Iterable[nn.Parameter] | None = None) -> Iterator[nn.Module]:
    """Context: ``model`` in eval mode (a BatchNorm uses, never updates, its running statistics); with ``grad``
    True/False every parameter's ``requires_grad`` set so, with an iterable exactly those parameters requiring
    grad; None leaves the flags. The mode and the flags are restored on exit, whatever happens inside."""
    was = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    if grad is not None:
        chosen = None if isinstance(grad, bool) else {id(p) for p in grad}
        for p in model.parameters():
            p.requires_grad_(bool(grad) if chosen is None else id(p) in chosen)
    try:
        yield model
    finally:
        model.train(was)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# ------------------------------------------------------------------------------------ per-sample scores


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy for hard (N,) int or soft (N, C) probability targets. Returns (N,)."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target, reduction="none")
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


def target_classes(y: Tensor) -> Tensor:
    """Hard class of each target: y itself for (K,) labels, argmax for (K, C) soft labels."""
    return y if y.dim() == 1 else y.argmax(dim=1)


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Logit of the true class minus the largest other logit, (N,) (negative = misclassified)."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).max(dim=1).values
    return true - other


def entropy(logits: Tensor) -> Tensor:
    """Prediction entropy in nats of (K, C) logits, (K,)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


# ------------------------------------------------------------------------------------------- θ and ∇θ


def scale_invariant_names(model: nn.Module, example: Tensor, rtol: float = 1e-2) -> list[str]:
    """Names of parameters whose scaling (×1.5) leaves the logits on ``example`` unchanged.

    Such parameters (a conv's weight and bias before an instance/group norm) get gradients orthogonal
    to themselves, so stationarity over them cannot hold for any λ. The model is evaluated in eval mode
    and never modified.

    Args:
        model: the classifier.
        example: (B, ...) a few inputs (real or random) of the model's input shape.
        rtol: largest relative logit change, max|Δ| / max|logits|, still counted as invariant (the norm's
            eps makes the invariance approximate, far below the change of a parameter the logits depend on).
    """
    with frozen(model), torch.no_grad():
        base = model(example)
        scale = base.abs().max().clamp_min(1e-12)
        out = []
        for name, p in model.named_parameters():
            if p.abs().max() == 0:
                continue  # a zero tensor scales to itself: nothing to learn from the probe
            moved = functional_call(model, {name: p * 1.5}, (example,))
            if float((moved - base).abs().max() / scale) < rtol:
                out.append(name)
        return out


def stationarity_params(model: nn.Module, subset: str = "all", example: Tensor | None = None) -> list[nn.Parameter]:
    """The parameters θ the stationarity condition is imposed on.

    Args:
        model: the teacher.
        subset: "all"; "last" (the final linear layer, found by structure: the last ``nn.Linear``); or
            "free" (every parameter except those a following instance/group norm makes scale-invariant,
            found numerically by :func:`scale_invariant_names`; needs ``example``).
        example: (B, ...) a few inputs, for "free".
    """
    if subset == "last":
        _, layer = final_linear(model)
        return [p for p in layer.parameters()]
    if subset == "free":
        if example is None:
            raise ValueError("param_subset='free' needs example inputs to find the scale-invariant parameters")
        skip = set(scale_invariant_names(model, example))
        return [p for n, p in model.named_parameters() if n not in skip]
    if subset != "all":
        raise ValueError(f"param_subset = {subset!r} is not one of {', '.join(PARAM_SUBSETS)}")
    return [p for _, p in model.named_parameters()]


def weighted_grad_sum(params: list[nn.Parameter], losses: Tensor, lam: Tensor, create_graph: bool) -> list[Tensor]:
    """Σ_i λ_i ∇_θ L_i as one weighted backward: ∇_θ (Σ_i λ_i L_i).

    Args:
        params: θ, the parameters to differentiate.
        losses: (K,) per-candidate losses L_i, in the graph of ``params``.
        lam: (K,) multipliers λ_i.
        create_graph: keep the graph so the result can be differentiated again (w.r.t. x and λ).

    Returns:
        One tensor per parameter, shaped like it.
    """
    return list(torch.autograd.grad((lam * losses).sum(), params, create_graph=create_graph))


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor, subset: str = "all", chunk: int = 128) -> Tensor:
    """G = [∇_θ L_i]_i as an (N, P) matrix, via torch.func (vmap of grad).

    Args:
        model: classifier in eval mode.
        x: (N, ...) inputs.
        y: (N,) labels.
        subset: "all" or "last" parameters.
        chunk: samples per vmap call.
    """
    chosen = {id(p) for p in stationarity_params(model, subset, x[:8])}
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


def full_batch_grad(
    model: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor, batch_size: int | None = None
) -> list[Tensor]:
    """∇_θ of the mean cross-entropy over all of (x, y), accumulated over batches (model in eval mode).

    ``batch_size`` None: 128 on the CPU (the activations stay in cache), 1024 on an accelerator (fewer rounds of
    kernel launches); (x, y) are moved to the device once.

    Returns one tensor per parameter in ``params``, in the parameters' dtype.
    """
    device = params[0].device
    if batch_size is None:
        batch_size = 128 if device.type == "cpu" else 1024
    x, y = x.to(device), y.to(device)
    acc = [torch.zeros_like(p) for p in params]
    n = x.shape[0]
    with frozen(model), torch.enable_grad():
        for i in range(0, n, batch_size):
            xb = x[i : i + batch_size].to(device=device, dtype=params[0].dtype)
            loss = soft_cross_entropy(model(xb), y[i : i + batch_size].to(device)).sum() / n
            for a, g in zip(acc, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    a.add_(g)
    return acc


# --------------------------------------------------------------------------- the stationarity residual


def stationarity_distance(theta: Sequence[Tensor], grad_sum: Sequence[Tensor], distance: str = "l1") -> Tensor:
    """D(θ*, −Σλ∇L) of Eq. 8, averaged over all parameter entries.

    The residual is r = θ* + Σ_i λ_i ∇_θ L_i; "l1" returns mean |r|, "l2" returns mean r².
    """
    total = sum(t.numel() for t in theta)
    acc = theta[0].new_zeros(())
    for t, s in zip(theta, grad_sum):
        r = t.detach() + s
        acc = acc + (r.abs().sum() if distance == "l1" else (r * r).sum())
    return acc / total


def relative_residual(theta: Sequence[Tensor], grad_sum: Sequence[Tensor]) -> Tensor:
    """‖θ* + Σ_i λ_i ∇_θ L_i‖₂ / ‖θ*‖₂, detached: the stationarity residual in the one unit every table and
    trace reports (whatever distance the objective uses). 1 = the candidates explain none of θ*; 0 = exact.
    For a gradient matrix G (m, P) and flat θ (P,), pass ``[theta], [G.t() @ lam]``."""
    with torch.no_grad():  # tensors only: no host sync inside an optimisation loop
        num = torch.stack([(t + s).pow(2).sum() for t, s in zip(theta, grad_sum)]).sum()
        den = torch.stack([t.pow(2).sum() for t in theta]).sum()
        return (num / den.clamp_min(1e-30)).sqrt()


def uniform_lambda(model: nn.Module, x: Tensor, y: Tensor, subset: str = "all") -> float:
    """The scalar c minimising ‖θ* + c·Σ_i ∇_θ L_i‖² (closed form), floored at a tiny positive value: the λ every
    candidate would share if all had the same multiplier; it sets the scale of λ (``model`` frozen, in eval mode).
    When the gradients point away from θ* on average, it falls back to the weight-decay scale 1/K."""
    params = stationarity_params(model, subset, x[:8])
    losses = soft_cross_entropy(model(x), y)
    g = weighted_grad_sum(params, losses, torch.ones_like(losses), create_graph=False)
    num = -sum(float((p.detach() * gi).sum()) for p, gi in zip(params, g))
    den = sum(float((gi * gi).sum()) for gi in g)
    c = num / den if den > 0 else 0.0
    if not math.isfinite(c) or c <= 0:
        c = 1.0 / max(x.shape[0], 1)
    return c


def solve_nnls(
    g: Tensor, theta: Tensor, steps: int = 300, lam0: Tensor | None = None, tol: float = 1e-10,
    polish: int | None = None,
) -> Tensor:
    """min_{λ ≥ 0} ½‖θ + Gᵀλ‖² (non-negative least squares): accelerated projected gradient, then an exact
    active-set finish.

    Works on the Gram matrix K = GGᵀ (m × m) and q = Gθ: the gradient is Kλ + q, the step 1/L with L the
    largest eigenvalue of K (so every plain projected step decreases the objective), momentum restarted
    whenever the objective would rise (O'Donoghue and Candès' adaptive restart). A solution λ* satisfies
    λ* = max(0, λ* − (Kλ* + q)/L), so started there the iteration stays there. First-order steps crawl on
    ill-conditioned K, so their result seeds Lawson and Hanson's active-set method (:func:`_active_set`), which
    ends at the exact solution in a finite number of passive-set changes.

    Args:
        g: (m, P) gradients, one row per candidate.
        theta: (P,) flattened θ*.
        steps: iteration budget of the projected gradient.
        lam0: (m,) warm start (clamped at 0); zeros when None.
        tol: stop when the projected-gradient step moves λ by less than ``tol``·(1 + ‖λ‖) in l∞.
        polish: passive-set changes allowed to the active-set finish (None: 2·m; 0: none).

    Returns:
        λ (m,), in g's dtype.
    """
    k = g @ g.t()  # (m, m)
    q = g @ theta  # (m,)
    lip = float(torch.linalg.eigvalsh(k.double())[-1]) if k.shape[0] else 0.0
    lam = torch.zeros_like(q) if lam0 is None else lam0.detach().to(q).clamp_min(0)
    if lip <= 0:
        return lam
    step = 1.0 / lip

    def f(v: Tensor) -> float:
        return float(0.5 * v @ (k @ v) + q @ v)

    z, t, f_prev = lam.clone(), 1.0, f(lam)
    for _ in range(steps):
        nxt = (z - step * (k @ z + q)).clamp_min(0)
        f_nxt = f(nxt)
        if f_nxt > f_prev:  # restart: a plain projected step from λ (monotone)
            z, t = lam.clone(), 1.0
            nxt = (lam - step * (k @ lam + q)).clamp_min(0)
            f_nxt = f(nxt)
        moved = float((nxt - lam).abs().max())
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        z = nxt + ((t - 1.0) / t_next) * (nxt - lam)
        lam, t, f_prev = nxt, t_next, f_nxt
        if moved <= tol * (1.0 + float(lam.abs().max())):
            break
    budget = 2 * k.shape[0] if polish is None else polish
    return _active_set(k.double(), q.double(), lam.double(), budget).to(lam.dtype) if budget > 0 else lam


def _active_set(k: Tensor, q: Tensor, lam: Tensor, budget: int) -> Tensor:
    """Lawson-Hanson on ½λᵀKλ + qᵀλ, λ ≥ 0 (float64), warm-started with the passive set {λ > 0}.

    Each passive-set problem K_SS λ_S = −q_S is solved with a tiny ridge (K is singular when m > P); an
    infeasible solution is stepped back to the boundary and the coordinates that hit 0 leave the set; then the
    coordinate with the most negative gradient enters, until no gradient is negative (the KKT conditions) or
    ``budget`` changes were made. Never returns a worse point than it got.
    """
    m = k.shape[0]
    ridge = 1e-12 * float(k.diagonal().abs().max().clamp_min(1e-300))
    eye = torch.eye(m, dtype=k.dtype, device=k.device)

    def value(v: Tensor) -> float:
        return float(0.5 * v @ (k @ v) + q @ v)

    start, start_value = lam.clone(), value(lam)
    passive = lam > 0
    changes = 0
    while changes <= budget:
        while True:  # the passive-set problem, stepped back inside λ ≥ 0
            idx = passive.nonzero(as_tuple=True)[0]
            z = torch.zeros_like(lam)
            if idx.numel():
                z[idx] = torch.linalg.solve(k[idx][:, idx] + ridge * eye[: idx.numel(), : idx.numel()], -q[idx])
            bad = idx[z[idx] <= 0]
            if bad.numel() == 0:
                break
            alpha = float((lam[bad] / (lam[bad] - z[bad]).clamp_min(1e-300)).min().clamp(0.0, 1.0))
            lam = (lam + alpha * (z - lam)).clamp_min(0)
            passive &= lam > 0
            passive[bad[lam[bad] <= 1e-15 * (1 + float(lam.max()))]] = False
            lam[~passive] = 0.0
            changes += 1
        lam = z
        gradient = k @ lam + q
        gradient[passive] = 0.0
        j = int(gradient.argmin())
        if float(gradient[j]) >= -1e-12 * (1.0 + float(q.abs().max())):
            break
        passive[j] = True
        changes += 1
    return lam if value(lam) <= start_value else start


# ---------------------------------------------------------------------------------------- certificate


@dataclass(frozen=True)
class Certificate:
    """KKT certificate of a teacher (see :mod:`dsv.certificate`).

    Attributes:
        relative: mean|θ* + (1/ω)∇ mean L| / mean|θ*| over the chosen parameters (0 = a KKT point).
        grad_norm: l2 norm of the full-batch gradient of mean L + (ω/2)‖θ‖² over those parameters.
        n: training samples used.
        weight_decay: ω.
        subset: the parameter subset.
    """

    relative: float
    grad_norm: float
    n: int
    weight_decay: float
    subset: str


def kkt_certificate(model: nn.Module, x: Tensor, y: Tensor, weight_decay: float, params: list[nn.Parameter],
                    subset: str = "all", batch_size: int | None = None) -> Certificate:
    """:func:`kkt_certificates` of one parameter subset (``params``, named ``subset`` in the result)."""
    return kkt_certificates(model, x, y, weight_decay, {subset: params}, batch_size)[subset]


def kkt_certificates(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    weight_decay: float,
    subsets: dict[str, list[nn.Parameter]],
    batch_size: int | None = None,
) -> dict[str, Certificate]:
    """The relative stationarity residual of θ* at uniform λ = 1/(nω), for several parameter subsets from one pass
    over the training split.

    Args:
        model: the teacher (put in eval mode for the computation, restored after; never modified).
        x: (n, ...) the teacher's whole training split, normalised as it was trained.
        y: (n,) labels.
        weight_decay: ω the teacher was trained with (> 0: without weight decay no finite λ exists).
        subsets: name -> the parameters θ to certify (see :func:`stationarity_params`).
        batch_size: samples per forward and backward (memory and speed only); None = 128 on the CPU, 1024 on an
            accelerator (:func:`full_batch_grad`).

    Raises:
        ValueError: when ``weight_decay`` is not > 0 or x is empty.
    """
    if not weight_decay > 0:
        raise ValueError(f"the KKT certificate needs the teacher's weight decay > 0, got {weight_decay}")
    if x.shape[0] == 0:
        raise ValueError("the KKT certificate needs the training split; it is empty")
    params = list(model.parameters())
    grads = {id(p): g for p, g in zip(params, full_batch_grad(model, params, x, y, batch_size))}
    out = {}
    for name, ps in subsets.items():
        num = sum(float((p.detach() + grads[id(p)] / weight_decay).abs().sum()) for p in ps)
        den = sum(float(p.detach().abs().sum()) for p in ps)
        gn = sum(float((grads[id(p)] + weight_decay * p.detach()).pow(2).sum()) for p in ps) ** 0.5
        out[name] = Certificate(relative=num / max(den, 1e-30), grad_norm=gn, n=int(x.shape[0]),
                                weight_decay=float(weight_decay), subset=name)
    return out
