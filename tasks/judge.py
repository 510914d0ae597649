"""Stage ``judge``: an independent classifier trained on the real training split (never the teacher).

``generate`` and ``evaluate`` score image sets with it (:mod:`dsv.judge`): accuracy on the intended
class, mean confidence, and a Fréchet distance in its penultimate features.

Outputs: ``artifacts/judge/judge.safetensors`` + ``model.json``; ``metrics/judge.json`` (test and
validation accuracy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dsv.models import ModelConfig, build_seeded
from dsv.train import TrainEvent, evaluate, fit
from tasks.artifacts import load_split, read_data_meta, save_model
from tasks.output import StageOutput, device_of, finish, graphs_of
from tasks.paths import Paths
from tasks.plain import to_plain
from tasks.progress import Bar
from tasks.tracking import StageLog

if TYPE_CHECKING:
    from tasks.config import JudgeConfig, PipelineConfig


def judge_model(j: JudgeConfig, input_shape: Sequence[int]) -> ModelConfig:
    """The judge's architecture for inputs of ``input_shape``: ``judge.model``, or when null a ConvNet (width 32,
    depth 3, BatchNorm, max pooling) for images and an MLP (width 128, depth 2) for feature vectors."""
    if j.model is not None:
        return j.model
    if len(input_shape) == 3:
        return ModelConfig(name="convnet", width=32, depth=3, norm="batch", pool="max")
    return ModelConfig(name="mlp", width=128, depth=2)


def run(cfg: PipelineConfig, paths: Paths, log: StageLog) -> StageOutput:
    """Train and evaluate the judge; see the module docstring."""
    started = time.perf_counter()
    j = cfg.judge
    device = device_of(cfg)
    meta = read_data_meta(paths.data_meta)
    x, y = load_split(paths.train, meta)
    x_val, y_val = load_split(paths.val, meta)
    x_test, y_test = load_split(paths.test, meta)
    arch = judge_model(j, meta.input_shape)
    model = build_seeded(arch, meta.input_shape, meta.num_classes, j.seed).to(device)
    bar = Bar(cfg.runtime.progress, 0, "judge", unit="step")

    def on_epoch(e: TrainEvent) -> None:
        log.metric("train_loss", e.loss, step=e.step)
        bar.total(e.total_steps)
        bar.to(e.step, loss=e.loss)

    with bar:
        fit(model, x, y, j.fit, seed=j.seed, callback=on_epoch, graphs=graphs_of(cfg))
    metrics = {
        "test_acc": evaluate(model, x_test, y_test, meta.num_classes).accuracy,
        "val_acc": evaluate(model, x_val, y_val, meta.num_classes).accuracy if y_val.numel() else float("nan"),
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    save_model(paths.judge, paths.judge_spec, model.cpu(),
               {"model": to_plain(arch), "in_shape": list(meta.input_shape), "num_classes": meta.num_classes,
                "source": "trained"})
    log.metrics(metrics)
    return finish("judge", cfg, paths, [paths.judge, paths.judge_spec], metrics, started, device=device)
