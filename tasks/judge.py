"""Stage ``judge``: an independent classifier trained on the real training split (never the teacher).

``generate`` and ``evaluate`` score image sets with it (:mod:`dsv.judge`): accuracy on the intended
class, mean confidence, and a Fréchet distance in its penultimate features.

Outputs: ``artifacts/judge/judge.safetensors`` + ``model.json``; ``metrics/judge.json`` (test and
validation accuracy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dsv.models import ModelConfig, build_seeded
from dsv.train import FitConfig, TrainEvent, evaluate, fit
from tasks.artifacts import load_split, read_data_meta, save_model
from tasks.output import StageConfig, StageOutput, device_of, finish, graphs_of, model_errors
from tasks.paths import Paths
from tasks.plain import to_plain
from tasks.progress import Bar
from tasks.ranges import SEED, register
from tasks.tracking import StageLog


@dataclass(frozen=True)
class JudgeConfig:
    """Stage ``judge``: an independent classifier that scores generated and distilled images.

    It is trained on the real training split and never sees the teacher: another architecture (by default a
    BatchNorm + max-pool ConvNet of width 32, where the teacher is an InstanceNorm + average-pool ConvNet of
    the same width) and another seed. Its accuracy on the images' intended classes, its confidence, and a Fréchet
    distance in its penultimate features (:mod:`dsv.judge`) are what ``generate`` and ``evaluate`` report.

    Attributes:
        model: the judge's architecture (any ``pretrain.model`` name); null = a ConvNet (width 32, depth 3,
            BatchNorm, max pooling) for images, an MLP (width 128, depth 2) for feature vectors.
        fit: its training (2 epochs of Adam and at least 400 steps: on a small dataset the step floor binds).
        seed: seeds its initialisation and batch order (differs from ``pretrain.seed`` by default).
    """

    model: ModelConfig | None = None
    fit: FitConfig = field(default_factory=lambda: FitConfig(optimizer="adam", lr=2e-3, epochs=2, min_steps=400,
                                                             batch_size=256, schedule="cosine"))
    seed: int = 1


register(JudgeConfig, {"seed": SEED})


class Config(StageConfig, Protocol):
    @property
    def judge(self) -> JudgeConfig: ...


def check(cfg: Any, data: dict[str, Any] | None = None) -> list[str]:
    """With ``data`` (meta.json): the judge must take the prepared inputs."""
    if data is None or data.get("input_shape") is None:
        return []
    return model_errors({"judge.model": judge_model(cfg.judge, data["input_shape"])}, data)

def judge_model(j: JudgeConfig, input_shape: Sequence[int]) -> ModelConfig:
    """The judge's architecture for inputs of ``input_shape``: ``judge.model``, or when null a ConvNet (width 32,
    depth 3, BatchNorm, max pooling) for images and an MLP (width 128, depth 2) for feature vectors."""
    if j.model is not None:
        return j.model
    if len(input_shape) == 3:
        return ModelConfig(name="convnet", width=32, depth=3, norm="batch", pool="max")
    return ModelConfig(name="mlp", width=128, depth=2)


def run(cfg: Config, paths: Paths, log: StageLog) -> StageOutput:
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
