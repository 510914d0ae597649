"""One trainer for the teacher and every student, and the evaluation used everywhere."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.augment import augment, parse_augment
from dsv.checks import at_least, one_of, positive
from dsv.device import to_device
from dsv.kernel import frozen, soft_cross_entropy

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "step", "cosine")


@dataclass(frozen=True)
class FitConfig:
    """How to train a classifier.

    Attributes:
        optimizer: "adam" or "sgd" (SGD uses ``momentum``).
        lr: learning rate (> 0).
        momentum: SGD momentum.
        weight_decay: L2 weight decay (coupled, as in torch's Adam/SGD). The paper's teacher uses 5e-3:
            it makes θ* a weighted sum of training gradients (see ``dsv.kkt``).
        epochs: passes over the data, ⌈n / batch⌉ steps each (:func:`epoch_steps`); ignored when ``steps`` > 0.
        steps: exact number of optimizer steps (overrides ``epochs`` and ``min_steps`` when > 0).
        min_steps: lower bound on the optimizer steps of an ``epochs`` budget, so that a small dataset (a few
            hundred images: a handful of steps per epoch) is still trained; 0 disables it.
        batch_size: minibatch size (capped at the dataset size).
        schedule: "none", "step" (lr x0.1 at half, the DD protocol) or "cosine".
        augment: the augmentation of every batch (:func:`dsv.augment.parse_augment`): "none", "flip_crop"
            (flip + 4px-style crop-pad, classifier training), "dsa" (the DD students'), or explicit ops.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    steps: int = 0
    min_steps: int = 0
    batch_size: int = 256
    schedule: str = "none"
    augment: str = "none"

    def __post_init__(self) -> None:
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("schedule", self.schedule, SCHEDULES)
        parse_augment(self.augment)
        positive(self, "lr")
        at_least(self, 0, "weight_decay")
        if self.epochs < 1 and self.steps < 1:
            raise ValueError(f"need epochs >= 1 or steps >= 1, got epochs={self.epochs}, steps={self.steps}")
        at_least(self, 0, "steps", "min_steps")
        at_least(self, 1, "batch_size")


@dataclass(frozen=True)
class KD:
    """Knowledge distillation from a teacher on every augmented batch (the ``soft`` student protocol): the loss is
    (1 − α)·CE(y) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)).

    Attributes:
        teacher: the teacher (eval mode); its logits on each batch are the soft targets.
        temperature: T (> 0).
        alpha: α in [0, 1]; 1 trains on the teacher's soft targets alone.
    """

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        positive(self, "temperature")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class TrainEvent:
    """Progress report passed to the ``callback`` of :func:`fit` once per epoch (or 1/10 of the steps)."""

    step: int
    total_steps: int
    loss: float
    lr: float


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (same object) and its loss curve."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)  # mean loss per reporting interval
    steps: int = 0
    graphed: bool = False  # the steps were replayed from a CUDA graph
    graph_error: str | None = None  # why a requested CUDA graph was not used


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton knowledge distillation: T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch."""
    t = temperature
    p = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), p, reduction="batchmean") * (t * t)


def _make_optimizer(params: list[Tensor], cfg: FitConfig, device: torch.device, graphs: bool = False
                    ) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``. On CUDA the fused kernels (one launch per step instead of one per tensor; the
    same update, bits may differ); with ``graphs`` the learning rate is a device tensor (set with
    :func:`_set_lr`) and Adam is capturable, so the step can be replayed in a CUDA graph. The CPU keeps torch's
    default implementation (its results are the reference, bit for bit)."""
    if device.type != "cuda":
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    lr: float | Tensor = torch.tensor(cfg.lr, device=device) if graphs else cfg.lr
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=graphs)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)  # in place: a captured step reads it from the same memory
        else:
            group["lr"] = lr


def _lr_at(step: int, total: int, cfg: FitConfig) -> float:
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if step >= total // 2 else 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + torch.cos(torch.tensor(torch.pi * step / max(total, 1))).item())
    return cfg.lr


