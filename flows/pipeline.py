"""The Prefect flow: prepare -> pretrain -> judge -> extract -> coreset -> distill -> generate -> evaluate, and the
one stage runner that ``dsv run`` and ``dsv stage`` share.

Caching (:mod:`flows.cache`: JSON records under ``.dsv/cache``, valid across processes, never
unpickled; Prefect itself persists nothing) is keyed on the stage name, the params sections the stage
reads, the SHA-256 of every upstream artifact, the unit for mapped stages, the source of the work function
(:func:`stage_work`, :func:`unit_work`, :func:`merge_work`) and the stage's code closure (tasks/<stage>.py, the
tasks modules it imports and the transitive dsv/ modules it calls; see tasks.stages.code_modules) and, for the
stages that compute on a device (tasks.stages.DEVICE_STAGES), the resolved device type ("cpu" or "cuda"), so a
CPU result never stands in for a CUDA run or the reverse; NOT on the rest of the runtime context (paths, MLflow
run id, threads, workers). A hit finishes the task in Prefect's ``Cached`` state.

Tasks exchange small references only (params dicts, relative paths, content hashes). Since a cached
result only *describes* files, every cache hit is checked against the files on disk: a missing or
modified artifact makes the task run again and replace the record. Extraction and
distillation are mapped over their units (class shards; (method, IPC) cells), one task each, so an
interrupted stage resumes from its last completed unit.

One runner, :func:`run_stage`: a stage is one call, or its units then a merge, executed by a *mapper*:
:class:`PrefectMapper` (``dsv run``: Prefect tasks, the units mapped on the flow's task runner: a worker thread,
or Dask processes) or :class:`LocalMapper` (``dsv stage``, what DVC runs: one unit after another in this process).
Both go through the same cache records, so each restores what the other computed.

One way to record a stage in MLflow, :func:`execute_stage`: a stage that computes anything gets its run
(:meth:`tasks.tracking.Tracker.stage_run`; ``dsv run`` nests it under the pipeline run, opened at the first stage
that needs it), marked FAILED with the error when the stage fails. A stage restored entirely from cache whose
producing run is in the store opens no run: its cache record names that run (``produced_by``), so an unchanged
re-run adds no run and uploads nothing, and MLflow keeps one set of result runs per result.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from flows import stop
from flows.cache import cache_key, external_inputs, last_output, lookup, source_hash, store, store_last
from tasks.artifacts import read_json
from tasks.config import ConfigError, PipelineConfig, data_checks, load_config
from tasks.lock import OutputLock
from tasks.output import StageOutput, device_of
from tasks.paths import STAGE_NAMES, Paths
from tasks.plain import flatten
from tasks.progress import Bar
from tasks.stages import DEVICE_STAGES, STAGES, restore_metrics
from tasks.tracking import NullLog, StageLog, Tracker, dvc_hashes

FLOW_NAME = "dsv-pipeline"


# IO errors that a retry cannot fix: a full disk, a read-only or forbidden output folder.
_FINAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR})


def retry_on_io(task: Any, task_run: Any, state: State) -> bool:
    """Retry a failed stage task only when it failed on transient IO; never on a bug, bad data, a
    full disk or an unwritable folder."""
    try:
        state.result()
    except OSError as exc:
        return exc.errno not in _FINAL_ERRNOS
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


_TRACKERS: dict[tuple[str, str], Tracker] = {}


def _set_threads(cfg: PipelineConfig) -> None:
    """torch's intra-op threads from ``runtime.threads`` (0 keeps torch's default), in whatever process runs a stage."""
    if cfg.runtime.threads > 0:
        import torch

        torch.set_num_threads(cfg.runtime.threads)


def _open(cfg: PipelineConfig, context: dict[str, Any]) -> tuple[Paths, StageLog]:
    """The output layout and MLflow logger inside a task (in this process or a Dask worker), and torch's threads."""
    _set_threads(cfg)
    paths = Paths(Path(context["base"]))
    if not context.get("run_id"):
        return paths, NullLog()
    key = (context["root"], cfg.runtime.mlflow_experiment)
    if key not in _TRACKERS:
        try:
            _TRACKERS[key] = Tracker(Path(context["root"]), cfg.runtime.mlflow_experiment, cfg.runtime.log_models)
        except Exception as exc:  # noqa: BLE001 - e.g. a Dask worker that cannot reach the store
            # Logging is a courtesy; the artifacts are the record: warn and run the unit unlogged.
            from prefect.logging import get_run_logger

            get_run_logger().warning(f"MLflow logging skipped in this worker process: {type(exc).__name__}: {exc}")
            return paths, NullLog()
    return paths, _TRACKERS[key].log(context["run_id"], paths.data_meta)


