"""MLflow tracking: one parent run per pipeline run, one nested run per stage it computed.

Runs are addressed by explicit ids through :class:`mlflow.MlflowClient` (``mlflow.active_run`` is
thread-local, and Prefect runs tasks in worker threads). The tracking URI comes from
``MLFLOW_TRACKING_URI``; the default is ``sqlite:///<root>/mlflow.db`` with artifacts in
``<root>/mlartifacts`` (the experiment is created with that explicit artifact location, and tagged as a
machine-learning experiment, so MLflow's UI opens it in its model-training view).

A project folder can be copied or moved: MLflow's SQL store keeps every artifact location as an absolute
``file://`` URI (it resolves a relative one when the experiment is created), and a proxied artifact store
(``mlflow-artifacts:``) would need a tracking server running during every ``dsv run``. So the project's
own store is *relocated on open* instead (:func:`relocate_store`: ``Tracker``, ``dsv ui``, ``dsv report``):
locations under another folder's ``mlartifacts`` are rewritten to this folder's, in this folder's
database only.

Stages log through the small :class:`StageLog` interface, so they run the same with MLflow
(:class:`MlflowStageLog`) or without it (:class:`NullLog`, unit tests).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
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
# The experiment tag MLflow's UI reads to open an experiment in its model-training view (runs, metrics,
# charts) rather than its GenAI view (traces); its URL parameter is ``workflowType=machine_learning``.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (markdown)
# The one file name of a result run's training-set picture, so MLflow's Compare shows sets side by side.
TRAINING_SET_PNG = "training_set.png"


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


def _own_store(root: Path) -> Path | None:
    """The project's own SQLite database when the tracking URI is it (not the user's MLFLOW_TRACKING_URI)."""
    db = ProjectPaths(root).mlflow_db.resolve()
    return db if tracking_uri(root) == f"sqlite:///{db}" else None


# Columns of MLflow's SQL store (3.x) that hold artifact locations.
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))


def relocate_store(root: Path) -> str | None:
    """Point the project's own store at this folder when the folder was copied or moved.

    An experiment created by :class:`Tracker` has the location ``file://<folder>/mlartifacts``. When that
    folder is not ``root``, every location under it (experiments, runs, logged models, as a ``file://`` URI
    or a plain path) is rewritten to the same place under ``root``, in one transaction of ``root``'s own
    database; the old folder is never read or written. Nothing happens for another tracking URI or an
    already local store. Call it under the store's creation lock (:func:`store_lock`).

    Returns:
        the old folder (a path) when the store was relocated, else None.
    """
    db = _own_store(root)
    if db is None or not db.is_file():
        return None
    here = ProjectPaths(root).mlflow_artifacts.resolve().as_uri()
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn, conn:
        try:
            locations = [loc for (loc,) in conn.execute("select artifact_location from experiments")]
        except sqlite3.OperationalError:  # no tables yet: MLflow creates them when the client opens it
            return None
        old = next((loc for loc in locations if isinstance(loc, str) and loc.startswith("file://")
                    and loc.endswith("/mlartifacts") and loc != here), None)
        if old is None:
            return None
        old_uri, new_uri = old.removesuffix("mlartifacts"), here.removesuffix("mlartifacts")
        old_path = urllib.parse.unquote(urllib.parse.urlparse(old_uri).path)
        new_path = urllib.parse.unquote(urllib.parse.urlparse(new_uri).path)
        tables = {name for (name,) in conn.execute("select name from sqlite_master where type = 'table'")}
        for table, column in _LOCATION_COLUMNS:
            if table not in tables:
                continue
            for a, b in ((old_uri, new_uri), (old_path, new_path)):
                conn.execute(f"update {table} set {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                             f"where substr({column}, 1, ?) = ?", (b, len(a) + 1, len(a), a))
    return old_path.rstrip("/")


def _forget_artifact_repos() -> None:
    """Empty MLflow's process-wide cache of artifact repositories, which is keyed by run id alone: a copy of a
    project opened in the same process as the original (its runs have the same ids) would otherwise write
    into the original's folder."""
    with contextlib.suppress(ImportError, AttributeError):
        from mlflow.tracking._tracking_service import utils

        utils._artifact_repos_cache.clear()


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


