"""Students trained together: S models of one architecture on one training set in a single vmapped step.

:func:`fit_batched` is :func:`dsv.train.fit` for S students at once. Their parameters are stacked
(``torch.func.stack_module_state``) and one forward (``vmap`` of ``functional_call``), one backward and one
optimizer step train them all; the loss is the sum of the students' own mean losses, so each student's
gradient is its own. Each student keeps everything :func:`dsv.train.fit` gives it: its initialisation (the
models are built by the caller, e.g. ``build_seeded(seed)``), its batch order and its augmentation draws,
taken from its own ``torch.Generator(seed)`` in the same order as ``fit`` takes them. The optimizers are
elementwise (Adam, SGD with momentum and weight decay), so updating the stacked tensors is updating each
student. What differs from training the students one after another is float reassociation in the batched
kernels: on a tiny set the losses agree to 1e-4 and the test accuracies to an image (tests/dsv/test_batched.py).

It pays where kernel launches dominate a step (a GPU: one launch per op for all students); on a CPU the
per-student loop is faster, so :mod:`dsv.protocols` uses it only on CUDA unless asked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from dsv.augment import augment_groups, parse_augment
from dsv.kernel import soft_cross_entropy
from dsv.train import (
    KD,
    FitConfig,
    FitResult,
    StepRunner,
    TrainEvent,
    _budget,
    _make_optimizer,
    batch_orders,
    run_steps,
)


def can_batch(model: nn.Module) -> bool:
    """Whether students of this architecture can be trained together: no buffers (a BatchNorm's running
    statistics would be updated in place per student) and no randomness in the forward (dropout)."""
    if any(True for _ in model.buffers()):
        return False
    return not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def fit_batched(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    cfg: FitConfig,
    seeds: Sequence[int],
    callback: Callable[[int, TrainEvent], None] | None = None,
    kd: KD | None = None,
    graphs: bool = False,
) -> list[FitResult]:
    """Train ``models`` in place on (x, y), student i as ``fit(models[i], x, y, cfg, seeds[i], ...)`` would.

    Args:
        models: S freshly initialised students of one architecture, on one device (:func:`can_batch`).
        x: (N, C, H, W) or (N, D) normalised inputs (moved to the students' device once).
        y: (N,) int labels or (N, C) soft labels.
        cfg: optimizer, schedule, augmentation, budget (shared: the same training set gives every student the
            same step count).
        seeds: one per student: its batch order and augmentation draws.
        callback: receives (student index, :class:`TrainEvent`) at every report, as ``fit``'s callback.
        kd: knowledge distillation from a teacher (``soft`` protocol), as in ``fit``.
        graphs: on CUDA, replay the step from a CUDA graph (:class:`dsv.train.StepRunner`).

    Returns:
        One :class:`FitResult` per student, in order; the models hold the trained weights, in eval mode.
    """
    s = len(models)
    if s == 0 or len(seeds) != s:
        raise ValueError(f"fit_batched needs one seed per model, got {s} models and {len(seeds)} seeds")
    n = x.shape[0]
    if n == 0:
        raise ValueError("fit got an empty training set")
    if y.shape[0] != n:
        raise ValueError(f"fit: x has {n} samples but y has {y.shape[0]}")
    for m in models:
        if not can_batch(m):
            raise ValueError(f"fit_batched: {type(m).__name__} has buffers or dropout; train it with fit")
    device = next(models[0].parameters()).device
    x, y = x.to(device), y.to(device)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    bs, _, total, report_every = _budget(n, cfg)
    aug = parse_augment(cfg.augment)
    graphs = graphs and device.type == "cuda"
    params, _ = stack_module_state(list(models))  # leaves (S, ...), in named_parameters order
    trainable = {k: v for k, v in params.items() if dict(models[0].named_parameters())[k].requires_grad}
    frozen = {k: v.detach() for k, v in params.items() if k not in trainable}
    opt = _make_optimizer(list(trainable.values()), cfg, device, graphs)
    base = copy.deepcopy(models[0]).to("meta").train()

    def forward(p: dict[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(base, p, (xb,))

    batched_forward = vmap(forward)
    if kd is not None:
        kd.teacher.eval()

    def step(xb: Tensor, yb: Tensor) -> Tensor:  # xb (S·B, ...), yb (S·B,) or (S·B, C)
        logits = batched_forward({**trainable, **frozen}, xb.reshape(s, bs, *xb.shape[1:]))  # (S, B, K)
        flat = logits.reshape(s * bs, -1)
        losses = soft_cross_entropy(flat, yb).view(s, bs).mean(dim=1)
        if kd is not None:
            with torch.no_grad():
                t_logits = kd.teacher(xb)
            t = kd.temperature
            kl = F.kl_div(F.log_softmax(flat / t, dim=1), F.softmax(t_logits / t, dim=1), reduction="none")
            losses = (1 - kd.alpha) * losses + kd.alpha * kl.sum(dim=1).view(s, bs).mean(dim=1) * (t * t)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        return losses.detach()

    order = batch_orders(n, bs, gens, device)

    def draw() -> tuple[Tensor, Tensor]:
        idx = next(order)
        xb = x.index_select(0, idx)
        return (augment_groups(xb, aug, gens) if aug.ops else xb), y.index_select(0, idx)

    results = [FitResult(model=m) for m in models]
    run_steps(draw, StepRunner(step, graphs), opt, cfg, total, report_every, results, callback)
    with torch.no_grad():
        for i, m in enumerate(models):
            for name, p in m.named_parameters():
                p.copy_(params[name][i])
            m.eval()
    return results
