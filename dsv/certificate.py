"""Is the teacher a KKT point? The certificate (computed by :func:`dsv.kernel.kkt_certificates`) and a
convergence phase that makes it one.

DeepKKT's stationarity condition θ* = −Σ_i λ_i ∇_θ L_i only means something when θ* is a stationary
point of the training objective. For mean cross-entropy plus weight decay ω (coupled, as torch's
Adam/SGD apply it: the gradient of (ω/2)‖θ‖²),

    ∇_θ [ (1/n) Σ_i L_i + (ω/2)‖θ‖² ] = 0   ⇔   θ* = −(1/(nω)) Σ_i ∇_θ L_i,

i.e. stationarity holds exactly with the uniform multiplier λ_i = 1/(nω) over the training set. The
**KKT certificate** is the relative l1 residual of that identity,

    c = mean_p |θ*_p + (1/ω) ∂_p mean_i L_i|  /  mean_p |θ*_p|,

0 at a KKT point, ≈ ‖∇ mean L‖/(ω‖θ‖) elsewhere: the identity divides whatever gradient training left
behind by ω, so a teacher that is merely well trained (Adam, a few epochs) has c far above 1.

:func:`converge` drives c down after training. Given frozen features, the final linear layer's problem
is strongly convex (ω > 0), so full-batch L-BFGS in float64 solves it to near machine precision
("last"); on small training sets the same can be run on every parameter ("all", non-convex, slower).

Scale invariance. An instance or group norm after a convolution (not a batch norm in eval mode, which
uses fixed statistics) makes each sample's loss invariant to that convolution's weight scale and bias, so
every ∇_θ L_i is orthogonal to those weights and no λ can rebuild them: with such a teacher the
all-parameter residual has a floor well above 0. :func:`dsv.kernel.scale_invariant_names` finds these
parameters numerically (their scaling leaves the logits unchanged), for any architecture; the θ subset
"free" excludes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dsv.checks import at_least, one_of, positive
from dsv.kernel import frozen, soft_cross_entropy
from dsv.models import final_linear

SCOPES = ("none", "last", "all")


@dataclass(frozen=True)
class ConvergeConfig:
    """The optional convergence phase after training (our addition; the paper trains with Adam only).

    Attributes:
        scope: "none" (keep the trained teacher), "last" (default when enabled: full-batch L-BFGS on the
            final linear layer given frozen features, a strongly convex problem, solved in float64) or
            "all" (full-batch L-BFGS on every parameter; for small training sets: each iteration is a
            pass over the training split).
        max_iter: L-BFGS iterations (each one or more full-batch gradient evaluations).
        target: stop once the certificate of the converged parameters is below this.
        history: L-BFGS memory.
    """

    scope: str = "none"
    max_iter: int = 500
    target: float = 1e-6
    history: int = 50

    def __post_init__(self) -> None:
        one_of("scope", self.scope, SCOPES)
        at_least(self, 1, "max_iter")
        positive(self, "target")
        at_least(self, 1, "history")


@dataclass
class ConvergeResult:
    """What :func:`converge` did: iterations run and the objective's gradient norm per iteration."""

    scope: str
    iterations: int = 0
    grad_norms: list[float] = field(default_factory=list)


def converge(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    weight_decay: float,
    cfg: ConvergeConfig,
    batch_size: int = 1024,
    callback: Callable[[int, float], None] | None = None,
) -> ConvergeResult:
    """Drive ∇[mean CE + (ω/2)‖θ‖²] toward zero with full-batch L-BFGS; modifies ``model`` in place.

    Args:
        model: the trained teacher; evaluated in eval mode (restored after).
        x: (n, ...) its whole training split (normalised); y: (n,) labels.
        weight_decay: ω (> 0; the objective must be the one the certificate checks).
        cfg: scope and budget.
        batch_size: samples per forward for the "all" scope and the feature pass.
        callback: called with (iteration, gradient norm) after every L-BFGS iteration.
    """
    if cfg.scope == "none":
        return ConvergeResult(scope="none")
    if not weight_decay > 0:
        raise ValueError(f"converge needs the teacher's weight decay > 0 (the objective's ω), got {weight_decay}")
    with frozen(model):
        if cfg.scope == "last":
            return _converge_last(model, x, y, weight_decay, cfg, batch_size, callback)
        return _converge_all(model, x, y, weight_decay, cfg, batch_size, callback)


