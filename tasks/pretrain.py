"""Stage ``pretrain``: train the teacher Φ(·; θ*) on the prepared training split, or bring one.

With ``pretrain.checkpoint`` set, the teacher is the user's trained model: the stage builds
``pretrain.model`` (the project's models, ``torchvision:<name>``, ``timm:<name>``), loads the file (never
written) and verifies it (input shape, number of classes, test accuracy, certificates) instead of training.

Outputs: ``artifacts/pretrain/teacher.safetensors`` (state dict), ``model.json`` (architecture,
input shape, classes: everything needed to rebuild it), ``curve.json`` (loss per epoch, DVC plot);
``metrics/pretrain.json`` with test and validation accuracy, the wall time and the teacher's KKT
certificates (``kkt_certificate`` for all parameters, ``kkt_certificate_last``, ``kkt_certificate_free``:
the relative stationarity residual at uniform λ = 1/(nω), see ``dsv.certificate``; 0 at a KKT point),
before and after the optional convergence phase (``pretrain.converge``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dsv.certificate import ConvergeConfig, converge
from dsv.kernel import PARAM_SUBSETS, kkt_certificates, stationarity_params
from dsv.models import ModelConfig, build_seeded, load_checkpoint
from dsv.train import FitConfig, TrainEvent, evaluate, fit
from tasks.artifacts import load_split, read_data_meta, save_model
from tasks.atomic import write_json
from tasks.figures import curves
from tasks.output import StageConfig, StageOutput, device_of, finish, graphs_of, model_errors
from tasks.paths import Paths
from tasks.plain import to_plain
from tasks.progress import Bar
from tasks.ranges import SEED, register
from tasks.tracking import StageLog


@dataclass(frozen=True)
class PretrainConfig:
    """Stage ``pretrain``: the teacher Φ(·; θ*).

    Attributes:
        model: teacher architecture (the project's models, ``torchvision:<name>`` or ``timm:<name>``); ConvNet-3
            width 32 by default (width 64 costs much more time in every teacher-bound stage for little teacher
            accuracy: benchmarks/results/teacher-width.md).
        checkpoint: a trained teacher's state dict (``.safetensors``, or a ``torch.save``'d state dict read
            with ``weights_only=True``; never a pickled model): the stage loads and verifies it (input shape,
            classes, test accuracy, KKT certificates) instead of training. Its content hash is part of the
            cache key; the file is never written. ``fit.weight_decay`` is then the ω the certificates assume.
        fit: teacher training (the paper's Adam, lr 1e-3, weight decay 5e-3; 5 epochs with a cosine schedule and no
            augmentation, which underfits at this budget: benchmarks/results/teacher.md), and at least 500 steps
            (5 epochs of scikit-learn's digits are a few dozen steps, far too few for a usable teacher).
        converge: optional convergence phase after training (``dsv.certificate.ConvergeConfig``):
            full-batch L-BFGS on the final layer ("last") or every parameter ("all") until the teacher is
            a KKT point of mean CE + (ω/2)‖θ‖², ω = ``fit.weight_decay``.
        seed: seeds the initialisation and the batch order.
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="convnet", width=32, depth=3))
    checkpoint: str | None = None
    fit: FitConfig = field(
        default_factory=lambda: FitConfig(
            optimizer="adam", lr=1e-3, weight_decay=5e-3, epochs=5, min_steps=500, batch_size=128, schedule="cosine",
            augment="none",
        )
    )
    converge: ConvergeConfig = field(default_factory=ConvergeConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ValueError("checkpoint must be a file path or null, got an empty string")


register(PretrainConfig, {"seed": SEED})


class Config(StageConfig, Protocol):
    @property
    def pretrain(self) -> PretrainConfig: ...


def check(cfg: Any, data: dict[str, Any] | None = None) -> list[str]:
    """Problems of the ``pretrain`` section: a checkpoint that is not there; a teacher that cannot take the
    prepared inputs (``data``: meta.json)."""
    if data is not None:
        return model_errors({"pretrain.model": cfg.pretrain.model}, data, external=True)
    ckpt = cfg.pretrain.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        return [f"pretrain.checkpoint = {ckpt!r}: file not found (relative paths start at the project root)"]
    return []


def certificates(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, omega: float) -> dict[str, float]:
    """The teacher's KKT certificates (dsv.certificate) for θ = all, last and free parameters, as metrics:
    ``kkt_certificate`` (all), ``kkt_certificate_last``, ``kkt_certificate_free``."""
    subsets = {s: stationarity_params(model, s, x[:8].to(next(model.parameters()).device)) for s in PARAM_SUBSETS}
    certs = kkt_certificates(model, x, y, omega, subsets)
    return {("kkt_certificate" if s == "all" else f"kkt_certificate_{s}"): c.relative for s, c in certs.items()}


def run(cfg: Config, paths: Paths, log: StageLog) -> StageOutput:
    """Train and evaluate the teacher; see the module docstring."""
    started = time.perf_counter()
    p = cfg.pretrain
    device = device_of(cfg)
    meta = read_data_meta(paths.data_meta)
    x, y = load_split(paths.train, meta)
    x_val, y_val = load_split(paths.val, meta)
    x_test, y_test = load_split(paths.test, meta)
    model = build_seeded(p.model, meta.input_shape, meta.num_classes, p.seed)
    curve: list[dict[str, float]] = []
    fit_seconds = 0.0
    if p.checkpoint is not None:
        load_checkpoint(model, p.checkpoint)
        model = model.to(device)
        _check_teacher(model, x_test, meta.num_classes, p.checkpoint)
    else:
        model = model.to(device)
        fit_seconds = _train(cfg, model, x, y, log, curve)

    extra = _converge(cfg, model, x, y, evaluate(model, x_test, y_test, meta.num_classes).accuracy, log) \
        if p.converge.scope != "none" else {}
    if p.fit.weight_decay > 0:
        extra.update(certificates(model, x, y, p.fit.weight_decay))
    test = evaluate(model, x_test, y_test, meta.num_classes)
    val = evaluate(model, x_val, y_val, meta.num_classes) if y_val.numel() else None
    spec = {"model": to_plain(p.model), "in_shape": list(meta.input_shape), "num_classes": meta.num_classes,
            "source": "checkpoint" if p.checkpoint else "trained",
            "weight_decay": None if p.checkpoint else p.fit.weight_decay}
    save_model(paths.teacher, paths.teacher_spec, model.cpu(), spec)
    write_json(paths.pretrain_curve, curve)
    metrics = {"test_acc": test.accuracy, "val_acc": val.accuracy if val is not None else float("nan"),
               "train_seconds": round(fit_seconds, 3), "n_train": int(y.numel()), **extra,
               **{f"test_acc_class_{c}": a for c, a in enumerate(test.per_class)}}
    if p.checkpoint is not None and test.accuracy < 1.5 / meta.num_classes:
        print(f"warning: the checkpoint's test accuracy is {test.accuracy:.3f} (chance {1 / meta.num_classes:.3f}): "
              "check prepare.normalize (the normalisation it was trained with) and the class order "
              f"({', '.join(meta.classes[:5])}{', ...' if meta.num_classes > 5 else ''})")
    log.metrics(metrics)
    if curve:
        log.figure(curves({"loss": ([r["step"] for r in curve], [r["loss"] for r in curve])}, "step", "loss",
                          "teacher training loss"), "pretrain/loss.png")
    log.model(model.cpu(), "teacher", x_test[:2].numpy())
    return finish("pretrain", cfg, paths, [paths.teacher, paths.teacher_spec, paths.pretrain_curve], metrics, started,
                  device=device)


def _converge(cfg: Config, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, test_acc: float,
              log: StageLog) -> dict[str, float]:
    """The convergence phase (``pretrain.converge``), in place; its metrics: the test accuracy and certificates
    before it, its iterations and wall time."""
    p = cfg.pretrain
    if not p.fit.weight_decay > 0:
        raise ValueError("pretrain.converge needs pretrain.fit.weight_decay > 0 (the objective it converges)")
    extra = {"test_acc_before_converge": test_acc,
             **{f"{k}_before_converge": v for k, v in certificates(model, x, y, p.fit.weight_decay).items()}}
    started, device = time.perf_counter(), next(model.parameters()).device
    bar = Bar(cfg.runtime.progress, p.converge.max_iter, f"pretrain converge ({p.converge.scope})", unit="it")

    def on_iter(it: int, gn: float) -> None:
        log.metric("converge_grad_norm", gn, step=it)
        bar.to(it, grad_norm=gn)

    with bar:
        res = converge(model, x.to(device), y.to(device), p.fit.weight_decay, p.converge, callback=on_iter)
    return {**extra, "converge_iterations": float(res.iterations),
            "converge_seconds": round(time.perf_counter() - started, 3)}


def _train(cfg: Config, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, log: StageLog,
           curve: list[dict[str, float]]) -> float:
    """Train the teacher in place; returns the training wall time."""
    p = cfg.pretrain
    bar = Bar(cfg.runtime.progress, 0, "pretrain", unit="step")

    def on_epoch(e: TrainEvent) -> None:
        curve.append({"step": e.step, "loss": e.loss, "lr": e.lr})
        log.metric("train_loss", e.loss, step=e.step)
        bar.total(e.total_steps)
        bar.to(e.step, loss=e.loss)

    started = time.perf_counter()
    with bar:
        fit(model, x, y, p.fit, seed=p.seed, callback=on_epoch, graphs=graphs_of(cfg))
    return time.perf_counter() - started


def _check_teacher(model: torch.nn.Module, x: torch.Tensor, num_classes: int, source: str) -> None:
    """A brought teacher must take the prepared inputs and output one logit per class."""
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2].to(device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise ValueError(f"pretrain.checkpoint {source}: the model does not accept the prepared inputs of shape "
                         f"{tuple(x.shape[1:])} ({first}); check pretrain.model.name and prepare.data.image_size"
                         ) from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ValueError(f"pretrain.checkpoint {source}: the model outputs {tuple(out.shape[1:])} per input, "
                         f"the data has {num_classes} classes")
