"""The ``dsv`` command line.

    dsv run   [-p params.yaml] [-S section.key=value ...] [--no-mlflow] [--wait S]  the Prefect flow, cached
    dsv stage NAME [-p params.yaml] [-S ...] [--no-mlflow] [--wait S]      one stage, no Prefect (DVC)
    dsv serve (--cron EXPR | --interval SECONDS) [-p ...] [-S ...]         a scheduled deployment
    dsv ui    [--port 5000] [--host 127.0.0.1]                             MLflow UI on the project store
    dsv report [-p params.yaml] [-o PATH]                                  HTML report of the last run

Bad input (unknown key, bad value, missing file) prints one line ``dsv: error: ...`` and exits 2.
``run`` and ``stage`` lock the output folder (:mod:`tasks.lock`): a second one in the same folder
refuses with one line naming the holder's pid (exit 75), or waits up to ``--wait`` seconds.
Paths are relative to the current directory, which is the project root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tasks.paths import STAGE_NAMES

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are the same single ``dsv: error:`` line as config errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    first = " ".join(str(message).split())
    print(f"dsv: error: {first}", file=sys.stderr)
    raise SystemExit(code)


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a param (DVC's -S form); repeatable")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deep-support-vectors")
    except PackageNotFoundError:
        return "0+unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv", description="Deep Support Vectors pipeline (Prefect + DVC + MLflow).")
    parser.add_argument("--version", action="version", version=f"dsv {_package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the whole pipeline as a cached Prefect flow")
    _params_args(run)
    run.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    _wait_arg(run)
    stage = sub.add_parser("stage", help="run one stage without Prefect (what dvc.yaml calls)")
    stage.add_argument("name", choices=STAGE_NAMES)
    _params_args(stage)
    stage.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    _wait_arg(stage)
    serve = sub.add_parser("serve", help="serve the flow as a scheduled Prefect deployment")
    _params_args(serve)
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *"')
    when.add_argument("--interval", type=float, help="schedule every N seconds")
    serve.add_argument("--name", default="scheduled", help="deployment name")
    serve.add_argument("--limit", type=int, default=1, help="concurrent runs (default 1)")
    ui = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    report = sub.add_parser("report", help="write a self-contained HTML report of the last run (and log it)")
    _params_args(report)
    report.add_argument("-o", "--output", default=None,
                        help="HTML file (default: <output_dir>/report.html)")
    report.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    return parser


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="when another dsv process holds the output folder, wait up to SECONDS (default: refuse)")


def _lock(cfg, root: Path, command: str, wait: float):  # noqa: ANN001, ANN202 - PipelineConfig, OutputLock
    """Take the output folder's lock, or end with one line naming the holder (exit 75)."""
    from tasks.lock import LockError, OutputLock

    lock = OutputLock((root / cfg.runtime.output_dir).resolve(), command, wait)
    try:
        return lock.acquire()
    except LockError as exc:
        _fail(str(exc), EXIT_LOCKED)
    except OSError as exc:  # the message names the folder (see OutputLock.acquire)
        _fail(exc.strerror or str(exc), EXIT_FAILED)
    raise AssertionError("unreachable")


def _describe_failure(exc: BaseException, root: Path) -> str:
    """One line for a failed run; a full disk anywhere in the cause chain (MLflow's SQLite store reports
    only "database or disk is full") is named first, with the store it hit."""
    line = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if (isinstance(seen, OSError) and seen.errno in (28, 122)) or "database or disk is full" in text:
            from tasks.tracking import tracking_uri

            return f"disk full (no space left for {tracking_uri(root)} or the output folder): {line}"
        seen = seen.__cause__ or seen.__context__
    return line


def _start_server(scheduler: bool = False) -> str:
    """Our own temporary Prefect server (flows.server) unless PREFECT_API_URL points at one; the API URL."""
    from flows import server

    try:
        return server.start(scheduler=scheduler)
    except RuntimeError as exc:
        _fail(str(exc), EXIT_FAILED)
    raise AssertionError("unreachable")