def _features(model: nn.Module, layer: nn.Linear, x: Tensor, batch_size: int) -> Tensor:
    """Inputs of ``layer`` for every sample, (n, D), captured with a forward hook."""
    parts: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inp, _out: parts.append(inp[0].detach().flatten(1)))
    device = layer.weight.device
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                model(x[i : i + batch_size].to(device=device, dtype=layer.weight.dtype))
    finally:
        handle.remove()
    return torch.cat(parts)


def _lbfgs(
    params: Sequence[Tensor], objective: Callable[[], Tensor], cfg: ConvergeConfig, omega: float, scope: str,
    callback: Callable[[int, float], None] | None, round_iters: int = 25,
) -> ConvergeResult:
    """Full-batch L-BFGS (strong-Wolfe line search) in rounds of ``round_iters`` iterations inside one
    ``step`` call each (torch's L-BFGS is built for that: stepping it one iteration per call stalls), up to
    ``cfg.max_iter`` iterations, stopping between rounds once the certificate of ``params`` is surely below
    ``cfg.target``: mean|∇f|/ω / mean|θ| ≤ ‖∇f‖₁/(ω‖θ‖₁) ≤ √P‖∇f‖₂/(ω‖θ‖₁)."""
    res = ConvergeResult(scope=scope)
    done = 0
    root_p, theta_l1 = sum(p.numel() for p in params) ** 0.5, float(sum(p.detach().abs().sum() for p in params))
    while done < cfg.max_iter:
        n = min(round_iters, cfg.max_iter - done)
        opt = torch.optim.LBFGS(list(params), lr=1.0, max_iter=n, history_size=cfg.history,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-300, tolerance_change=1e-300)

        def closure(o: torch.optim.LBFGS = opt) -> Tensor:
            o.zero_grad(set_to_none=True)
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
        ran = int(opt.state[opt._params[0]].get("n_iter", n))
        closure()  # the gradient at the final point
        gn = sum(float((p.grad.detach() ** 2).sum()) for p in params if p.grad is not None) ** 0.5
        done += max(ran, 1)
        res.iterations, res.grad_norms = done, [*res.grad_norms, gn]
        if callback is not None:
            callback(done, gn)
        if gn != gn or gn == float("inf"):
            raise FloatingPointError(f"converge: non-finite gradient norm after {done} L-BFGS iterations")
        if root_p * gn / (omega * max(theta_l1, 1e-30)) < cfg.target or ran < n:  # converged, or L-BFGS found no progress (floating-point floor)
            break
    return res


def _converge_last(
    model: nn.Module, x: Tensor, y: Tensor, omega: float, cfg: ConvergeConfig, batch_size: int,
    callback: Callable[[int, float], None] | None,
) -> ConvergeResult:
    _, layer = final_linear(model)
    h = _features(model, layer, x, batch_size).double()  # (n, D)
    yt = y.to(h.device)
    w = layer.weight.detach().double().clone().requires_grad_(True)  # (C, D)
    b = (layer.bias.detach().double().clone() if layer.bias is not None
         else torch.zeros(w.shape[0], dtype=torch.float64, device=h.device)).requires_grad_(layer.bias is not None)
    ps = [w, b] if layer.bias is not None else [w]

    def objective() -> Tensor:
        logits = h @ w.t() + b
        return soft_cross_entropy(logits, yt).mean() + 0.5 * omega * sum((p * p).sum() for p in ps)

    res = _lbfgs(ps, objective, cfg, omega, "last", callback)
    with torch.no_grad():
        layer.weight.copy_(w.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(b.to(layer.bias.dtype))
    return res


def _converge_all(
    model: nn.Module, x: Tensor, y: Tensor, omega: float, cfg: ConvergeConfig, batch_size: int,
    callback: Callable[[int, float], None] | None,
) -> ConvergeResult:
    ps = [p for p in model.parameters() if p.requires_grad]
    device = ps[0].device
    n = x.shape[0]

    def objective() -> Tensor:
        # Full-batch loss; the graph of one batch is freed before the next (gradients accumulate).
        total = torch.zeros((), dtype=ps[0].dtype, device=device)
        for i in range(0, n, batch_size):
            xb = x[i : i + batch_size].to(device=device, dtype=ps[0].dtype)
            part = soft_cross_entropy(model(xb), y[i : i + batch_size].to(device)).sum() / n
            if i + batch_size < n:
                part.backward()
                total = total + part.detach()
            else:
                total = total + part
        return total + 0.5 * omega * sum((p * p).sum() for p in ps)

    return _lbfgs(ps, objective, cfg, omega, "all", callback)