# --------------------------------------------------------------------------------- the work of a stage


def _plain(result: Any) -> Any:
    """Through JSON, so a fresh result and a cached one are the same plain data."""
    return json.loads(json.dumps(result, allow_nan=True))


def _inputs(stage: str, cfg: PipelineConfig, upstream: dict[str, str], **extra: Any) -> dict[str, Any]:
    """A cache key's inputs: the stage's params section as plain data, its upstream artifacts' hashes, ``extra``
    (the unit; the units' files) and, for a stage that computes on a device, the resolved device type."""
    inputs = {"params": cfg.sections(STAGES[stage].sections), "upstream": upstream, **extra}
    if stage in DEVICE_STAGES:
        inputs["device"] = device_of(cfg)
    return inputs


def cached_call(kind: str, stage: str, inputs: dict[str, Any], fn: Callable[[], Any], context: dict[str, Any]
                ) -> tuple[Any, bool]:
    """(the verified cache record for these inputs, True), else (``fn()``'s result, recorded, False).

    ``context["keyed"]`` False (``dsv stage`` without intact upstream records) runs ``fn`` and records nothing;
    keys in ``context["verified"]`` were verified by :func:`probe` an instant ago and are not hashed again.
    """
    if not context.get("keyed", True):
        return _plain(fn()), False
    root, paths = Path(context["root"]), Paths(Path(context["base"]))
    key = cache_key(kind, _WORK_SOURCES[kind], stage, **inputs)
    hit = lookup(root, stage, key, paths, verify_files=key not in context.get("verified", ()))
    if hit is not None:
        return hit, True
    result = _plain(fn())
    if kind != "unit":
        result["produced_by"] = context.get("run_id")  # the MLflow run a later cache hit points to
    store(root, stage, key, result)
    return result, False


def stage_work(stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any]
               ) -> tuple[dict[str, Any], bool]:
    """A whole (unmapped) stage on its restricted config: (its :class:`StageOutput` as a dict, from cache)."""

    def run() -> dict[str, Any]:
        return STAGES[stage].module.run(cfg, *_open(cfg, context)).to_dict()  # type: ignore[no-any-return]

    return cached_call("stage", stage, _inputs(stage, cfg, upstream), run, context)