def model_metadata(meta: Any) -> dict[str, Any]:
    """What a logged model expects as input (MLflow model metadata): the normalisation, the input shape and the
    class names, from the prepared data's ``meta.json`` (:class:`tasks.artifacts.DataMeta`)."""
    return {
        "input": {"normalisation": "x = (raw - mean) / std per channel or feature (images: pixels in [0, 1])",
                  "mean": [float(v) for v in meta.mean], "std": [float(v) for v in meta.std],
                  "shape": [int(v) for v in meta.input_shape]},
        "classes": [str(c) for c in meta.classes],
        "dataset": str(meta.name),
    }


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
    """A :class:`StageLog` writing to one MLflow run by id (thread-safe, no fluent state).

    Args:
        client: the MLflow client.
        run_id: the run.
        log_models: whether :meth:`model` logs models.
        data_meta: the prepared data's ``meta.json``: a model logged here carries its normalisation, input
            shape and class names as metadata (:func:`model_metadata`) once that file exists.
    """

    def __init__(self, client: Any, run_id: str, log_models: bool = True, data_meta: Path | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.log_models = log_models
        self.data_meta = data_meta

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

    def model(self, model: Any, name: str, input_example: Any, metadata: dict[str, Any] | None = None) -> None:
        if not self.log_models:
            return
        import mlflow.pytorch

        if metadata is None and self.data_meta is not None and self.data_meta.is_file():
            from tasks.artifacts import read_data_meta

            metadata = model_metadata(read_data_meta(self.data_meta))
        mlflow.pytorch.log_model(model, name=name, input_example=input_example, pip_requirements=[],
                                 run_id=self.run_id, metadata=metadata)

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
            relocate_store(self.root)  # a copied or moved project folder: its own artifacts, never the old ones
            _forget_artifact_repos()
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:"):
                    location = ProjectPaths(self.root).mlflow_artifacts.resolve().as_uri()
                try:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except Exception:  # created concurrently by another process: read it back
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    self.experiment_id = exp.experiment_id
            else:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment made before the tag (never the user's choice)
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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

    def log(self, run_id: str, data_meta: Path | None = None) -> MlflowStageLog:
        """A :class:`StageLog` on ``run_id``; models it logs carry ``data_meta``'s normalisation."""
        return MlflowStageLog(self.client, run_id, self.log_models, data_meta)

    def run_exists(self, run_id: str | None) -> bool:
        """Whether ``run_id`` is a run of this store (a cache record may name a run of another store, or a
        deleted one)."""
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST), a malformed id
            return False
        return run.info.lifecycle_stage == "active"

    def parent_of(self, run_id: str) -> str | None:
        """The run ``run_id`` is nested under, or None for a top-level run."""
        return self.client.get_run(run_id).data.tags.get("mlflow.parentRunId")

    def note(self, run_id: str, markdown: str) -> None:
        """Set a run's description (shown on its page in the UI)."""
        self.client.set_tag(run_id, NOTE_TAG, markdown)

    def log_json(self, run_id: str, data: Any, name: str) -> None:
        """Log ``data`` as a JSON artifact ``name`` of the run."""
        import json

        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            self.client.log_artifact(run_id, str(p))

    def log_results(self, parent_id: str, rows: list[dict[str, Any]], tags: Mapping[str, str] | None = None,
                    images: Mapping[str, Any] | None = None, models: Mapping[str, Any] | None = None,
                    input_example: Any = None, metadata: dict[str, Any] | None = None) -> list[str]:
        """One nested run per result row (method, IPC), named "<method> · IPC <k>", tag ``dsv.kind=result``,
        so MLflow's table, compare and chart views rank the methods. Each has the row's params (method, its
        readable name, ipc, shots, protocol, labels, n_train) and its metrics in percent where the results
        table uses percent (``acc_pct``, ``acc_std_pct``, ``delta_best_pct``, ``delta_random_pct``,
        ``val_acc_pct``, ``probe_acc_pct``, ``lrs_pct``, ``cross_acc_pct``) beside ``rank`` and ``n_runs``
        (rows from :func:`tasks.report.ranked_rows`).

        ``images``/``models``: per "<method>_ipc<k>" key, a figure of the cell's training set (logged as
        ``training_set.png`` in every run, so Compare shows the sets side by side) and its first-seed student
        (logged as ``student-<method>-ipc<k>`` with ``metadata``: the input normalisation). Returns the run ids.
        """
        ids = []
        for row in rows:
            if row.get("acc_mean") is None:
                continue
            key = f"{row['method']}_ipc{row['ipc']}"
            run_id = self.start_run(f"{row['method']} · IPC {row['ipc']}", parent_id,
                                    {"dsv.kind": "result", **(tags or {})})
            log = self.log(run_id)
            log.params({"method": row["method"], "method_name": row.get("label", row["method"]), "ipc": row["ipc"],
                        "shots": row["shots"], "protocol": row["protocol"], "labels": row["label_type"],
                        "n_train": row.get("n_train"),
                        **({"cross_model": row["cross_model"]} if row.get("cross_model") else {})})
            percent = {"acc_pct": "acc_mean", "acc_std_pct": "acc_std", "delta_best_pct": "delta_best",
                       "delta_random_pct": "delta_random", "val_acc_pct": "val_acc_mean", "probe_acc_pct": "probe_acc",
                       "lrs_pct": "lrs_mean", "lrs_std_pct": "lrs_std", "cross_acc_pct": "cross_acc_mean",
                       "cross_acc_std_pct": "cross_acc_std"}
            values = {name: round(100 * row[k], 4) for name, k in percent.items()
                      if isinstance(row.get(k), (int, float))}
            values.update({k: row[k] for k in ("rank", "n_runs") if isinstance(row.get(k), (int, float))})
            log.metrics(values)
            if images and key in images:
                log.figure(images[key], TRAINING_SET_PNG)
            if models and key in models:
                log.model(models[key], f"student-{row['method']}-ipc{row['ipc']}", input_example, metadata)
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
    def stage_run(self, stage: str, parent_id: str | None, params: Mapping[str, Any],
                  tags: Mapping[str, str] | None = None, data_meta: Path | None = None) -> Iterator[MlflowStageLog]:
        """The run of one stage (nested under ``parent_id`` when given): params logged, FINISHED when the body
        returns, FAILED with the message (KILLED on an interrupt) when it raises. ``dsv run`` and ``dsv stage``
        open every stage run here (:func:`flows.pipeline.execute_stage`)."""
        run_id = self.start_run(stage, parent_id, {"stage": stage, **dvc_hashes(self.root, stage), **(tags or {})})
        try:
            self.log_params_file(run_id, params)
            yield self.log(run_id, data_meta)
        except BaseException as exc:
            self.end_run(run_id, exc)
            raise
        else:
            self.end_run(run_id)