def _load(args: argparse.Namespace):  # noqa: ANN202 - returns PipelineConfig, imported lazily
    from tasks.config import ConfigError, load_config

    try:
        return load_config(args.params, args.overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _cmd_run(args: argparse.Namespace, root: Path) -> int:
    cfg = _load(args)  # validate before anything is imported or written
    from flows.environment import configure
    from tasks.config import ConfigError

    configure(root)
    started = time.perf_counter()
    # Locked before Prefect starts, so a refused run leaves no trace anywhere (the flow is told it is held).
    lock = _lock(cfg, root, "dsv run", args.wait)
    try:
        _start_server()
        from flows.pipeline import pipeline
        from flows.runners import with_runner
    except BaseException:
        lock.release()
        raise
    flow = with_runner(pipeline, cfg.runtime)  # runtime.workers > 1: Dask processes for the mapped units
    try:
        # Relative to the project root (the current folder): the flow run's parameters hold no absolute path.
        summary = flow(params_path=args.params, overrides=list(args.overrides), root=".",
                       track=not args.no_mlflow, lock_wait=None)
    except ConfigError as exc:  # a data-dependent check after prepare (names the key)
        _fail(str(exc))
    except Exception as exc:  # the flow already logged the traceback; end with one line
        _fail(_describe_failure(exc, root), EXIT_FAILED)
    finally:
        lock.release()
    print(run_summary(summary, cfg, root, time.perf_counter() - started, args.params))
    _dvc_commit(cfg, root)
    return 0


def _dvc_commit(cfg, root: Path) -> None:  # noqa: ANN001 - PipelineConfig
    """Record a finished run's outputs in dvc.lock (``runtime.dvc_commit``): ``dvc status`` is then clean and
    ``dvc repro`` reuses the run. Only in a DVC repository, and only for the default output folder (the
    paths dvc.yaml names); a failure is one warning line, never a failed run."""
    if not (cfg.runtime.dvc_commit and (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()):
        return
    if (root / cfg.runtime.output_dir).resolve() != root.resolve():
        return
    started = time.perf_counter()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"dsv: warning: dvc commit did not run ({type(exc).__name__}: {exc}); dvc.lock not updated")
        return
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(f"dsv: warning: dvc commit failed ({last[0]}); dvc.lock not updated")
        return
    print(f"dvc.lock updated in {time.perf_counter() - started:.1f} s: `dvc status` is clean, `dvc repro` reuses this run")


def mlflow_run_url(experiment_id: str, run_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The address of a run in ``dsv ui``: MLflow's UI route ``#/experiments/<id>/runs/<id>`` in its model-training
    view (``workflowType=machine_learning``; the experiment's ``mlflow.experimentKind`` tag says the same)."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_summary(summary: dict, cfg, root: Path, seconds: float, params: str = "params.yaml") -> str:  # noqa: ANN001
    """The end-of-run summary: stages, teacher accuracy, DSVs per class, the results table, where things are."""
    from tasks.artifacts import read_json
    from tasks.paths import Paths

    paths = Paths((root / cfg.runtime.output_dir).resolve())
    cached = [s for s, v in summary["stages"].items() if v["cached"]]
    lines = [f"dsv: pipeline finished in {seconds:.1f} s; cached stages: {', '.join(cached) or 'none'}"]
    try:  # the summary is a courtesy; the artifacts are the record
        ev = read_json(paths.metrics("evaluate"))
        lines.append(f"teacher test accuracy: {100 * ev['teacher_acc']:.2f}%")
    except Exception:  # noqa: BLE001
        pass
    try:
        pre = read_json(paths.metrics("pretrain"))
        if "kkt_certificate" in pre:
            lines.append(
                "teacher KKT certificate (relative stationarity residual at λ = 1/(nω); 0 = a KKT point): "
                f"all {pre['kkt_certificate']:.3g}, last {pre['kkt_certificate_last']:.3g}, "
                f"free {pre['kkt_certificate_free']:.3g}"
                + ("" if "converge_iterations" in pre else "  (pretrain.converge.scope=last makes `last` ~0)"))
    except Exception:  # noqa: BLE001
        pass
    try:
        ex = read_json(paths.metrics("extract"))
        for key, m in ex.items():
            if isinstance(m, dict) and "per_class" in m:
                per = m["per_class"]
                lines.append(f"DSVs {key}: {m['n']} ({' '.join(str(n) for n in per)} per class; "
                             f"{m['lambda_zero']} with λ = 0, {m['repaired']} repaired into their class)")
    except Exception:  # noqa: BLE001
        pass
    with contextlib.suppress(OSError):
        lines.append(paths.results_table.read_text().split("\n", 2)[-1].rstrip())
    lines.append(f"artifacts: {paths.base / 'artifacts'}  metrics: {paths.base / 'metrics'}")
    if summary.get("mlflow_run_id"):
        url = mlflow_run_url(str(summary.get("mlflow_experiment_id")), summary["mlflow_run_id"])
        how = "" if summary.get("mlflow_new_run", True) else " (every stage restored from cache: no new run; this is " \
            "the pipeline run that computed the results)"
        lines.append(f"MLflow run: {summary['mlflow_run_id']} in {summary.get('mlflow_uri')}{how}")
        lines.append(f"  browse: dsv ui, then {url}")
    lines.append("report: dsv report" + ("" if params == "params.yaml" else f" -p {params}"))
    return "\n".join(lines)


def _cmd_stage(args: argparse.Namespace, root: Path) -> int:
    cfg = _load(args)
    from flows.environment import configure

    configure(root)
    from flows.pipeline import Tracking, run_one_stage
    from tasks.config import ConfigError
    from tasks.paths import Paths
    from tasks.tracking import Tracker

    paths = Paths((root / cfg.runtime.output_dir).resolve())
    lock = _lock(cfg, root, f"dsv stage {args.name}", args.wait)
    cached = False
    try:
        tracking = None if args.no_mlflow else \
            Tracking(Tracker(root, cfg.runtime.mlflow_experiment, cfg.runtime.log_models), "dvc")
        out, cached = run_one_stage(args.name, cfg, root, paths, tracking)
    except ConfigError as exc:  # a data-dependent check (flows.pipeline._check_data): names the key
        _fail(str(exc))
    except Exception as exc:
        if os.environ.get("DSV_TRACEBACK"):
            raise
        _fail(f"stage {args.name} failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    finally:
        lock.release()
    if cached:
        print(f"dsv: stage {args.name} restored from cache ({len(out.files)} files verified)"
              + (f"; computed in MLflow run {out.produced_by}" if out.produced_by else ""))
    else:
        print(f"dsv: stage {args.name} wrote {len(out.files)} files in {out.timings.get('wall_seconds', 0):.1f} s")
    return 0


def _cmd_serve(args: argparse.Namespace, root: Path) -> int:
    cfg = _load(args)
    from flows.environment import configure

    configure(root)
    own = not os.environ.get("PREFECT_API_URL")
    url = _start_server(scheduler=True)
    if own:
        print(f"dsv: no PREFECT_API_URL: started a temporary Prefect server with its scheduler on {url} (it stops "
              "with this process, and so do the schedules). For a persistent one: prefect server start --host "
              "127.0.0.1, then export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr, flush=True)
    # Prefect's runner replaces our SIGTERM handler with its own graceful stop; note the signal on the way
    # so the exit code can tell SIGTERM (143) from Ctrl-C (130).
    from prefect.runner.runner import Runner

    from flows.pipeline import FLOW_NAME, pipeline
    from flows.runners import with_runner

    if not getattr(Runner.handle_sigterm, "_dsv_wrapped", False):
        original = Runner.handle_sigterm

        def handle_sigterm(self: Runner, *a: object, **k: object) -> None:
            _TERMINATED.set()
            original(self, *a, **k)

        handle_sigterm._dsv_wrapped = True  # type: ignore[attr-defined]
        Runner.handle_sigterm = handle_sigterm  # type: ignore[method-assign]
    # Relative to the project root, where the served flow runs: no absolute path in the deployment's parameters.
    params = {"params_path": args.params, "overrides": list(args.overrides), "root": "."}
    kwargs = {"cron": args.cron} if args.cron else {"interval": args.interval}
    problem: list[str] = []
    threading.Thread(target=_watch_scheduler, args=(f"{FLOW_NAME}/{args.name}", url, problem), daemon=True,
                     name="dsv-scheduler-check").start()
    with_runner(pipeline, cfg.runtime).serve(name=args.name, parameters=params, limit=args.limit, **kwargs)
    # serve() runs until interrupted and swallows the interrupt itself: returning means Ctrl-C, SIGTERM or the
    # scheduler check below.
    if problem:
        _fail(problem[0], EXIT_FAILED)
    term = _TERMINATED.is_set()
    print(f"dsv: {'terminated (SIGTERM)' if term else 'interrupted (Ctrl-C)'}; the schedule stopped",
          file=sys.stderr, flush=True)
    return 143 if term else 130


SCHEDULER_WAIT = 30.0  # seconds a scheduler may take to put a new deployment's runs on the calendar


def _watch_scheduler(deployment: str, url: str, problem: list[str]) -> None:
    """Thread of ``dsv serve``: a server's scheduler service turns the served deployment's schedule into
    scheduled flow runs within seconds (its loop for new deployments runs every 5 s); a server without one
    (an ephemeral server, ``prefect server start --no-services``) never does, and serve would idle forever.
    When no run of the deployment has been created ``SCHEDULER_WAIT`` seconds after serving started, record
    the problem and interrupt the main thread, so that serve refuses instead of idling."""
    import _thread
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    since = datetime.now(UTC) - timedelta(seconds=1)
    deadline = time.monotonic() + SCHEDULER_WAIT
    while time.monotonic() < deadline:
        time.sleep(1.0)
        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(deployment)
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                         limit=50)
            if any(r.created is not None and r.created >= since for r in runs):
                return
    problem.append(f"the Prefect server at {url} scheduled no run of deployment {deployment!r} within "
                   f"{SCHEDULER_WAIT:g} s: it runs no scheduler service (an ephemeral server or `prefect server "
                   "start --no-services`); serve on a server started with `prefect server start --host 127.0.0.1`, "
                   "or unset PREFECT_API_URL to let dsv start one")
    _thread.interrupt_main()


UI_START_TIMEOUT = 120.0  # seconds MLflow's UI may take to answer (its first start migrates the store)


def _cmd_ui(args: argparse.Namespace, root: Path) -> int:
    import socket
    import urllib.request

    from tasks.lock import init_lock
    from tasks.paths import ProjectPaths
    from tasks.tracking import quiet_environment, relocate_store, store_lock, tracking_uri

    quiet_environment()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"dsv: warning: --host {args.host} exposes the MLflow UI (every run, param and artifact, with no "
              "authentication) to other machines on that network; use 127.0.0.1 unless that is intended",
              file=sys.stderr, flush=True)
    try:  # refuse a busy port at once, with one line, instead of letting the server fail after it "started"
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        _fail(f"cannot serve the MLflow UI on {args.host}:{args.port}: {os.strerror(exc.errno) if exc.errno else exc} (another `dsv ui` or "
              "server is there?); pick another port with --port", EXIT_FAILED)
    uri = tracking_uri(root)
    lock = store_lock(uri, root)
    with init_lock(lock, f"opening the MLflow store {uri}") if lock else contextlib.nullcontext():
        relocate_store(root)  # a copied or moved project: its own artifacts
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port),
           "--backend-store-uri", uri, "--workers", "1"]
    if uri.startswith("sqlite:"):
        cmd += ["--artifacts-destination", str(ProjectPaths(root).mlflow_artifacts.resolve())]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # stopped as a group below
    url = f"http://{args.host}:{args.port}"
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                _fail(f"the MLflow UI exited with code {proc.returncode} before it answered on {url}", EXIT_FAILED)
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                _fail(f"the MLflow UI did not answer on {url} within {UI_START_TIMEOUT:g} s", EXIT_FAILED)
            time.sleep(0.3)
        print(f"dsv: MLflow UI on {url} (Ctrl-C to stop)", flush=True)
        # It serves until Ctrl-C or SIGTERM (handled below); stopping by itself is a failure, whatever its code.
        _fail(f"the MLflow UI stopped by itself (exit code {proc.wait()})", EXIT_FAILED)
        raise AssertionError("unreachable")
    finally:
        if proc.poll() is None:  # Ctrl-C, SIGTERM, a failure above: stop the server and its workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _cmd_report(args: argparse.Namespace, root: Path) -> int:
    cfg = _load(args)
    from tasks.report import ReportError, write_report

    tracking = url = None
    run_id: str | None = None
    if not args.no_mlflow:  # logged into the pipeline run that computed the results on disk
        from flows.cache import last_output
        from flows.pipeline import Tracking
        from tasks.paths import Paths
        from tasks.tracking import Tracker

        paths = Paths((root / cfg.runtime.output_dir).resolve())
        tracking = Tracking(Tracker(root, cfg.runtime.mlflow_experiment, cfg.runtime.log_models), "report")
        run_id = tracking.results_run(last_output(root, "evaluate", paths))
        if run_id is not None:
            url = mlflow_run_url(tracking.tracker.experiment_id, run_id)
    try:
        out = write_report(cfg, root, Path(args.output) if args.output else None, url)
    except ReportError as exc:
        _fail(str(exc), EXIT_FAILED)
    if tracking is not None and run_id is not None:
        tracking.tracker.client.log_artifact(run_id, str(out), "report")
        print(f"dsv: report written to {out} and logged to MLflow run {run_id}: {url}")
    else:
        why = "" if args.no_mlflow else " (not logged to MLflow: no run of this store computed these results)"
        print(f"dsv: report written to {out}{why}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsv`` console script."""
    args = build_parser().parse_args(argv)
    root = Path.cwd().resolve()
    if args.command in ("run", "stage", "serve", "report") and not Path(args.params).is_file():
        _fail(f"params file {args.params!r} not found (run from the project root or pass -p)")
    handlers = {"run": _cmd_run, "stage": _cmd_stage, "serve": _cmd_serve, "ui": _cmd_ui, "report": _cmd_report}
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return handlers[args.command](args, root)
    except BaseException as exc:
        code = _interrupt_code(exc)
        if code is None:
            raise
        # On the way out the MLflow runs were marked KILLED, a unit computing on the flow's worker thread
        # stopped at its next step (flows.stop; the flow's exit waits for that thread, and the unit wrote
        # nothing and recorded nothing) and the lock was released. Stop the temporary Prefect server and
        # leave without running Prefect's exit hooks.
        from flows import server

        server.stop()
        print(f"dsv: {'interrupted (Ctrl-C)' if code == 130 else 'terminated (SIGTERM)'}; finished stages and "
              "units are kept, the next run resumes from them", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    # On a normal exit the server is stopped by atexit, after Prefect's own exit hooks have sent their
    # last logs and events to it (atexit runs in reverse order of registration).


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM, so it unwinds like Ctrl-C (locks released, runs closed)."""


_TERMINATED = threading.Event()


def _on_sigterm(signum: int, frame: object) -> None:
    _TERMINATED.set()
    raise Terminated()


def _interrupt_code(exc: BaseException) -> int | None:
    """130 for Ctrl-C, 143 for SIGTERM (ours or Prefect's TerminationSignal), else None."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, Terminated) or type(exc).__name__ == "TerminationSignal":
        return 143
    return None


if __name__ == "__main__":
    sys.exit(main())
