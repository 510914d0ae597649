"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Runs are addressed by explicit ids through :class:`mlflow.MlflowClient` (``mlflow.active_run`` is
thread-local, and Prefect runs tasks in worker threads). The tracking URI comes from
``MLFLOW_TRACKING_URI``; the default is ``sqlite:///<root>/mlflow.db`` with artifacts in
``<root>/mlartifacts`` (the experiment is created with that explicit artifact location).

Stages log through the small :class:`StageLog` interface, so they run the same with MLflow
(:class:`MlflowStageLog`) or without it (:class:`NullLog`, unit tests).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from tasks.atomic import pid_alive
from tasks.lock import init_lock
from tasks.paths import ProjectPaths
from tasks.plain import flatten

MAX_PARAM_CHARS = 6000


def quiet_environment() -> None:
    """Telemetry off for MLflow (and anything honouring DO_NOT_TRACK)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


# The user's MLFLOW_TRACKING_URI, read at import: mlflow.set_tracking_uri (called by Tracker for the
# fluent model-logging API) also writes that variable, which would send a later Tracker for another
# project root in the same process to the first project's store.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` (as set by the user) or the project-local SQLite store."""
    return _USER_TRACKING_URI or f"sqlite:///{ProjectPaths(root).mlflow_db.resolve()}"


def store_lock(uri: str, root: Path) -> Path | None:
    """The lock file serialising the creation of a SQLite store (:func:`tasks.lock.init_lock`): under ``.dsv``
    for the project's own store, beside the database for another one (shared by several projects); None for
    a tracking server, which creates its store itself."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    project = ProjectPaths(root)
    if db.resolve() == project.mlflow_db.resolve():
        return project.state / "mlflow-store.lock"
    return db.with_name(f".{db.name}.lock")


def git_commit(root: Path) -> str:
    """HEAD commit of the repository at ``root`` (with ``-dirty`` when there are local changes)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dvc_hashes(root: Path, stage: str) -> dict[str, str]:
    """``dvc.<path>`` -> md5 of the stage's outs recorded in dvc.lock (empty without DVC)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        data = YAML(typ="safe").load(lock.read_text()) or {}
    except YAMLError:
        return {}
    outs = (data.get("stages", {}).get(stage, {}) or {}).get("outs", []) or []
    return {f"dvc.{o['path']}": str(o.get("md5", "")) for o in outs if isinstance(o, dict) and "path" in o}


class StageLog(Protocol):
    """What a stage may log (all no-ops in :class:`NullLog`)."""

    def metric(self, key: str, value: float, step: int | None = None) -> None: ...

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None: ...

    def artifact(self, path: Path, subdir: str | None = None) -> None: ...

    def figure(self, fig: Any, name: str) -> None: ...

    def model(self, model: Any, name: str, input_example: Any) -> None: ...

    def tags(self, values: Mapping[str, str]) -> None: ...


class NullLog:
    """A :class:`StageLog` that records nothing."""

    def metric(self, key: str, value: float, step: int | None = None) -> None:
        pass

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        pass

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        pass

    def figure(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        plt.close(fig)

    def model(self, model: Any, name: str, input_example: Any) -> None:
        pass

    def tags(self, values: Mapping[str, str]) -> None:
        pass


class MlflowStageLog:
    """A :class:`StageLog` writing to one MLflow run by id (thread-safe, no fluent state)."""

    def __init__(self, client: Any, run_id: str, log_models: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.log_models = log_models

    def metric(self, key: str, value: float, step: int | None = None) -> None:
        v = float(value)
        if math.isfinite(v):
            self.client.log_metric(self.run_id, key, v, step=step or 0)

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in values.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    def figure(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(self.run_id, fig, name)
        finally:
            plt.close(fig)

    def model(self, model: Any, name: str, input_example: Any) -> None:
        if not self.log_models:
            return
        import mlflow.pytorch

        mlflow.pytorch.log_model(model, name=name, input_example=input_example, pip_requirements=[], run_id=self.run_id)

    def tags(self, values: Mapping[str, str]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, str(v))

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(values).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C (KeyboardInterrupt), SIGTERM (flows.cli's Terminated, Prefect's TerminationSignal)."""
    return isinstance(exc, KeyboardInterrupt) or type(exc).__name__ in ("Terminated", "TerminationSignal")


