"""Stage ``pretrain``: train the teacher Φ(·; θ*) on the prepared training split.

Outputs: ``artifacts/pretrain/teacher.safetensors`` (state dict), ``model.json`` (architecture,
input shape, classes: everything needed to rebuild it), ``curve.json`` (loss per epoch, DVC plot);
``metrics/pretrain.json`` with test and validation accuracy and the wall time.
"""

from __future__ import annotations

import time

from dsv.models import build_seeded
from dsv.train import TrainEvent, evaluate, fit
from tasks.artifacts import load_split, read_data_meta, save_model
from tasks.atomic import write_json
from tasks.config import PipelineConfig, to_plain
from tasks.figures import curves
from tasks.paths import Paths
from tasks.progress import Bar
from tasks.stages import StageOutput, device_of, finish
from tasks.tracking import StageLog


def run(cfg: PipelineConfig, paths: Paths, log: StageLog) -> StageOutput:
    """Train and evaluate the teacher; see the module docstring."""
    started = time.perf_counter()
    p = cfg.pretrain
    device = device_of(cfg)
    meta = read_data_meta(paths.data_meta)
    x, y = load_split(paths.train, meta)
    x_val, y_val = load_split(paths.val, meta)
    x_test, y_test = load_split(paths.test, meta)
    model = build_seeded(p.model, meta.input_shape, meta.num_classes, p.seed).to(device)
    curve: list[dict[str, float]] = []

    bar = Bar(cfg.runtime.progress, 0, "pretrain", unit="step")

    def on_epoch(e: TrainEvent) -> None:
        curve.append({"step": e.step, "loss": e.loss, "lr": e.lr})
        log.metric("train_loss", e.loss, step=e.step)
        bar.total(e.total_steps)
        bar.to(e.step, loss=e.loss)

    fit_started = time.perf_counter()
    with bar:
        fit(model, x, y, p.fit, seed=p.seed, callback=on_epoch)
    fit_seconds = time.perf_counter() - fit_started
    test = evaluate(model, x_test, y_test, meta.num_classes)
    val = evaluate(model, x_val, y_val, meta.num_classes) if y_val.numel() else None
    spec = {"model": to_plain(p.model), "in_shape": list(meta.input_shape), "num_classes": meta.num_classes}
    save_model(paths.teacher, paths.teacher_spec, model.cpu(), spec)
    write_json(paths.pretrain_curve, curve)
    metrics = {
        "test_acc": test.accuracy,
        "val_acc": val.accuracy if val is not None else float("nan"),
        "train_seconds": round(fit_seconds, 3),
        "n_train": int(y.numel()),
        **{f"test_acc_class_{c}": a for c, a in enumerate(test.per_class)},
    }
    log.metrics(metrics)
    log.figure(curves({"loss": ([r["step"] for r in curve], [r["loss"] for r in curve])}, "step", "loss",
                      "teacher training loss"), "pretrain/loss.png")
    log.model(model.cpu(), "teacher", x_test[:2].numpy())
    return finish("pretrain", cfg, paths, [paths.teacher, paths.teacher_spec, paths.pretrain_curve], metrics, started)