def epoch_steps(n: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over ``n`` samples: ⌈n / batch⌉ with the batch capped at n, as the DD code's
    data loader counts them (the last, partial batch is a step). Every trainer counts epochs so; its batches are
    always full (fixed shapes), drawn from a fresh permutation whenever the current one runs out."""
    return max(1, math.ceil(n / min(batch_size, n)))


def _budget(n: int, cfg: FitConfig) -> tuple[int, int, int, int]:
    """(batch size, steps per epoch, total steps, steps between reports) for ``n`` training samples."""
    bs = min(cfg.batch_size, n)
    per_epoch = epoch_steps(n, bs)
    total = cfg.steps if cfg.steps > 0 else max(cfg.epochs * per_epoch, cfg.min_steps)
    report_every = per_epoch if cfg.steps <= 0 else max(1, total // 10)
    return bs, per_epoch, total, report_every


class StepRunner:
    """Runs a training step ``step(xb, yb) -> detached loss``: eagerly, or on CUDA with ``graphs`` captured once
    into a CUDA graph (after ``warmup`` eager steps that create the optimizer state) and then replayed on static
    copies of the batch, so a step costs one launch instead of one per kernel.

    The step must have fixed shapes and no host synchronisation (the trainers below are written so). A capture
    that fails (an operation the device cannot capture) is reported in :attr:`error` and the run goes on
    eagerly with the same model and optimizer: nothing of the failed capture has run.
    """

    def __init__(self, step: Callable[[Tensor, Tensor], Tensor], graphs: bool, warmup: int = 2) -> None:
        self.step = step
        self.graphs = graphs
        self.warmup = warmup
        self.calls = 0
        self.graph: Any = None
        self.static: tuple[Tensor, Tensor, Tensor] | None = None
        self.error: str | None = None

    @property
    def captured(self) -> bool:
        """True when the steps are replayed from a CUDA graph."""
        return self.graph is not None

    def __call__(self, xb: Tensor, yb: Tensor) -> Tensor:
        self.calls += 1
        if self.graph is not None and self.static is not None:
            sx, sy, loss = self.static
            sx.copy_(xb)
            sy.copy_(yb)
            self.graph.replay()
            return loss
        if not self.graphs or xb.device.type != "cuda":
            return self.step(xb, yb)
        if self.calls <= self.warmup:  # on a side stream, as torch's capture recipe asks
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(xb, yb)
            torch.cuda.current_stream().wait_stream(side)
            return out
        sx, sy = xb.detach().clone(), yb.detach().clone()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self.step(sx, sy)
        except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly instead
            self.graphs, self.error = False, f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            warnings.warn(f"CUDA graph capture of the training step failed, running it eagerly: {self.error}",
                          RuntimeWarning, stacklevel=2)
            return self.step(xb, yb)
        self.graph, self.static = graph, (sx, sy, loss)
        graph.replay()
        return loss


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: FitConfig,
    seed: int = 0,
    callback: Callable[[TrainEvent], None] | None = None,
    kd: KD | None = None,
    graphs: bool = False,
) -> FitResult:
    """Train ``model`` in place on (x, y).

    Args:
        model: classifier; trained on the device of its parameters.
        x: (N, C, H, W) or (N, D) normalised inputs (any device; moved to the model's device once, for the
            whole fit: no per-step host gather or transfer).
        y: (N,) int labels or (N, C) soft labels (rows sum to 1).
        cfg: optimizer, schedule, augmentation, budget.
        seed: seeds the batch order and augmentation through explicit generators; two calls with the
            same model init, data and seed give bit-identical weights on CPU.
        callback: receives a :class:`TrainEvent` about every epoch.
        kd: knowledge distillation from a teacher on every augmented batch (``soft`` protocol, :class:`KD`).
        graphs: on CUDA, replay the step from a CUDA graph (:class:`StepRunner`); ignored on the CPU.

    Returns:
        :class:`FitResult` with the loss curve.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("fit got an empty training set")
    if y.shape[0] != n:
        raise ValueError(f"fit: x has {n} samples but y has {y.shape[0]}")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(seed)
    bs, _, total, report_every = _budget(n, cfg)
    aug = parse_augment(cfg.augment)
    graphs = graphs and device.type == "cuda"
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device, graphs)
    if kd is not None:
        kd.teacher.eval()
    model.train()

    def step(xb: Tensor, yb: Tensor) -> Tensor:
        logits = model(xb)
        loss = soft_cross_entropy(logits, yb).mean()
        if kd is not None:
            with torch.no_grad():
                t_logits = kd.teacher(xb)
            loss = (1 - kd.alpha) * loss + kd.alpha * kd_loss(logits, t_logits, kd.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    order = batch_orders(n, bs, [g], device)

    def draw() -> tuple[Tensor, Tensor]:
        idx = next(order)
        return (augment(x[idx], aug, g) if aug.ops else x[idx]), y[idx]

    result = FitResult(model=model)
    run_steps(draw, StepRunner(step, graphs), opt, cfg, total, report_every, [result],
              None if callback is None else lambda _i, e: callback(e))
    model.eval()
    return result


def batch_orders(n: int, batch: int, generators: list[torch.Generator], device: torch.device) -> Iterator[Tensor]:
    """The index of every batch: full batches of each generator's permutations of range(n), on ``device``, a fresh
    permutation (one per generator, drawn in order) whenever the current one has no full batch left; with S
    generators a batch is S consecutive blocks, (S·batch,)."""
    while True:
        perms = to_device(torch.stack([torch.randperm(n, generator=g) for g in generators]), device)
        for c in range(0, n - batch + 1, batch):
            yield perms[:, c : c + batch].reshape(-1)


def run_steps(draw: Callable[[], tuple[Tensor, Tensor]], runner: StepRunner, opt: torch.optim.Optimizer,
              cfg: FitConfig, total: int, report_every: int, results: list[FitResult],
              report: Callable[[int, TrainEvent], None] | None) -> None:
    """The steps of a fit of one or more models (one result each): ``draw`` the next batch, set the learning rate,
    step; every ``report_every`` steps (and at the end) each model's mean loss is checked, recorded and reported
    (one host sync per interval: the losses are summed on the device)."""
    running = torch.zeros(len(results), device=next(iter(opt.param_groups[0]["params"])).device)
    count = 0
    for step_i in range(1, total + 1):
        xb, yb = draw()
        lr = _lr_at(step_i - 1, total, cfg)
        _set_lr(opt, lr)
        running += runner(xb, yb)
        count += 1
        if step_i % report_every == 0 or step_i == total:
            for i, mean_loss in enumerate([v / count for v in running.tolist()]):
                if not math.isfinite(mean_loss):
                    of = f" (student {i} of {len(results)})" if len(results) > 1 else ""
                    raise FloatingPointError(f"non-finite training loss ({mean_loss}) at step {step_i} of {total}{of}")
                results[i].losses.append(mean_loss)
                if report is not None:
                    report(i, TrainEvent(step=step_i, total_steps=total, loss=mean_loss, lr=lr))
            running.zero_()
            count = 0
    for r in results:
        r.steps, r.graphed, r.graph_error = total, runner.captured, runner.error


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of a classifier on a labelled set."""

    accuracy: float
    per_class: list[float]
    n: int


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024, embed: bool = False) -> Tensor:
    """Logits of ``model`` on ``x`` in eval mode, (N, C) float32 on the CPU; with ``embed`` its penultimate features
    (``model.embed``, the input of the final linear layer), (N, F)."""
    device = next(model.parameters()).device
    fn: Callable[[Tensor], Tensor] = model.embed if embed else model  # type: ignore[assignment]
    with frozen(model), torch.no_grad():
        out = [fn(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 1024) -> EvalResult:
    """Top-1 accuracy and per-class accuracy of ``model`` on (x, y)."""
    pred = predict_logits(model, x, batch_size).argmax(dim=1)
    y = y.cpu()
    correct = pred == y
    per_class = []
    for c in range(num_classes):
        m = y == c
        per_class.append(float(correct[m].float().mean()) if m.any() else float("nan"))
    return EvalResult(accuracy=float(correct.float().mean()), per_class=per_class, n=int(y.numel()))
