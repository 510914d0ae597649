"""Every file the pipeline reads or writes, named in one place.

Layout under the output folder (``runtime.output_dir``, the project root by default)::

    artifacts/<stage>/...            stage outputs (tracked by DVC as the stage's ``outs``)
    artifacts/<stage>/params.resolved.yaml   the exact config the stage ran with
    metrics/<stage>.json             scalar metrics (MLflow metrics; DVC outputs): deterministic values only
    metrics/accuracy.json            every method's test accuracy (%): the one file DVC lists as metrics
    timings/<stage>.json             wall times of the stage and its units (not tracked by DVC: they differ
                                     on every run, and would make ``dvc status`` dirty)

Project-level state lives under the project root: ``.dsv/cache`` (the stages' JSON cache records,
:mod:`flows.cache`; nothing there is ever unpickled), ``.dsv/prefect`` (PREFECT_HOME), ``mlflow.db`` and ``mlartifacts/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGE_NAMES: tuple[str, ...] = ("prepare", "pretrain", "judge", "extract", "coreset", "distill", "generate", "evaluate")


@dataclass(frozen=True)
class ProjectPaths:
    """Project-level locations (independent of the params file)."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / ".dsv"

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    @property
    def cache(self) -> Path:
        return self.state / "cache"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"


@dataclass(frozen=True)
class Paths:
    """Artifact and metrics paths under one output folder.

    Attributes:
        base: the folder holding ``artifacts/`` and ``metrics/`` (absolute).
    """

    base: Path

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_NAMES)}")
        return self.base / "artifacts" / stage

    def metrics(self, stage: str) -> Path:
        self.stage_dir(stage)  # validates the name
        return self.base / "metrics" / f"{stage}.json"

    def timings(self, stage: str) -> Path:
        self.stage_dir(stage)
        return self.base / "timings" / f"{stage}.json"

    def resolved_params(self, stage: str) -> Path:
        return self.stage_dir(stage) / "params.resolved.yaml"

    def relative(self, path: Path) -> str:
        """``path`` relative to :attr:`base`, POSIX style (the form stored in manifests)."""
        return Path(path).resolve().relative_to(self.base.resolve()).as_posix()

    # prepare
    @property
    def train(self) -> Path:
        return self.stage_dir("prepare") / "train.safetensors"

    @property
    def val(self) -> Path:
        return self.stage_dir("prepare") / "val.safetensors"

    @property
    def test(self) -> Path:
        return self.stage_dir("prepare") / "test.safetensors"

    @property
    def init_pool(self) -> Path:
        return self.stage_dir("prepare") / "init_pool.safetensors"

    @property
    def data_meta(self) -> Path:
        return self.stage_dir("prepare") / "meta.json"

    # pretrain
    @property
    def teacher(self) -> Path:
        return self.stage_dir("pretrain") / "teacher.safetensors"

    @property
    def teacher_spec(self) -> Path:
        return self.stage_dir("pretrain") / "model.json"

    @property
    def pretrain_curve(self) -> Path:
        return self.stage_dir("pretrain") / "curve.json"

    # judge
    @property
    def judge(self) -> Path:
        return self.stage_dir("judge") / "judge.safetensors"

    @property
    def judge_spec(self) -> Path:
        return self.stage_dir("judge") / "model.json"

    # extract
    def extract_shard(self, init: str, ipc: int, shard: int) -> Path:
        return self.stage_dir("extract") / "shards" / f"{init}_ipc{ipc}_shard{shard}.safetensors"

    def extract_shard_trace(self, init: str, ipc: int, shard: int) -> Path:
        return self.stage_dir("extract") / "shards" / f"{init}_ipc{ipc}_shard{shard}.trace.json"

    @property
    def dsv_parquet(self) -> Path:
        return self.stage_dir("extract") / "dsv.parquet"

    @property
    def extract_trace(self) -> Path:
        return self.stage_dir("extract") / "trace.json"

    @property
    def extract_trace_parquet(self) -> Path:
        return self.stage_dir("extract") / "trace.parquet"

    # coreset
    @property
    def lambdas_parquet(self) -> Path:
        return self.stage_dir("coreset") / "lambdas.parquet"

    @property
    def coreset_trace(self) -> Path:
        return self.stage_dir("coreset") / "trace.json"

    # distill
    def distill_cell(self, method: str, ipc: int) -> Path:
        return self.stage_dir("distill") / "cells" / f"{method}_ipc{ipc}.json"

    def distill_set(self, method: str, ipc: int) -> Path:
        return self.stage_dir("distill") / "sets" / f"{method}_ipc{ipc}.safetensors"

    def distill_student(self, method: str, ipc: int) -> Path:
        """The first-seed student of a cell (safetensors), logged to MLflow by the merge step."""
        return self.stage_dir("distill") / "students" / f"{method}_ipc{ipc}.safetensors"

    def distill_student_spec(self, method: str, ipc: int) -> Path:
        return self.stage_dir("distill") / "students" / f"{method}_ipc{ipc}.json"

    @property
    def distill_runs(self) -> Path:
        return self.stage_dir("distill") / "runs.json"

    # generate
    @property
    def generated_parquet(self) -> Path:
        """Every generated image (samples, interpolation strips, edits) with its target and probabilities."""
        return self.stage_dir("generate") / "generated.parquet"

    @property
    def generated(self) -> Path:
        """The same images as tensors (normalised space), for programs."""
        return self.stage_dir("generate") / "generated.safetensors"

    def generate_figure(self, name: str) -> Path:
        """``samples.png``, ``interpolation.png``, ``edits.png``."""
        return self.stage_dir("generate") / f"{name}.png"

    @property
    def generate_trace(self) -> Path:
        return self.stage_dir("generate") / "trace.json"

    # evaluate
    @property
    def judge_table(self) -> Path:
        """Judge accuracy, confidence and Fréchet distance of every image set (distilled and real)."""
        return self.stage_dir("evaluate") / "judge.json"

    @property
    def results_table(self) -> Path:
        return self.stage_dir("evaluate") / "results.md"

    @property
    def results_json(self) -> Path:
        """Every result row (method, IPC, accuracies, rank, label-robust score), for programs."""
        return self.stage_dir("evaluate") / "results.json"

    @property
    def headline(self) -> Path:
        """Test accuracy (%) of every method and the teacher: the one metrics file dvc.yaml lists, so ``dvc metrics
        show`` and ``dvc exp show`` lead with it (``metrics/<stage>.json`` are plain outputs)."""
        return self.base / "metrics" / "accuracy.json"

    @property
    def results_plot(self) -> Path:
        """Accuracy against IPC per method, a DVC plot."""
        return self.stage_dir("evaluate") / "acc_vs_ipc.json"
