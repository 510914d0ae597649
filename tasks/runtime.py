"""The ``runtime`` params section: where and how to run (never part of a cache key but for the device)."""

from __future__ import annotations

from dataclasses import dataclass

from dsv.checks import at_least, one_of
from tasks.ranges import GE1, Range, register

DEVICES = ("cpu", "cuda", "auto")
CUDA_GRAPHS = ("auto", "on", "off")
PROGRESS = ("auto", "on", "off")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to run. None of it changes the science; only the resolved device changes the bits of an
    artifact, so the device (never the rest of this section) is part of the cache key of the stages that compute
    on it (``tasks.stages.DEVICE_STAGES``).

    Attributes:
        device: "auto" (cuda when ``torch.cuda.is_available()``, else cpu), "cpu" or "cuda". Artifacts are
            bit-reproducible on CPU; on CUDA they agree with the CPU's within the spread of seeds, not bit for bit.
            The resolved device is recorded in every stage's ``timings/<stage>.json``, its MLflow run (tag
            ``device``) and the report.
        cuda_graphs: on CUDA, replay each fixed-shape training step (teacher, judge, students) from a CUDA graph
            captured once per training run: "auto" (= on when the device is cuda), "on" or "off". A step that
            cannot be captured runs eagerly (``dsv.train.StepRunner``); ignored on the CPU.
        threads: torch intra-op threads; 0 keeps torch's default.
        output_dir: folder holding ``artifacts/`` and ``metrics/``, relative to the project root.
        mlflow_experiment: MLflow experiment name.
        log_models: log the teacher and one student per (method, IPC) with ``mlflow.pytorch``.
        progress: progress bars: "auto" (only on a terminal), "on" or "off" (YAML's unquoted on/off and
            true/false booleans mean the same).
        workers: processes for the mapped units (shards, cells): 1 runs them one after another in this
            process; more starts a Dask LocalCluster of that many worker processes on 127.0.0.1 for the run
            (prefect-dask, one unit at a time each, no shared state; see :mod:`flows.runners`).
        dask_address: scheduler address of an existing Dask cluster (e.g. "tcp://127.0.0.1:8786") to run the
            mapped units on instead (``workers`` is then unused); null = as ``workers`` says.
        dvc_commit: after a successful ``dsv run`` in a DVC repository (a ``.dvc/`` folder next to
            dvc.yaml) with the default output folder, record the outputs in dvc.lock (``dvc commit``), so
            ``dvc status`` is clean and ``dvc repro`` reuses the run.
    """

    device: str = "auto"
    cuda_graphs: str = "auto"
    threads: int = 0
    output_dir: str = "."
    mlflow_experiment: str = "dsv"
    log_models: bool = True
    progress: str | bool = "auto"
    workers: int = 1
    dask_address: str | None = None
    dvc_commit: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "workers")
        if self.dask_address is not None and (not self.dask_address.strip()
                                              or any(c.isspace() for c in self.dask_address)):
            raise ValueError(f"dask_address must be a scheduler address like 'tcp://host:8786' or null, "
                             f"got {self.dask_address!r}")
        one_of("device", self.device, DEVICES)
        one_of("cuda_graphs", self.cuda_graphs, CUDA_GRAPHS)
        if isinstance(self.progress, bool):  # YAML 1.1 reads an unquoted on/off as a boolean
            object.__setattr__(self, "progress", "on" if self.progress else "off")
        one_of("progress", str(self.progress), PROGRESS)
        at_least(self, 0, "threads")
        if not self.mlflow_experiment:
            raise ValueError("mlflow_experiment must not be empty")


register(RuntimeConfig, {"threads": Range(0, note="0 = torch's default"), "workers": GE1})
