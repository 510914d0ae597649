"""The Prefect flow: prepare -> pretrain -> extract -> coreset -> distill -> evaluate, as cached tasks.

Caching (:mod:`flows.cache`: JSON records under ``.dsv/cache``, valid across processes, never
unpickled; Prefect itself persists nothing) is keyed on the stage name, the params sections the stage
reads, the SHA-256 of every upstream artifact, the unit for mapped stages, the task wrapper's source
and the stage's code closure (tasks/<stage>.py, the tasks modules it imports and the transitive dsv/
modules it calls; see tasks.stages.code_modules) and, for the stages that compute on a device
(tasks.stages.DEVICE_STAGES), the resolved device type ("cpu" or "cuda"), so a CPU result never stands in for a
CUDA run or the reverse; NOT on the rest of the runtime context (paths, MLflow run id, threads, workers). A hit
finishes the task in Prefect's ``Cached`` state.

Tasks exchange small references only (params dicts, relative paths, content hashes). Since a cached
result only *describes* files, every cache hit is checked against the files on disk: a missing or
modified artifact makes the task run again and replace the record. Extraction and
distillation are mapped over their units (class shards; (method, IPC) cells), one task each, so an
interrupted stage resumes from its last completed unit.

Every pipeline run opens one MLflow parent run; every stage gets a nested run (tagged
``cached=true`` when restored from cache), marked FAILED with the error when the stage fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
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
from tasks.stages import DEVICE_STAGES, STAGES, restore_metrics, stage_function, stage_module
from tasks.tracking import NullLog, StageLog, Tracker

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
    return paths, _TRACKERS[key].log(context["run_id"])


# Prefect persists nothing and caches nothing: its result files are cloudpickle, unpickled on load
# whatever the task asks for. flows.cache keeps JSON records instead (see there).
_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 2,
    "retry_delay_seconds": 2,
    "retry_condition_fn": retry_on_io,
}


def cached_call(kind: str, stage: str, inputs: dict[str, Any], fn: Any, context: dict[str, Any]) -> tuple[Any, bool]:
    """(the verified cache record for these inputs, True), else (``fn()``'s result, recorded, False).

    Results go through JSON both ways, so a fresh result and a cached one are the same plain data. The Prefect
    tasks and ``dsv stage`` (:func:`run_stage_direct`) share it, so each restores what the other computed.
    """
    root, paths = Path(context["root"]), Paths(Path(context["base"]))
    key = cache_key(kind, _TASK_SOURCES[kind], stage, **inputs)
    hit = lookup(root, stage, key, paths)
    if hit is not None:
        return hit, True
    result = json.loads(json.dumps(fn(), allow_nan=True))
    if kind != "unit":
        result["produced_by"] = context.get("run_id")  # the MLflow run a later cache hit points to
    store(root, stage, key, result)
    return result, False


def _as_state(result: Any, hit: bool) -> Any:
    return Completed(data=result, name="Cached", message="restored from its JSON cache record") if hit else result


def _params(stage: str, cfg: PipelineConfig) -> dict[str, Any]:
    """The stage's cache-key inputs from the config: its params section as plain data and, for a stage that
    computes on a device, the resolved device type."""
    inputs: dict[str, Any] = {"params": cfg.sections(STAGES[stage].sections)}
    if stage in DEVICE_STAGES:
        inputs["device"] = device_of(cfg)
    return inputs


@task(name="stage", task_run_name="{stage}", **_TASK_OPTIONS)
def stage_task(stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any]) -> Any:
    """Run a whole (unmapped) stage on its restricted config; returns its :class:`StageOutput` as a dict."""

    def run() -> dict:
        return stage_function(stage)(cfg, *_open(cfg, context)).to_dict()

    inputs = {**_params(stage, cfg), "upstream": upstream}
    return _as_state(*cached_call("stage", stage, inputs, run, context))


@task(name="unit", task_run_name="{stage}-{label}", **_TASK_OPTIONS)
def unit_task(
    stage: str, label: str, unit: dict[str, Any], cfg: PipelineConfig, upstream: dict[str, str],
    context: dict[str, Any],
) -> Any:
    """Run one unit (extract shard, distill cell) of a mapped stage."""

    def run() -> dict:
        paths, log = _open(cfg, context)
        return stage_module(stage).run_unit(cfg, paths, unit, log)  # type: ignore[no-any-return]

    inputs = {"unit": unit, **_params(stage, cfg), "upstream": upstream}
    return _as_state(*cached_call("unit", stage, inputs, run, context))


@task(name="merge", task_run_name="{stage}-merge", **_TASK_OPTIONS)
def merge_task(
    stage: str, cfg: PipelineConfig, upstream: dict[str, str], unit_files: list[dict[str, str]],
    unit_results: list[dict[str, Any]], context: dict[str, Any],
) -> Any:
    """Merge the units of a mapped stage (``unit_files`` keys the cache on the units' outputs)."""

    def run() -> dict:
        paths, log = _open(cfg, context)
        return stage_module(stage).merge(cfg, paths, log, unit_results).to_dict()  # type: ignore[no-any-return]

    inputs = {**_params(stage, cfg), "upstream": upstream, "unit_files": unit_files}
    return _as_state(*cached_call("merge", stage, inputs, run, context))


# The wrappers' sources, part of every cache key (hashed here, where the module is imported from its file).
_TASK_SOURCES = {"stage": source_hash(stage_task.fn), "unit": source_hash(unit_task.fn),
                 "merge": source_hash(merge_task.fn)}


def _unit_label(unit: dict[str, Any]) -> str:
    return "_".join(str(v) for v in unit.values())


def _checked(state: State) -> tuple[Any, bool]:
    """(result, restored from a verified cache record) of a finished task state."""
    return state.result(), state.name == "Cached"


def run_stage(
    stage: str, cfg: PipelineConfig, upstream: dict[str, str], context: dict[str, Any]
) -> tuple[StageOutput, bool]:
    """Run one stage through its task(s) on ``cfg`` restricted to its section; returns (output, restored entirely
    from cache)."""
    spec = STAGES[stage]
    view = cfg.restricted(spec.sections)
    if not spec.mapped:
        state = stage_task(stage, view, upstream, context, return_state=True)
        result, cached = _checked(state)
        return StageOutput.from_dict(result), cached

    units: list[dict[str, Any]] = stage_module(stage).units(view)
    labels = [_unit_label(u) for u in units]
    futures = unit_task.map(
        unmapped(stage), labels, units, unmapped(view), unmapped(upstream), unmapped(context), return_state=False
    )
    # One tick per finished unit (shard, cell), in submission order.
    try:
        with Bar(cfg.runtime.progress, len(futures), stage, unit="unit") as bar:
            for fut in futures:
                fut.wait()
                bar.advance()
        wait(futures)
    except BaseException:  # Ctrl-C, SIGTERM: the running unit stops at its next step instead of finishing
        stop.request()
        raise
    unit_results, all_cached = [], True
    for fut in futures:
        result, cached = _checked(fut.state)
        unit_results.append(result)
        all_cached &= cached
    unit_files = [r["files"] for r in unit_results]
    state = merge_task(stage, view, upstream, unit_files, unit_results, context, return_state=True)
    result, cached = _checked(state)
    return StageOutput.from_dict(result), all_cached and cached


def run_stage_direct(stage: str, cfg: PipelineConfig, root: Path, paths: Paths, log: StageLog,
                     run_id: str | None = None) -> tuple[StageOutput, bool]:
    """One stage in this process, without Prefect (``dsv stage``, what dvc.yaml runs), through the same JSON
    cache records as the flow: the upstream artifacts are named by the upstream stages' latest outputs
    (``flows.cache.last_output``), so a stage ``dsv run`` finished is restored here, and a stage run here is
    restored by the next ``dsv run``. Returns (output, restored from cache). Without intact upstream records
    the stage simply runs and records nothing but its latest output.
    """
    spec = STAGES[stage]
    _sweep(root)
    _set_threads(cfg)
    view = cfg.restricted(spec.sections)
    params = _params(stage, view)
    if stage != "prepare" and paths.data_meta.is_file():
        _check_data(cfg, paths)  # as `dsv run` does right after prepare: before this stage trains anything
    ups = [last_output(root, u, paths) for u in spec.upstream]
    keyed = all(u is not None for u in ups)
    upstream = {rel: sha for u in ups if u is not None for rel, sha in u.files.items()}
    upstream.update(external_inputs(cfg, stage))
    context = {"root": str(root), "base": str(paths.base), "run_id": run_id}

    def cached_or(kind: str, inputs: dict[str, Any], fn: Any) -> tuple[Any, bool]:
        if not keyed:
            return json.loads(json.dumps(fn(), allow_nan=True)), False
        return cached_call(kind, stage, inputs, fn, context)

    if not spec.mapped:
        result, cached = cached_or("stage", {**params, "upstream": upstream},
                                   lambda: stage_function(stage)(view, paths, log).to_dict())
    else:
        module = stage_module(stage)
        unit_results, cached = [], True
        for unit in module.units(view):
            r, hit = cached_or("unit", {"unit": unit, **params, "upstream": upstream},
                               lambda unit=unit: module.run_unit(view, paths, unit, log))
            unit_results.append(r)
            cached &= hit
        unit_files = [r["files"] for r in unit_results]
        result, hit = cached_or("merge", {**params, "upstream": upstream, "unit_files": unit_files},
                                lambda: module.merge(view, paths, log, unit_results).to_dict())
        cached &= hit
    out = StageOutput.from_dict(result)
    restore_metrics(paths, out)
    store_last(root, out)
    if stage == "prepare":
        _check_data(cfg, paths)
    return out, cached


def _check_data(cfg: PipelineConfig, paths: Paths) -> None:
    """The data-dependent checks (:func:`tasks.config.data_checks`) on the prepared data's class counts."""
    meta = read_json(paths.data_meta)
    errors = data_checks(cfg, meta["classes"], meta["train_per_class"],
                         meta.get("test_per_class", [1] * len(meta["classes"])), meta.get("input_shape"))
    if errors:
        raise ConfigError("; ".join(errors))


@flow(name=FLOW_NAME, log_prints=True, validate_parameters=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(
    params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".", track: bool = True,
    lock_wait: float | None = 0.0, until: str | None = None,
) -> dict[str, Any]:
    """The whole pipeline; returns {"stages": {name: {"cached": bool, "files": {...}, "seconds": float}},
    "mlflow_run_id", "mlflow_experiment_id", "mlflow_uri", "output_dir"}.

    Args:
        params_path: the params file (relative to ``root`` unless absolute).
        overrides: ``section.key=value`` overrides.
        root: project root (MLflow store, Prefect results; output folder from ``runtime.output_dir``).
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


def _pipeline(cfg: PipelineConfig, params_path: str, root_path: Path, paths: Paths, track: bool, until: str
              ) -> dict[str, Any]:
    tracker = Tracker(root_path, cfg.runtime.mlflow_experiment, cfg.runtime.log_models) if track else None
    parent = None
    if tracker is not None:
        tracker.close_stale_runs(by=f"dsv run (pid {os.getpid()})")
        parent = tracker.start_run(run_name(cfg), tags={"params_file": str(params_path), "runner": "prefect",
                                                        "output_dir": str(paths.base), "dsv.kind": "pipeline",
                                                        "dataset": cfg.prepare.data.name, "device": device_of(cfg)})
        tracker.log_params_file(parent, cfg.to_dict())
    summary: dict[str, Any] = {
        "stages": {}, "mlflow_run_id": parent, "output_dir": str(paths.base),
        "mlflow_experiment_id": tracker.experiment_id if tracker else None,
        "mlflow_uri": tracker.uri if tracker else None,
    }
    outputs: dict[str, StageOutput] = {}
    started = time.perf_counter()
    try:
        for stage in STAGE_NAMES[: STAGE_NAMES.index(until) + 1]:
            spec = STAGES[stage]
            upstream = {rel: sha for up in spec.upstream for rel, sha in outputs[up].files.items()}
            upstream.update(external_inputs(cfg, stage))
            run_id = tracker.start_run(stage, parent, {"stage": stage, "runner": "prefect"}) if tracker else None
            context = {"root": str(root_path), "base": str(paths.base), "run_id": run_id}
            t0 = time.perf_counter()
            try:
                out, cached = run_stage(stage, cfg, upstream, context)
                restore_metrics(paths, out)
            except BaseException as exc:
                if tracker is not None and run_id is not None:
                    tracker.end_run(run_id, exc)
                raise
            if tracker is not None and run_id is not None:
                tracker.log_params_file(run_id, cfg.sections(spec.sections))
                log = tracker.log(run_id)
                log.tags({"cached": str(cached).lower(), "device": str(out.timings.get("device", "cpu"))})
                from tasks.tracking import dvc_hashes

                tracker.log_json(run_id, {"sha256": out.files, "dvc_md5": dvc_hashes(root_path, stage)},
                                 "artifact_hashes.json")
                numbers = {k: v for k, v in flatten({**out.metrics, **out.timings}).items()
                           if isinstance(v, (int, float))}
                if cached:  # the producing run's metrics and images, and a link to it
                    log.metrics(numbers)
                    if out.produced_by and out.produced_by != run_id:
                        log.tags({"dsv.produced_by": out.produced_by})
                        tracker.copy_images(out.produced_by, run_id)
                log.artifact(paths.resolved_params(stage))
                log.metric("stage_seconds", time.perf_counter() - t0)
                tracker.end_run(run_id)
            outputs[stage] = out
            store_last(root_path, out)
            summary["stages"][stage] = {"cached": cached, "files": out.files, "seconds": time.perf_counter() - t0}
            if stage == "prepare":
                _check_data(cfg, paths)
            print(f"stage {stage}: {'cached' if cached else 'ran'} ({time.perf_counter() - t0:.1f} s)")
    except BaseException as exc:
        if tracker is not None and parent is not None:
            tracker.end_run(parent, exc)
        raise
    if tracker is not None and parent is not None:
        complete = "evaluate" in outputs
        try:
            if complete:
                _log_results(tracker, parent, cfg, paths, outputs["distill"], summary["stages"]["distill"]["cached"])
        except BaseException as exc:
            tracker.end_run(parent, exc)
            raise
        log = tracker.log(parent)
        if complete:
            log.metric("teacher_acc", float(outputs["evaluate"].metrics["teacher_acc"]))
            log.artifact(paths.results_table)
        log.metric("pipeline_seconds", time.perf_counter() - started)
        log.tags({"cached_stages": ",".join(s for s, v in summary["stages"].items() if v["cached"])})
        tracker.end_run(parent)
    return summary


def run_name(cfg: PipelineConfig) -> str:
    """The parent run's name: the dataset and a short hash of every non-runtime param ("fashion_mnist · 3f9c2a1b"),
    so two runs with the same name ran the same configuration."""
    from tasks.plain import params_hash

    data = cfg.prepare.data
    name = data.name if data.name not in ("imagefolder", "tabular") else f"{data.name}:{Path(data.root).name}"
    return f"{name} · {params_hash({k: v for k, v in cfg.to_dict().items() if k != 'runtime'})[:8]}"


def _log_results(tracker: Tracker, parent: str, cfg: PipelineConfig, paths: Paths, distill: StageOutput,
                 cached: bool) -> None:
    """One MLflow run per result row, nested under the pipeline run (see ``Tracker.log_results``), with the
    cell's training set as a picture and, when the students were trained in this run, its student model."""
    from dsv.data.core import denormalize
    from tasks.artifacts import load_model, load_split, load_tensors, read_data_meta
    from tasks.figures import image_grid

    rows = read_json(paths.results_json)["rows"]
    meta = read_data_meta(paths.data_meta)
    images, models = {}, {}
    for row in rows:
        key = f"{row['method']}_ipc{row['ipc']}"
        if row["method"] != "full" and len(meta.input_shape) == 3 and paths.distill_set(row["method"], row["ipc"]).is_file():
            t = load_tensors(paths.distill_set(row["method"], row["ipc"]), ("x", "y"))
            if t["y"].numel():
                mean, std = meta.stats()
                images[key] = image_grid(denormalize(t["x"], mean, std), t["y"], meta.classes,
                                         f"{row['method']}, IPC {row['ipc']}")
        student = paths.distill_student(row["method"], row["ipc"])
        if not cached and cfg.runtime.log_models and student.is_file():
            models[key] = load_model(student, paths.distill_student_spec(row["method"], row["ipc"]))
    example = load_split(paths.test, meta)[0][:2].numpy() if models else None
    tags = {"dataset": cfg.prepare.data.name, **({"dsv.produced_by": distill.produced_by}
                                                 if cached and distill.produced_by else {})}
    tracker.log_results(parent, rows, tags, images, models, example)


