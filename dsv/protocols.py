"""Student training protocols: how every method's images are turned into a test accuracy.

Results move by 5+ points between recipes for the same images, so every number names its protocol:

* ``dd``: the dataset-distillation standard (DC/DSA/DM papers): ConvNet-3 (width 128, instance norm,
  average pooling), SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half, batch 256, DSA
  augmentation.
* ``paper``: the DSV paper's retraining, "Adam, lr 1e-4" and nothing else reported. Our choices for the
  rest: the same ConvNet-3 and batch 256 as ``dd``, no weight decay (torch's Adam default), constant lr,
  and DSA augmentation, so ``paper`` and ``dd`` differ only in the optimizer and its schedule.
* ``soft``: a base protocol (``dd`` or ``paper``) plus knowledge distillation from the teacher on every
  augmented batch (SRe2L-style relabelling): loss = (1 − α)·CE(y) + α·T²·KL(teacher/T ‖ student/T).
  Its rows carry ``label_type="soft"`` and never share a table row with hard-label results.

Budget: ``epochs`` counts passes over the training images in full batches of ``min(256, n)`` images,
``ceil(n / batch)`` steps per epoch (as the DD code's data loader), and never fewer than ``min_steps``
optimizer steps in total, so 10-100 images still get a meaningful number of updates at short budgets.
With the full benchmark's 1000 epochs the minimum (default 500) does not bind.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from dsv.batched import can_batch, fit_batched
from dsv.checks import at_least, one_of, positive
from dsv.models import ModelConfig, build_seeded
from dsv.train import KD, EvalResult, FitConfig, TrainEvent, epoch_steps, evaluate, fit

PROTOCOLS: tuple[str, ...] = ("dd", "paper", "soft")
BATCHED: tuple[str, ...] = ("auto", "on", "off")
HARD_PROTOCOLS: tuple[str, ...] = ("dd", "paper")
LABEL_TYPES: tuple[str, ...] = ("hard", "soft")
# DSVs by init kind: dsv_<init> for every init of dsv.extract.INITS (e.g. dsv_herding refines herding's picks);
# spelled out so that the student code does not depend on the extraction code (a test keeps them equal).
DSV_METHODS: dict[str, str] = {f"dsv_{init}": init for init in ("nshot", "0shot", "noise", "herding", "kcenter",
                                                                 "kkt_herding")}
METHOD_NAMES: tuple[str, ...] = (
    *DSV_METHODS,
    "lambda_topk",
    "support_topk",
    "random",
    "herding",
    "kcenter",
    "kkt_herding",
    "forgetting",
    "el2n",
    "entropy",
    "dm",
    "full",
)
# Core-set selectors that may also be reported (dsv.baselines offers them beside "entropy").
EXTRA_METHOD_NAMES: tuple[str, ...] = ("least_confidence", "margin")

# The DD benchmark network: ConvNet-3, width 128, ReLU, instance norm, average pooling.
DD_MODEL = ModelConfig(name="convnet", width=128, depth=3, norm="instance", activation="relu", pool="avg")


@dataclass(frozen=True)
class ProtocolConfig:
    """A named student-training protocol and its budget.

    Attributes:
        name: one of :data:`PROTOCOLS`.
        epochs: passes over the training images (the full benchmark uses 1000).
        min_steps: lower bound on the total optimizer steps (see the module docstring); 0 disables it.
        n_runs: student seeds per (method, IPC) cell.
        base: for ``soft``: the hard protocol whose optimizer/augmentation it extends ("dd" or "paper").
        kd_temperature: KD temperature T (``soft`` only; Hinton's 4 by default).
        kd_alpha: weight α of the KD term (``soft`` only); 1.0 trains on the teacher's soft targets alone.
        batch_size: training batch size (capped at the number of training images).
        model: student architecture; every protocol uses the DD ConvNet-3 unless overridden (tests,
            ablations).
        batched: train the seeds of a set together in one vmapped step (:mod:`dsv.batched`): "on", "off" (one
            student after another) or "auto" (on for CUDA, where a step is bound by kernel launches; off on the
            CPU, where the loop is faster). Each student keeps its initialisation, batch order and augmentation
            draws; batched and looped students differ by float reassociation only. Architectures with buffers
            or dropout (BatchNorm, torchvision/timm models) are always trained one by one.
    """

    name: str = "dd"
    epochs: int = 300
    min_steps: int = 500
    n_runs: int = 3
    base: str = "dd"
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    batch_size: int = 256
    model: ModelConfig = field(default=DD_MODEL)
    batched: str = "auto"

    def __post_init__(self) -> None:
        one_of("name", self.name, PROTOCOLS)
        one_of("batched", self.batched, BATCHED)
        one_of("base", self.base, HARD_PROTOCOLS)
        at_least(self, 1, "epochs")
        at_least(self, 0, "min_steps")
        at_least(self, 1, "n_runs")
        positive(self, "kd_temperature")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        at_least(self, 1, "batch_size")

    @property
    def hard_protocol(self) -> str:
        """The optimizer recipe in use: ``name`` for hard protocols, ``base`` for ``soft``."""
        return self.base if self.name == "soft" else self.name

    @property
    def label_type(self) -> str:
        """"soft" for the KD protocol, "hard" otherwise."""
        return "soft" if self.name == "soft" else "hard"


def student_steps(cfg: ProtocolConfig, n_train: int) -> int:
    """Total optimizer steps for ``n_train`` images: max(epochs · ⌈n / batch⌉, min_steps) (one epoch counted as
    every trainer counts it, :func:`dsv.train.epoch_steps`)."""
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    return max(cfg.epochs * epoch_steps(n_train, cfg.batch_size), cfg.min_steps)


def student_fit_config(cfg: ProtocolConfig, n_train: int) -> FitConfig:
    """The trainer settings of a protocol for a training set of ``n_train`` images, with an explicit ``steps``
    budget (:func:`student_steps`)."""
    steps = student_steps(cfg, n_train)
    if cfg.hard_protocol == "dd":
        return FitConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, steps=steps,
                         batch_size=cfg.batch_size, schedule="step", augment="dsa")
    return FitConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, steps=steps, batch_size=cfg.batch_size,
                     schedule="none", augment="dsa")


def train_students(
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    teacher: nn.Module | None,
    protocol_cfg: ProtocolConfig,
    in_shape: tuple[int, ...],
    num_classes: int,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    callback: Callable[[int, TrainEvent], None] | None = None,
    on_student: Callable[[int, nn.Module, EvalResult], None] | None = None,
    graphs: bool = False,
) -> list[EvalResult]:
    """Train one fresh student per seed on (x, y) under a protocol and evaluate each on the test set.

    Each student's initialisation, batch order and augmentation are fixed by its seed. The seeds of a set are
    trained together in one vmapped step (:func:`dsv.batched.fit_batched`) when :func:`uses_batched` says so,
    else one after another (:func:`dsv.train.fit`); the two differ by float reassociation only.

    Args:
        x: (N, C, H, W) normalised training images (distilled or selected).
        y: (N,) int labels, or (N, C) soft label rows.
        x_test: (T, C, H, W) normalised test images.
        y_test: (T,) int test labels.
        teacher: the teacher, required by ``soft`` (its logits on every augmented batch); ignored otherwise.
        protocol_cfg: protocol and budget.
        in_shape: one image's shape (C, H, W).
        num_classes: number of classes.
        seeds: one student per seed.
        device: where students train.
        callback: receives (seed, :class:`TrainEvent`) during training.
        on_student: receives (seed, trained student, its test result) after each student, e.g. to score it on
            another split or save it; the student is not kept otherwise.
        graphs: on CUDA, replay each training step from a CUDA graph (:class:`dsv.train.StepRunner`).

    Returns:
        One :class:`EvalResult` per seed, in order.

    Raises:
        ValueError: ``soft`` without a teacher, or no seeds.
    """
    if not seeds:
        raise ValueError("train_students needs at least one seed")
    kd = None
    if protocol_cfg.name == "soft":
        if teacher is None:
            raise ValueError("protocol 'soft' needs the teacher (its logits are the soft targets)")
        kd = KD(teacher, protocol_cfg.kd_temperature, protocol_cfg.kd_alpha)
    fit_cfg = student_fit_config(protocol_cfg, int(x.shape[0]))
    x_test, y_test = x_test.to(device), y_test.to(device)  # evaluated once per student: moved once
    batched = uses_batched(protocol_cfg, device, in_shape, num_classes)
    models = [build_seeded(protocol_cfg.model, in_shape, num_classes, s).to(device) for s in seeds] if batched else []
    if batched:
        report_i = None if callback is None else (lambda i, e: callback(seeds[i], e))
        fit_batched(models, x, y, fit_cfg, list(seeds), report_i, kd=kd, graphs=graphs)
    results = []
    for i, seed in enumerate(seeds):
        if batched:
            model = models[i]
        else:
            model = build_seeded(protocol_cfg.model, in_shape, num_classes, seed).to(device)
            report = None if callback is None else functools.partial(callback, seed)
            fit(model, x, y, fit_cfg, seed=seed, callback=report, kd=kd, graphs=graphs)
        results.append(evaluate(model, x_test, y_test, num_classes))
        if on_student is not None:
            on_student(seed, model, results[-1])
    return results


def uses_batched(protocol_cfg: ProtocolConfig, device: torch.device | str, in_shape: tuple[int, ...],
                 num_classes: int) -> bool:
    """Whether :func:`train_students` trains the seeds together: ``protocol.batched`` ("auto": on CUDA) and an
    architecture :func:`dsv.batched.can_batch` accepts."""
    if protocol_cfg.batched == "off" or (protocol_cfg.batched == "auto" and torch.device(device).type != "cuda"):
        return False
    return can_batch(build_seeded(protocol_cfg.model, in_shape, num_classes, 0))


def linear_probe(
    train_features: Tensor,
    train_y: Tensor,
    test_features: Tensor,
    test_y: Tensor,
    num_classes: int,
    weight_decay: float = 5e-3,
    max_iter: int = 200,
) -> float:
    """Test accuracy of a final linear layer refitted on a set's frozen teacher features (a linear probe).

    Minimises mean CE + (ω/2)‖(W, b)‖² over (W, b) from zero by full-batch L-BFGS in float64: the teacher's own
    final-layer objective restricted to the set. On the whole training split its solution is the teacher's
    final layer at a KKT point, so a set whose probe matches the teacher's accuracy carries the support of the
    decision function.

    Args:
        train_features: (M, D) teacher features (input of its final layer) of the set.
        train_y: (M,) int labels or (M, C) soft labels.
        test_features: (T, D) teacher features of the test set; test_y: (T,) labels.
        num_classes: C.
        weight_decay: ω (> 0).
        max_iter: L-BFGS iterations.
    """
    from dsv.kernel import soft_cross_entropy

    if not weight_decay > 0:
        raise ValueError(f"weight_decay must be > 0, got {weight_decay}")
    h = train_features.detach().cpu().double().flatten(1)
    y = train_y.detach().cpu()
    y = y.double() if y.dim() == 2 else y.long()
    w = torch.zeros(num_classes, h.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = soft_cross_entropy(h @ w.t() + b, y).mean() + 0.5 * weight_decay * ((w * w).sum() + (b * b).sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (test_features.detach().cpu().double().flatten(1) @ w.t() + b).argmax(dim=1)
    return float((pred == test_y.cpu()).double().mean())


@dataclass(frozen=True)
class ResultRow:
    """One cell of a benchmark table: a method at an IPC and real-image budget under one protocol.

    Attributes:
        method: one of :data:`METHOD_NAMES` or :data:`EXTRA_METHOD_NAMES`.
        ipc: images per class the students trained on.
        shots: real images per class the method was allowed to see (0 for 0-shot/noise).
        protocol: one of :data:`PROTOCOLS`.
        label_type: "hard" or "soft"; must be "soft" exactly when ``protocol == "soft"``.
        acc_mean: mean test accuracy over runs (fraction in [0, 1]).
        acc_std: population standard deviation over runs (numpy's default, as the DC/DM code reports).
        n_runs: number of runs.
        accs: the individual accuracies.
        wall_s: wall time of the cell in seconds (selection/distillation plus student training).
    """

    method: str
    ipc: int
    shots: int
    protocol: str
    label_type: str
    acc_mean: float
    acc_std: float
    n_runs: int
    accs: tuple[float, ...] = ()
    wall_s: float = float("nan")

    def __post_init__(self) -> None:
        allowed = METHOD_NAMES + EXTRA_METHOD_NAMES
        if self.method not in allowed:
            raise ValueError(f"row.method = {self.method!r} is not one of {', '.join(allowed)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"row.protocol = {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.label_type not in LABEL_TYPES:
            raise ValueError(f"row.label_type = {self.label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        if (self.protocol == "soft") != (self.label_type == "soft"):
            raise ValueError(
                f"row.label_type = {self.label_type!r} does not match protocol {self.protocol!r}: "
                "soft-label results come only from the 'soft' protocol"
            )
        if self.ipc < 1 or self.shots < 0:
            raise ValueError(f"row needs ipc >= 1 and shots >= 0, got ipc={self.ipc}, shots={self.shots}")
        if self.n_runs < 1 or (self.accs and len(self.accs) != self.n_runs):
            raise ValueError(f"row.n_runs = {self.n_runs} does not match {len(self.accs)} accuracies")

    @classmethod
    def from_results(
        cls,
        method: str,
        ipc: int,
        shots: int,
        protocol: ProtocolConfig | str,
        results: Sequence[EvalResult | float],
        wall_s: float = float("nan"),
    ) -> ResultRow:
        """Summarise per-run accuracies (``EvalResult``s or floats) into a row.

        Args:
            method: method name.
            ipc: images per class.
            shots: real images per class the method used.
            protocol: the protocol config (or its name).
            results: one accuracy per run.
            wall_s: wall time of the cell.
        """
        name = protocol if isinstance(protocol, str) else protocol.name
        accs = tuple(float(r.accuracy if isinstance(r, EvalResult) else r) for r in results)
        if not accs:
            raise ValueError("a result row needs at least one run")
        t = torch.tensor(accs, dtype=torch.float64)
        return cls(
            method=method, ipc=ipc, shots=shots, protocol=name, label_type="soft" if name == "soft" else "hard",
            acc_mean=float(t.mean()), acc_std=float(t.std(correction=0)), n_runs=len(accs), accs=accs,
            wall_s=float(wall_s),
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict; keys include the ``metrics/evaluate.json`` row schema
        {method, ipc, shots, protocol, acc_mean, acc_std, n_runs}."""
        d = asdict(self)
        d["accs"] = list(self.accs)
        return d


@dataclass(frozen=True)
class LabelRobustScore:
    """DD-Ranking's label-robust score of a set (arXiv 2505.13300), mean and population std over seeds.

    Per seed s, with accuracies as fractions:
    HLR_s = acc_real − acc_set_s (hard-label recovery: lower is better),
    IOR_s = acc_set_s − acc_random_s (improvement over a random real subset of the same size under the same
    recipe: higher is better),
    LRS_s = (exp(α_s) − e⁻¹) / (e − e⁻¹) with α_s = w·IOR_s − (1 − w)·HLR_s, which maps α ∈ [−1, 1] to [0, 1].
    """

    hlr_mean: float
    hlr_std: float
    ior_mean: float
    ior_std: float
    lrs_mean: float
    lrs_std: float


def label_robust_score(accs: Sequence[float], random_accs: Sequence[float], real_acc: float, weight: float = 0.5
                       ) -> LabelRobustScore:
    """:class:`LabelRobustScore` of a set from its students' accuracies.

    Args:
        accs: test accuracy of each seed's student trained on the set.
        random_accs: accuracy of the student trained on a random real subset of the same size with the same
            seed and recipe (paired by position; the shorter list sets the number of pairs).
        real_acc: accuracy of a model trained on the whole real training split with hard labels.
        weight: w, DD-Ranking's default 0.5.
    """
    n = min(len(accs), len(random_accs))
    if n == 0:
        raise ValueError("label_robust_score needs at least one paired accuracy")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    hlr = [real_acc - a for a in accs[:n]]
    ior = [a - r for a, r in zip(accs[:n], random_accs[:n])]
    lo, hi = math.exp(-1.0), math.exp(1.0)
    lrs = [(math.exp(weight * i - (1 - weight) * h) - lo) / (hi - lo) for i, h in zip(ior, hlr)]

    def mean_std(v: list[float]) -> tuple[float, float]:
        m = sum(v) / len(v)
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    (hm, hs), (im, is_), (lm, ls) = mean_std(hlr), mean_std(ior), mean_std(lrs)
    return LabelRobustScore(hm, hs, im, is_, lm, ls)
