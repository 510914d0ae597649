"""One trainer for the teacher and every student, and the evaluation used everywhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.augment import AugmentConfig, augment, dsa_config
from dsv.checks import at_least, one_of, positive

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "step", "cosine")
AUGMENTS = ("none", "flip_crop", "dsa")


@dataclass(frozen=True)
class FitConfig:
    """How to train a classifier.

    Attributes:
        optimizer: "adam" or "sgd" (SGD uses ``momentum``).
        lr: learning rate (> 0).
        momentum: SGD momentum.
        weight_decay: L2 weight decay (coupled, as in torch's Adam/SGD). The paper's teacher uses 5e-3:
            it makes θ* a weighted sum of training gradients (see ``dsv.kkt``).
        epochs: passes over the data; ignored when ``steps`` > 0.
        steps: exact number of optimizer steps (overrides ``epochs`` and ``min_steps`` when > 0).
        min_steps: lower bound on the optimizer steps of an ``epochs`` budget, so that a small dataset (a few
            hundred images: a handful of steps per epoch) is still trained; 0 disables it.
        batch_size: minibatch size (capped at the dataset size).
        schedule: "none", "step" (lr x0.1 at half, the DD protocol) or "cosine".
        augment: "none", "flip_crop" (flip + 4px-style crop-pad, teacher training) or "dsa".
        kd_temperature: temperature T of the knowledge-distillation term (soft protocol only).
        kd_alpha: weight of the KD term; the loss is (1 - α)·CE + α·T²·KL (soft protocol only).
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
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5

    def __post_init__(self) -> None:
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("schedule", self.schedule, SCHEDULES)
        one_of("augment", self.augment, AUGMENTS)
        positive(self, "lr")
        at_least(self, 0, "weight_decay")
        if self.epochs < 1 and self.steps < 1:
            raise ValueError(f"need epochs >= 1 or steps >= 1, got epochs={self.epochs}, steps={self.steps}")
        at_least(self, 0, "steps", "min_steps")
        at_least(self, 1, "batch_size")
        positive(self, "kd_temperature")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")


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


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy for hard (N,) int or soft (N, C) probability targets. Returns (N,)."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target, reduction="none")
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton knowledge distillation: T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch."""
    t = temperature
    p = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), p, reduction="batchmean") * (t * t)


def _augment_cfg(name: str) -> AugmentConfig | None:
    if name == "none":
        return None
    if name == "flip_crop":
        return AugmentConfig(ops=("flip", "crop_pad"), one_per_call=False, crop_pad=0.125)
    return dsa_config()


def _make_optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _lr_at(step: int, total: int, cfg: FitConfig) -> float:
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if step >= total // 2 else 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + torch.cos(torch.tensor(torch.pi * step / max(total, 1))).item())
    return cfg.lr


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: FitConfig,
    seed: int = 0,
    callback: Callable[[TrainEvent], None] | None = None,
    teacher: nn.Module | None = None,
) -> FitResult:
    """Train ``model`` in place on (x, y).

    Args:
        model: classifier; trained on the device of its parameters.
        x: (N, C, H, W) or (N, D) normalised inputs (any device).
        y: (N,) int labels or (N, C) soft labels (rows sum to 1).
        cfg: optimizer, schedule, augmentation, budget.
        seed: seeds the batch order and augmentation through explicit generators; two calls with the
            same model init, data and seed give bit-identical weights on CPU.
        callback: receives a :class:`TrainEvent` about every epoch.
        teacher: when given, adds the knowledge-distillation term on every augmented batch
            (``soft`` protocol): loss = (1 - α)·CE(y) + α·KD(teacher).

    Returns:
        :class:`FitResult` with the loss curve.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("fit got an empty training set")
    if y.shape[0] != n:
        raise ValueError(f"fit: x has {n} samples but y has {y.shape[0]}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    bs = min(cfg.batch_size, n)
    per_epoch = max(1, n // bs)
    total = cfg.steps if cfg.steps > 0 else max(cfg.epochs * per_epoch, cfg.min_steps)
    report_every = per_epoch if cfg.steps <= 0 else max(1, total // 10)
    aug = _augment_cfg(cfg.augment)
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    if teacher is not None:
        teacher.eval()
    model.train()
    result = FitResult(model=model)
    running = torch.zeros((), device=device)  # summed on the device: no host sync inside the interval
    count, step = 0, 0
    perm = torch.randperm(n, generator=g)
    cursor = 0
    while step < total:
        if cursor + bs > n:
            perm, cursor = torch.randperm(n, generator=g), 0
        idx = perm[cursor : cursor + bs]
        cursor += bs
        xb = x[idx].to(device, non_blocking=True)
        yb = y[idx].to(device, non_blocking=True)
        if aug is not None:
            xb = augment(xb, aug, g)
        lr = _lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(xb)
        loss = soft_cross_entropy(logits, yb).mean()
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd_loss(logits, t_logits, cfg.kd_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running += loss.detach()
        count += 1
        if step % report_every == 0 or step == total:
            mean_loss = float(running) / count  # one host sync per reporting interval
            if not torch.isfinite(torch.tensor(mean_loss)):
                raise FloatingPointError(f"non-finite training loss ({mean_loss}) at step {step} of {total}")
            result.losses.append(mean_loss)
            if callback is not None:
                callback(TrainEvent(step=step, total_steps=total, loss=mean_loss, lr=lr))
            running.zero_()
            count = 0
    result.steps = step
    model.eval()
    return result


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
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fn: Callable[[Tensor], Tensor] = model.embed if embed else model  # type: ignore[assignment]
    with torch.no_grad():
        out = [fn(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
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
