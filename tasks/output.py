"""What a stage reads of the params beside its section, returns and writes at its end, and its device.

Part of every stage's code closure (it writes the resolved params, metrics and timings files); the stage
registry (:mod:`tasks.stages`) and the params loader (:mod:`tasks.config`) are not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tasks.atomic import file_sha256, write_json, write_text
from tasks.paths import Paths
from tasks.plain import dump_yaml, to_plain

if TYPE_CHECKING:
    from dsv.models import ModelConfig
    from tasks.runtime import RuntimeConfig


class StageConfig(Protocol):
    """What every stage reads beside its own section (:class:`tasks.config.PipelineConfig` is one). Each stage
    module names its section in its own ``Config`` protocol, so it reads nothing else."""

    @property
    def runtime(self) -> RuntimeConfig: ...


@dataclass
class StageOutput:
    """What a stage returns (and what Prefect persists): references, never tensors.

    Attributes:
        stage: stage name.
        files: output path (relative to the output folder, POSIX) -> SHA-256 of its bytes; artifacts
            only (not the metrics file, which holds wall times).
        metrics: the deterministic metrics written to ``metrics/<stage>.json`` (DVC-tracked).
        timings: wall times, written to ``timings/<stage>.json`` (not DVC-tracked).
        produced_by: the MLflow run id of the stage run that computed this output (set by the flow).
    """

    stage: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    produced_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "files": dict(self.files), "metrics": dict(self.metrics),
                "timings": dict(self.timings), "produced_by": self.produced_by}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageOutput:
        return cls(stage=d["stage"], files=dict(d["files"]), metrics=dict(d["metrics"]),
                   timings=dict(d.get("timings") or {}), produced_by=d.get("produced_by"))


def hash_files(paths: Paths, files: list[Path]) -> dict[str, str]:
    """{relative path: sha256} of written files."""
    return {paths.relative(f): file_sha256(f) for f in files}


def finish(
    stage: str,
    cfg: StageConfig,
    paths: Paths,
    files: list[Path],
    metrics: dict[str, Any],
    started: float,
    extra_seconds: float = 0.0,
    device: str = "cpu",
) -> StageOutput:
    """Write the stage's resolved params, metrics and timings files, and hash its artifacts.

    Args:
        stage: stage name.
        cfg: the (restricted) config the stage ran with; its section ``stage`` goes to the resolved params file.
        paths: output layout.
        files: artifact files the stage wrote (the params file is added here).
        metrics: scalar metrics; wall times among them (keys ending in ``seconds``) go to the timings
            file, with ``wall_seconds`` added, so the DVC-tracked metrics file is the same on every run.
        started: ``time.perf_counter()`` at the stage's start.
        extra_seconds: time spent in the stage's units (shards, cells) before ``started``.
        device: the device the stage computed on (:func:`device_of`), recorded in the timings file.
    """
    # One params section per stage, named after it (``evaluate`` reads none: an empty mapping)
    section = {stage: to_plain(getattr(cfg, stage))} if hasattr(cfg, stage) else {}
    resolved = write_text(paths.resolved_params(stage), dump_yaml(section))
    timings = {k: v for k, v in metrics.items() if is_timing(k)}
    timings["wall_seconds"] = round(time.perf_counter() - started + extra_seconds, 3)
    timings["device"] = device
    metrics = {k: v for k, v in metrics.items() if not is_timing(k)}
    write_json(paths.metrics(stage), metrics)
    write_json(paths.timings(stage), timings)
    return StageOutput(stage=stage, files=hash_files(paths, [*files, resolved]), metrics=metrics, timings=timings)


def is_timing(key: str) -> bool:
    """A metric that is a wall time (``*seconds``): reported, never DVC-tracked."""
    return key.endswith("seconds")


def device_of(cfg: StageConfig) -> str:
    """The torch device named by ``runtime.device`` ("auto" = cuda when available, else cpu)."""
    return resolve_device(cfg.runtime.device)


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for a ``runtime.device`` value ("auto" = cuda when ``torch.cuda.is_available()``)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device = 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def graphs_of(cfg: StageConfig) -> bool:
    """Whether training steps are replayed from CUDA graphs: ``runtime.cuda_graphs`` ("auto" = on for cuda)."""
    mode = cfg.runtime.cuda_graphs
    return mode == "on" or (mode == "auto" and device_of(cfg) == "cuda")


def model_errors(models: dict[str, ModelConfig], data: dict[str, Any], external: bool = False) -> list[str]:
    """One message per model of a stage (dotted key -> architecture) that cannot take the prepared inputs
    (``data``: meta.json's ``classes`` and ``input_shape``). torchvision/timm models are built only with
    ``external`` (the teacher; a student of theirs is checked when its cell builds it)."""
    from dsv.models import build_model

    errors: list[str] = []
    if data.get("input_shape") is None or len(data["classes"]) < 2:
        return errors
    for key, model in models.items():
        if ":" in model.name and not external:
            continue
        try:
            build_model(model, tuple(data["input_shape"]), len(data["classes"]))
        except ValueError as exc:
            errors.append(f"{key}: {exc}")
    return errors