def unit_work(stage: str, unit: dict[str, Any], cfg: PipelineConfig, upstream: dict[str, str],
              context: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """One unit (extract shard, distill cell) of a mapped stage: (its result, from cache)."""

    def run() -> dict[str, Any]:
        paths, log = _open(cfg, context)
        return STAGES[stage].module.run_unit(cfg, paths, unit, log)  # type: ignore[no-any-return]

    return cached_call("unit", stage, _inputs(stage, cfg, upstream, unit=unit), run, context)


def merge_work(stage: str, cfg: PipelineConfig, upstream: dict[str, str], unit_results: list[dict[str, Any]],
               context: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The merge of a mapped stage's units (keyed on the units' files): (its output as a dict, from cache)."""

    def run() -> dict[str, Any]:
        paths, log = _open(cfg, context)
        return STAGES[stage].module.merge(cfg, paths, log, unit_results).to_dict()  # type: ignore[no-any-return]

    unit_files = [r["files"] for r in unit_results]
    return cached_call("merge", stage, _inputs(stage, cfg, upstream, unit_files=unit_files), run, context)


# The work functions' sources, part of every cache key (hashed here, where the module is imported from its file).
_WORK_SOURCES = {"stage": source_hash(stage_work), "unit": source_hash(unit_work), "merge": source_hash(merge_work)}


def probe(stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any]
          ) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """Whether :func:`run_stage` would restore the whole stage from cache, without running anything:
    (the stage's (or merge's) verified record or None, its cache key, the keys verified on the way). Stops at the
    first miss."""
    if not context.get("keyed", True):
        return None, None, []
    spec = STAGES[stage]
    view = cfg.restricted(spec.sections)
    root, paths = Path(context["root"]), Paths(Path(context["base"]))
    verified: list[str] = []

    def hit(kind: str, inputs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        key = cache_key(kind, _WORK_SOURCES[kind], stage, **inputs)
        record = lookup(root, stage, key, paths)
        if record is not None:
            verified.append(key)
        return record, key

    if not spec.mapped:
        record, key = hit("stage", _inputs(stage, view, upstream))
        return record, key, verified
    unit_results = []
    for unit in spec.module.units(view):
        record, _ = hit("unit", _inputs(stage, view, upstream, unit=unit))
        if record is None:
            return None, None, verified
        unit_results.append(record)
    record, key = hit("merge", _inputs(stage, view, upstream, unit_files=[r["files"] for r in unit_results]))
    return record, key, verified


# ------------------------------------------------------------------------------- mappers and the runner

# Prefect persists nothing and caches nothing: its result files are cloudpickle, unpickled on load
# whatever the task asks for. flows.cache keeps JSON records instead (see there).
_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 2,
    "retry_delay_seconds": 2,
    "retry_condition_fn": retry_on_io,
}


def _as_state(result: Any, hit: bool) -> Any:
    return Completed(data=result, name="Cached", message="restored from its JSON cache record") if hit else result


@task(name="stage", task_run_name="{stage}", **_TASK_OPTIONS)
def stage_task(stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any]) -> Any:
    return _as_state(*stage_work(stage, cfg, upstream, context))


@task(name="unit", task_run_name="{stage}-{label}", **_TASK_OPTIONS)
def unit_task(stage: str, label: str, unit: dict[str, Any], cfg: PipelineConfig, upstream: dict[str, str],
              context: dict[str, Any]) -> Any:
    return _as_state(*unit_work(stage, unit, cfg, upstream, context))


@task(name="merge", task_run_name="{stage}-merge", **_TASK_OPTIONS)
def merge_task(stage: str, cfg: PipelineConfig, upstream: dict[str, str], unit_results: list[dict[str, Any]],
               context: dict[str, Any]) -> Any:
    return _as_state(*merge_work(stage, cfg, upstream, unit_results, context))


def _checked(state: State) -> tuple[Any, bool]:
    """(result, restored from a verified cache record) of a finished task state."""
    return state.result(), state.name == "Cached"


class PrefectMapper:
    """``dsv run``: each call a Prefect task of the running flow, the units mapped on the flow's task runner (a
    worker thread, or Dask worker processes: flows.runners)."""

    def whole(self, stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any]
              ) -> tuple[Any, bool]:
        return _checked(stage_task(stage, cfg, upstream, context, return_state=True))

    def units(self, stage: str, units: list[dict[str, Any]], cfg: PipelineConfig, upstream: dict[str, str],
              context: dict[str, Any]) -> list[Any]:
        labels = ["_".join(str(v) for v in u.values()) for u in units]
        return list(unit_task.map(unmapped(stage), labels, units, unmapped(cfg), unmapped(upstream),
                                  unmapped(context), return_state=False))

    def wait(self, future: Any) -> None:
        future.wait()

    def result(self, future: Any) -> tuple[Any, bool]:
        return _checked(future.state)

    def merge(self, stage: str, cfg: PipelineConfig, upstream: dict[str, str], unit_results: list[dict[str, Any]],
              context: dict[str, Any]) -> tuple[Any, bool]:
        return _checked(merge_task(stage, cfg, upstream, unit_results, context, return_state=True))

    def interrupted(self) -> None:
        # Ctrl-C and SIGTERM reach the main thread only: the unit computing on a worker thread stops at its next
        # step instead of finishing (flows.stop); queued units never start.
        stop.request()


@dataclass
class _Pending:
    """A unit of :class:`LocalMapper`: computed when waited on."""

    work: Callable[[], tuple[Any, bool]]
    done: tuple[Any, bool] | None = None


class LocalMapper:
    """``dsv stage`` (what DVC runs): every call in this process, the units one after another."""

    def whole(self, stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any]
              ) -> tuple[Any, bool]:
        return stage_work(stage, cfg, upstream, context)

    def units(self, stage: str, units: list[dict[str, Any]], cfg: PipelineConfig, upstream: dict[str, str],
              context: dict[str, Any]) -> list[_Pending]:
        return [_Pending(functools.partial(unit_work, stage, u, cfg, upstream, context)) for u in units]

    def wait(self, unit: _Pending) -> None:
        unit.done = unit.work()

    def result(self, unit: _Pending) -> tuple[Any, bool]:
        assert unit.done is not None
        return unit.done

    def merge(self, stage: str, cfg: PipelineConfig, upstream: dict[str, str], unit_results: list[dict[str, Any]],
              context: dict[str, Any]) -> tuple[Any, bool]:
        return merge_work(stage, cfg, upstream, unit_results, context)

    def interrupted(self) -> None:
        pass  # the unit computes on this (the main) thread: the interrupt already stopped it


Mapper = PrefectMapper | LocalMapper


def run_stage(stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any], mapper: Mapper
              ) -> tuple[StageOutput, bool]:
    """Run one stage on ``cfg`` restricted to its section, through ``mapper``: one call, or the stage's units (one
    progress tick per finished unit, in order) then their merge. Returns (output, restored entirely from cache)."""
    spec = STAGES[stage]
    view = cfg.restricted(spec.sections)
    if not spec.mapped:
        result, cached = mapper.whole(stage, view, upstream, context)
        return StageOutput.from_dict(result), cached
    pending = mapper.units(stage, spec.module.units(view), view, upstream, context)
    try:
        with Bar(cfg.runtime.progress, len(pending), stage, unit="unit") as bar:
            for unit in pending:
                mapper.wait(unit)
                bar.advance()
    except BaseException:
        mapper.interrupted()
        raise
    done = [mapper.result(unit) for unit in pending]
    result, cached = mapper.merge(stage, view, upstream, [r for r, _ in done], context)
    return StageOutput.from_dict(result), cached and all(hit for _, hit in done)


# ----------------------------------------------------------------------------- one stage, recorded


class Tracking:
    """Where ``dsv run`` and ``dsv stage`` record their stages in MLflow.

    Args:
        tracker: the experiment.
        runner: tag ``runner`` of the stage runs ("prefect" or "dvc").
        pipeline: (name, tags, params) of the pipeline run the stage runs nest under (``dsv run``), opened
            when the first stage needs it; None: top-level stage runs (``dsv stage``).

    Attributes:
        parent: the pipeline run, once opened.
        reused: stage -> the run that computed it, for the stages restored from cache without a run of their own.
    """

    def __init__(self, tracker: Tracker, runner: str,
                 pipeline: tuple[str, dict[str, str], dict[str, Any]] | None = None) -> None:
        self.tracker = tracker
        self.runner = runner
        self._pipeline = pipeline
        self.parent: str | None = None
        self.reused: dict[str, str] = {}
        self._known: dict[str, bool] = {}

    def open_parent(self) -> str | None:
        if self._pipeline is None:
            return None
        if self.parent is None:
            name, tags, params = self._pipeline
            self.parent = self.tracker.start_run(name, tags=tags)
            self.tracker.log_params_file(self.parent, params)
        return self.parent

    def known(self, run_id: str | None) -> bool:
        """Whether ``run_id`` is a run of this store (memoised)."""
        if not run_id:
            return False
        if run_id not in self._known:
            self._known[run_id] = self.tracker.run_exists(run_id)
        return self._known[run_id]

    def results_run(self, out: StageOutput | None) -> str | None:
        """The pipeline run that computed ``out`` (the parent of its stage run), or that stage run itself when it
        is top-level (``dsv stage``); None when it is not in this store."""
        if out is None or not self.known(out.produced_by):
            return None
        assert out.produced_by is not None
        return self.tracker.parent_of(out.produced_by) or out.produced_by


def execute_stage(stage: str, cfg: PipelineConfig, root: Path, paths: Paths, upstream: dict[str, str],
                  mapper: Mapper, tracking: Tracking | None, keyed: bool = True) -> tuple[StageOutput, bool]:
    """One stage for ``dsv run`` and ``dsv stage`` alike: run it (:func:`run_stage`) and record it.

    With ``tracking``, the stage gets an MLflow run (:meth:`Tracker.stage_run`) unless it is restored entirely
    from cache and the run that computed it is in the store (then it is listed in ``tracking.reused``). The run
    holds the stage's params, tags ``cached`` and ``device``, ``artifact_hashes.json``, the resolved params and
    its wall time; a stage restored from a record whose run is not in the store (computed with ``--no-mlflow``,
    or in another store) also gets the record's metrics, and the record then names this run. Afterwards the
    stage's metrics files are restored from its output and it becomes the stage's latest output
    (``flows.cache.store_last``). Returns (output, restored entirely from cache).
    """
    spec = STAGES[stage]
    context: dict[str, Any] = {"root": str(root), "base": str(paths.base), "run_id": None, "keyed": keyed}
    started = time.perf_counter()
    record, key, verified = probe(stage, cfg, upstream, context) if tracking is not None else (None, None, [])
    context["verified"] = verified
    if tracking is None or (record is not None and tracking.known(record.get("produced_by"))):
        out, cached = run_stage(stage, cfg, upstream, context, mapper)
        if tracking is not None and cached and out.produced_by:
            tracking.reused[stage] = out.produced_by
    else:
        tracker = tracking.tracker
        with tracker.stage_run(stage, tracking.open_parent(), cfg.sections(spec.sections),
                               {"runner": tracking.runner}, paths.data_meta) as log:
            context["run_id"] = log.run_id
            out, cached = run_stage(stage, cfg, upstream, context, mapper)
            log.tags({"cached": str(cached).lower(), "device": str(out.timings.get("device", "cpu"))})
            tracker.log_json(log.run_id, {"sha256": out.files, "dvc_md5": dvc_hashes(root, stage)},
                             "artifact_hashes.json")
            if cached:  # recorded outside this store: its numbers here, and the record names this run from now on
                log.metrics({k: v for k, v in flatten({**out.metrics, **out.timings}).items()
                             if isinstance(v, (int, float))})
                if record is not None and key is not None:
                    store(root, stage, key, {**record, "produced_by": log.run_id})
                out.produced_by = log.run_id
            log.artifact(paths.resolved_params(stage))
            log.metric("stage_seconds", time.perf_counter() - started)
            if stage == "evaluate" and tracking.parent is None:  # dsv stage: the result runs nest under this run
                _log_results(tracker, log.run_id, cfg, paths, students=not cached)
    restore_metrics(paths, out)
    store_last(root, out)
    if stage == "prepare":
        _check_data(cfg, paths)
    return out, cached


def run_one_stage(stage: str, cfg: PipelineConfig, root: Path, paths: Paths, tracking: Tracking | None
                  ) -> tuple[StageOutput, bool]:
    """One stage in this process, without Prefect (``dsv stage``, what dvc.yaml runs), through the same cache
    records as the flow: the upstream artifacts are named by the upstream stages' latest outputs
    (``flows.cache.last_output``), so a stage ``dsv run`` finished is restored here, and a stage run here is
    restored by the next ``dsv run``. Returns (output, restored from cache). Without intact upstream records
    the stage simply runs and records nothing but its latest output.
    """
    spec = STAGES[stage]
    _sweep(root)
    _set_threads(cfg)
    if stage != "prepare" and paths.data_meta.is_file():
        _check_data(cfg, paths)  # as `dsv run` does right after prepare: before this stage trains anything
    ups = [last_output(root, u, paths) for u in spec.upstream]
    upstream = {rel: sha for u in ups if u is not None for rel, sha in u.files.items()}
    upstream.update(external_inputs(cfg, stage))
    return execute_stage(stage, cfg, root, paths, upstream, LocalMapper(), tracking,
                         keyed=all(u is not None for u in ups))


def _check_data(cfg: PipelineConfig, paths: Paths) -> None:
    """The data-dependent checks (:func:`tasks.config.data_checks`) on the prepared data's class counts."""
    meta = read_json(paths.data_meta)
    errors = data_checks(cfg, meta["classes"], meta["train_per_class"],
                         meta.get("test_per_class", [1] * len(meta["classes"])), meta.get("input_shape"))
    if errors:
        raise ConfigError("; ".join(errors))