class Tracker:
    """An MLflow experiment in the project's store, with explicit-id runs.

    Args:
        root: project root (default store location, git commit, dvc.lock).
        experiment: experiment name.
        log_models: whether :meth:`MlflowStageLog.model` logs models.
    """

    def __init__(self, root: Path, experiment: str, log_models: bool = True) -> None:
        quiet_environment()
        import mlflow
        from mlflow import MlflowClient

        self.root = Path(root)
        self.uri = tracking_uri(self.root)
        mlflow.set_tracking_uri(self.uri)
        self.log_models = log_models
        lock = store_lock(self.uri, self.root)
        # The client opens the store at once, and the first one to open a SQLite store creates its tables: two
        # processes doing that at once break its migrations.
        with init_lock(lock, f"creating the MLflow store {self.uri}") if lock else contextlib.nullcontext():
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:"):
                    location = ProjectPaths(self.root).mlflow_artifacts.resolve().as_uri()
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
                except Exception:  # created concurrently by another process: read it back
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    self.experiment_id = exp.experiment_id
            else:
                self.experiment_id = exp.experiment_id
            # mlflow.pytorch.log_model files its LoggedModel under the fluent *active* experiment before it
            # looks at the run's: without this, models land in experiment 0 ("Default", ./mlruns).
            mlflow.set_experiment(experiment_id=self.experiment_id)
        self.commit = git_commit(self.root)

    def start_run(self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """Create a RUNNING run (nested under ``parent_id`` when given); returns its id.

        Every run records the pid and host that own it (tags ``dsv.pid``, ``dsv.host``), so a later run
        can tell a run whose process died (:meth:`close_stale_runs`) from one that is still working."""
        all_tags = {"git.commit": self.commit, "dsv.pid": str(os.getpid()), "dsv.host": socket.gethostname(),
                    **(tags or {})}
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    def end_run(self, run_id: str, error: BaseException | None = None) -> None:
        """Mark a run FINISHED; KILLED when ``error`` is an interrupt (Ctrl-C, SIGTERM); else FAILED, with
        the error message as tag ``error``."""
        if error is not None:
            killed = is_interrupt(error)
            message = "interrupted (Ctrl-C or SIGTERM)" if killed else f"{type(error).__name__}: {error}"
            with contextlib.suppress(Exception):
                self.client.set_tag(run_id, "error", message[:5000])
            self.client.set_terminated(run_id, status="KILLED" if killed else "FAILED")
        else:
            self.client.set_terminated(run_id, status="FINISHED")

    def close_stale_runs(self, by: str = "") -> list[str]:
        """Mark FAILED every RUNNING run of this experiment whose owning process (tags ``dsv.pid`` on
        ``dsv.host`` = this host) no longer exists: it was SIGKILLed, crashed or ran out of memory and
        could not close its run. Tag ``dsv.stale_reason`` says so. Returns the ids closed."""
        host = socket.gethostname()
        closed = []
        with contextlib.suppress(Exception):
            runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
            for r in runs:
                tags = r.data.tags
                if tags.get("dsv.host") != host or not tags.get("dsv.pid", "").isdigit():
                    continue
                pid = int(tags["dsv.pid"])
                if pid == os.getpid() or pid_alive(pid):
                    continue
                self.client.set_tag(r.info.run_id, "dsv.stale_reason",
                                    f"process {pid} ended without closing the run (killed, crashed or out of "
                                    f"memory); closed by {by or 'a later dsv run'}")
                self.client.set_terminated(r.info.run_id, status="FAILED")
                closed.append(r.info.run_id)
        return closed

    def log(self, run_id: str) -> MlflowStageLog:
        return MlflowStageLog(self.client, run_id, self.log_models)

    def log_json(self, run_id: str, data: Any, name: str) -> None:
        """Log ``data`` as a JSON artifact ``name`` of the run."""
        import json

        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            self.client.log_artifact(run_id, str(p))

    def copy_images(self, source_run: str, target_run: str) -> int:
        """Log the PNG artifacts of ``source_run`` (the run that computed a stage) to ``target_run`` (the run
        that restored it from cache), so the UI shows them on both. Returns how many were copied."""
        copied = 0
        with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
            todo = [""]
            while todo:
                folder = todo.pop()
                for info in self.client.list_artifacts(source_run, folder or None):
                    if info.is_dir:
                        todo.append(info.path)
                    elif info.path.endswith(".png"):
                        local = self.client.download_artifacts(source_run, info.path, tmp)
                        parent = str(Path(info.path).parent)
                        self.client.log_artifact(target_run, local, None if parent == "." else parent)
                        copied += 1
        return copied

    def log_results(self, parent_id: str, rows: list[dict[str, Any]], tags: Mapping[str, str] | None = None,
                    images: Mapping[str, Any] | None = None, models: Mapping[str, Any] | None = None,
                    input_example: Any = None) -> list[str]:
        """One nested run per result row (method, IPC), named "<method> · IPC <k>", tag ``dsv.kind=result``,
        with the row's own params (method, ipc, shots, protocol, labels, n_train) and metrics (acc_mean,
        acc_std, val_acc_mean, rank, the label-robust score, the second architecture's accuracy), so MLflow's
        table, compare and chart views rank the methods. ``images``/``models``: per "<method>_ipc<k>" key, a
        figure of the cell's training set and its first-seed student (logged with only this run's metrics).
        Returns the run ids."""
        ids = []
        for row in rows:
            if row.get("acc_mean") is None:
                continue
            key = f"{row['method']}_ipc{row['ipc']}"
            run_id = self.start_run(f"{row['method']} · IPC {row['ipc']}", parent_id,
                                    {"dsv.kind": "result", **(tags or {})})
            log = self.log(run_id)
            log.params({"method": row["method"], "ipc": row["ipc"], "shots": row["shots"],
                        "protocol": row["protocol"], "labels": row["label_type"], "n_train": row.get("n_train"),
                        **({"cross_model": row["cross_model"]} if row.get("cross_model") else {})})
            names = ("acc_mean", "acc_std", "val_acc_mean", "rank", "lrs_mean", "lrs_std", "hlr_mean", "ior_mean",
                     "cross_acc_mean", "cross_acc_std", "n_runs")
            log.metrics({k: row[k] for k in names if isinstance(row.get(k), (int, float))})
            if images and key in images:
                log.figure(images[key], f"set_{key}.png")
            if models and key in models:
                log.model(models[key], "student", input_example)
            self.end_run(run_id)
            ids.append(run_id)
        return ids

    def log_params_file(self, run_id: str, params: Mapping[str, Any], name: str = "params.resolved.yaml") -> None:
        """Log params (flattened) and the resolved params file as an artifact."""
        from tasks.plain import dump_yaml

        log = self.log(run_id)
        log.params(params)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(dump_yaml(params))
            self.client.log_artifact(run_id, str(p))

    @contextlib.contextmanager
    def stage_run(
        self,
        stage: str,
        parent_id: str | None,
        params: Mapping[str, Any],
        cached: bool = False,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[MlflowStageLog]:
        """A nested run for one stage: params logged, FAILED with the message if the body raises."""
        run_id = self.start_run(
            stage, parent_id, {"stage": stage, "cached": str(cached).lower(), **dvc_hashes(self.root, stage),
                               **(tags or {})},
        )
        try:
            self.log_params_file(run_id, params)
            yield self.log(run_id)
        except BaseException as exc:
            self.end_run(run_id, exc)
            raise
        else:
            self.end_run(run_id)