# ------------------------------------------------------------------------------------------- the flow


def _flow_run_name() -> str:
    """Prefect's flow run name: ``<dataset>-<params hash>``, the MLflow pipeline run's name in a URL-friendly
    form, so past flow runs are found by configuration."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    try:
        root = Path(p.get("root") or ".").resolve()
        path = Path(p.get("params_path") or "params.yaml")
        cfg = load_config(path if path.is_absolute() else root / path, p.get("overrides") or [])
    except Exception:  # noqa: BLE001 - only a name: the flow itself reports bad params
        return FLOW_NAME
    return run_name(cfg).replace(" · ", "-")


@flow(name=FLOW_NAME, flow_run_name=_flow_run_name, log_prints=True, validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(
    params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".", track: bool = True,
    lock_wait: float | None = 0.0, until: str | None = None,
) -> dict[str, Any]:
    """The whole pipeline; returns {"stages": {name: {"cached": bool, "files": {...}, "seconds": float}},
    "mlflow_run_id" (the pipeline run of this run, or the one that computed its results when every stage was
    restored), "mlflow_new_run" (whether this run opened it), "mlflow_experiment_id", "mlflow_uri",
    "output_dir"}.

    Args:
        params_path: the params file (relative to ``root`` unless absolute).
        overrides: ``section.key=value`` overrides.
        root: project root (MLflow store, Prefect results; output folder from ``runtime.output_dir``); ``dsv``
            passes "." (it runs in the project root), so the flow run's parameters hold no absolute path.
        track: log to MLflow.
        lock_wait: seconds to wait when another dsv process holds the output folder's lock
            (:mod:`tasks.lock`); 0 refuses at once; None: the caller holds it (``dsv run`` takes it before
            Prefect starts).
        until: stop after this stage (benchmarks and tests of the early stages); None runs them all.
    """
    if until is not None and until not in STAGE_NAMES:
        raise ValueError(f"until = {until!r} is not one of {', '.join(STAGE_NAMES)}")
    root_path = Path(root).resolve()
    p = Path(params_path)
    cfg = load_config(p if p.is_absolute() else root_path / p, overrides or [])
    paths = Paths((root_path / cfg.runtime.output_dir).resolve())
    stop.clear()  # a stop requested in an earlier run of this process (flows.stop)
    with contextlib.nullcontext() if lock_wait is None else OutputLock(paths.base, "dsv run", lock_wait):
        _sweep(root_path)
        return _pipeline(cfg, params_path, root_path, paths, track, until or STAGE_NAMES[-1])


def _sweep(root: Path) -> None:
    """Temp files of a writer that was killed (SIGKILL, OOM) in the stage cache, shared by every output folder
    (the output folder's own were swept when its lock was taken, :mod:`tasks.lock`)."""
    from flows.cache import cache_dir
    from tasks.atomic import sweep_stale_temps

    sweep_stale_temps(cache_dir(root))


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the project root when inside it (an MLflow tag that survives moving the folder)."""
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _pipeline(cfg: PipelineConfig, params_path: str, root_path: Path, paths: Paths, track: bool, until: str
              ) -> dict[str, Any]:
    tracker = Tracker(root_path, cfg.runtime.mlflow_experiment, cfg.runtime.log_models) if track else None
    tracking = None
    if tracker is not None:
        tracker.close_stale_runs(by=f"dsv run (pid {os.getpid()})")
        params_file = Path(params_path) if Path(params_path).is_absolute() else root_path / params_path
        tags = {"params_file": _relative(params_file, root_path), "runner": "prefect",
                "output_dir": _relative(paths.base, root_path), "dsv.kind": "pipeline",
                "dataset": cfg.prepare.data.name, "device": device_of(cfg)}
        tracking = Tracking(tracker, "prefect", (run_name(cfg), tags, cfg.to_dict()))
    summary: dict[str, Any] = {
        "stages": {}, "mlflow_run_id": None, "mlflow_new_run": False, "output_dir": str(paths.base),
        "mlflow_experiment_id": tracker.experiment_id if tracker else None,
        "mlflow_uri": tracker.uri if tracker else None,
    }
    outputs: dict[str, StageOutput] = {}
    started = time.perf_counter()
    mapper = PrefectMapper()
    try:
        for stage in STAGE_NAMES[: STAGE_NAMES.index(until) + 1]:
            upstream = {rel: sha for up in STAGES[stage].upstream for rel, sha in outputs[up].files.items()}
            upstream.update(external_inputs(cfg, stage))
            t0 = time.perf_counter()
            out, cached = execute_stage(stage, cfg, root_path, paths, upstream, mapper, tracking)
            outputs[stage] = out
            summary["stages"][stage] = {"cached": cached, "files": out.files, "seconds": time.perf_counter() - t0}
            print(f"stage {stage}: {'cached' if cached else 'ran'} ({time.perf_counter() - t0:.1f} s)")
        if tracking is not None:
            _close_pipeline_run(tracking, cfg, paths, outputs, summary, started)
    except BaseException as exc:
        if tracking is not None and tracking.parent is not None:
            tracking.tracker.end_run(tracking.parent, exc)
        raise
    return summary


def _close_pipeline_run(tracking: Tracking, cfg: PipelineConfig, paths: Paths, outputs: dict[str, StageOutput],
                        summary: dict[str, Any], started: float) -> None:
    """The pipeline run's results and close: when evaluate was recorded in this run, one run per result row
    (:func:`_log_results`); the ranked table as its description; the stages it reused, by their runs. A run
    that restored every stage from runs in the store opened no pipeline run: the summary then names the
    pipeline run that computed its last stage."""
    tracker, parent = tracking.tracker, tracking.parent
    if parent is None:
        summary["mlflow_run_id"] = tracking.results_run(outputs[list(outputs)[-1]]) if outputs else None
        return
    log = tracker.log(parent)
    if "evaluate" in outputs:
        if "evaluate" not in tracking.reused:
            _log_results(tracker, parent, cfg, paths, students=not summary["stages"]["distill"]["cached"])
        else:
            _describe(tracker, parent, paths, tracking.results_run(outputs["evaluate"]))
        log.metric("teacher_acc_pct", round(100 * float(outputs["evaluate"].metrics["teacher_acc"]), 4))
        log.artifact(paths.results_table)
    log.metric("pipeline_seconds", time.perf_counter() - started)
    log.tags({"cached_stages": ",".join(s for s, v in summary["stages"].items() if v["cached"]),
              **{f"dsv.reused.{stage}": run for stage, run in tracking.reused.items()}})
    tracker.end_run(parent)
    summary["mlflow_run_id"], summary["mlflow_new_run"] = parent, True


def run_name(cfg: PipelineConfig) -> str:
    """The parent run's name: the dataset and a short hash of every non-runtime param ("fashion_mnist · 3f9c2a1b"),
    so two runs with the same name ran the same configuration."""
    from tasks.plain import params_hash

    data = cfg.prepare.data
    name = data.name if data.name not in ("imagefolder", "tabular") else f"{data.name}:{Path(data.root).name}"
    return f"{name} · {params_hash({k: v for k, v in cfg.to_dict().items() if k != 'runtime'})[:8]}"


def _describe(tracker: Tracker, run_id: str, paths: Paths, results_run: str | None = None) -> None:
    """The run's description: the ranked results table (and where the result runs are when not under it)."""
    from tasks.report import ranked_markdown

    text = ranked_markdown(read_json(paths.results_json))
    if results_run and results_run != run_id:
        text += f"\nRestored from cache: the result runs are under run `{results_run}`, which computed them.\n"
    tracker.note(run_id, text)


def _log_results(tracker: Tracker, parent: str, cfg: PipelineConfig, paths: Paths, students: bool) -> None:
    """One MLflow run per result row, nested under ``parent`` (see ``Tracker.log_results``), with the cell's
    training set as ``training_set.png`` and, when ``students`` (the students were trained in this run), its
    first-seed student as a model carrying the input normalisation; the ranked table as ``parent``'s
    description."""
    from dsv.data.core import denormalize
    from tasks.artifacts import load_model, load_split, load_tensors, read_data_meta
    from tasks.figures import image_grid
    from tasks.report import ranked_rows
    from tasks.tracking import model_metadata

    rows = ranked_rows(read_json(paths.results_json)["rows"])
    meta = read_data_meta(paths.data_meta)
    images, models = {}, {}
    for row in rows:
        key = f"{row['method']}_ipc{row['ipc']}"
        if row["method"] != "full" and len(meta.input_shape) == 3 and paths.distill_set(row["method"], row["ipc"]).is_file():
            t = load_tensors(paths.distill_set(row["method"], row["ipc"]), ("x", "y"))
            if t["y"].numel():
                mean, std = meta.stats()
                images[key] = image_grid(denormalize(t["x"], mean, std), t["y"], meta.classes,
                                         f"{row['label']} ({row['method']}), IPC {row['ipc']}")
        student = paths.distill_student(row["method"], row["ipc"])
        if students and cfg.runtime.log_models and student.is_file():
            models[key] = load_model(student, paths.distill_student_spec(row["method"], row["ipc"]))
    example = load_split(paths.test, meta)[0][:2].numpy() if models else None
    tracker.log_results(parent, rows, {"dataset": cfg.prepare.data.name}, images, models, example,
                        model_metadata(meta))
    _describe(tracker, parent, paths)
