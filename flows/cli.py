"""The ``dsv`` command line.

    dsv run   [-p params.yaml] [-S section.key=value ...] [--no-mlflow]   the Prefect flow, cached
    dsv stage NAME [-p params.yaml] [-S ...] [--no-mlflow]                one stage, no Prefect (DVC)
    dsv serve (--cron EXPR | --interval SECONDS) [-p ...] [-S ...]         a scheduled deployment
    dsv ui    [--port 5000] [--host 127.0.0.1]                             MLflow UI on the project store

Bad input (unknown key, bad value, missing file) prints one line ``dsv: error: ...`` and exits 2.
Paths are relative to the current directory, which is the project root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tasks.paths import STAGE_NAMES

EXIT_USAGE = 2
EXIT_FAILED = 1


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv", description="Deep Support Vectors pipeline (Prefect + DVC + MLflow).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the whole pipeline as a cached Prefect flow")
    _params_args(run)
    run.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    stage = sub.add_parser("stage", help="run one stage without Prefect (what dvc.yaml calls)")
    stage.add_argument("name", choices=STAGE_NAMES)
    _params_args(stage)
    stage.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
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
    return parser


def _load(args: argparse.Namespace):  # noqa: ANN202 - returns PipelineConfig, imported lazily
    from tasks.config import ConfigError, load_config

    try:
        return load_config(args.params, args.overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _cmd_run(args: argparse.Namespace, root: Path) -> int:
    cfg = _load(args)  # validate before anything is imported or written
    from flows.environment import configure

    configure(root)
    from flows.pipeline import pipeline_with_workers

    started = time.perf_counter()
    flow = pipeline_with_workers(cfg.runtime.workers)
    try:
        summary = flow(params_path=str(Path(args.params).resolve()), overrides=list(args.overrides), root=str(root),
                       track=not args.no_mlflow)
    except Exception as exc:  # the flow already logged the traceback; end with one line
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
    _summary(summary, cfg, root, time.perf_counter() - started)
    return 0


def _summary(summary: dict, cfg, root: Path, seconds: float) -> None:  # noqa: ANN001
    from tasks.artifacts import read_json
    from tasks.paths import Paths

    paths = Paths((root / cfg.runtime.output_dir).resolve())
    cached = [s for s, v in summary["stages"].items() if v["cached"]]
    print(f"dsv: pipeline finished in {seconds:.1f} s; cached stages: {', '.join(cached) or 'none'}")
    try:
        ev = read_json(paths.metrics("evaluate"))
        print(f"teacher test accuracy: {100 * ev['teacher_acc']:.2f}%")
        print(paths.results_table.read_text().split("\n", 2)[-1].rstrip())
    except Exception:  # the summary is a courtesy; the artifacts are the record
        pass
    print(f"artifacts: {paths.base / 'artifacts'}  metrics: {paths.base / 'metrics'}")
    if summary.get("mlflow_run_id"):
        print(f"MLflow run: {summary['mlflow_run_id']} (dsv ui to browse)")


def _cmd_stage(args: argparse.Namespace, root: Path) -> int:
    cfg = _load(args)
    from flows.environment import configure

    configure(root)
    from tasks.paths import Paths
    from tasks.stages import STAGES, stage_function
    from tasks.tracking import NullLog, Tracker

    spec = STAGES[args.name]
    view = cfg.restricted(spec.sections)
    paths = Paths((root / cfg.runtime.output_dir).resolve())
    fn = stage_function(args.name)
    try:
        if args.no_mlflow:
            out = fn(view, paths, NullLog())
        else:
            tracker = Tracker(root, cfg.runtime.mlflow_experiment, cfg.runtime.log_models)
            with tracker.stage_run(args.name, None, cfg.sections(spec.sections), tags={"runner": "dvc"}) as log:
                out = fn(view, paths, log)
                log.artifact(paths.resolved_params(args.name))
    except Exception as exc:
        if os.environ.get("DSV_TRACEBACK"):
            raise
        _fail(f"stage {args.name} failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    print(f"dsv: stage {args.name} wrote {len(out.files)} files in {out.metrics.get('wall_seconds', 0):.1f} s")
    return 0


def _cmd_serve(args: argparse.Namespace, root: Path) -> int:
    _load(args)
    from flows.environment import configure

    configure(root)
    from flows.pipeline import pipeline

    params = {"params_path": str(Path(args.params).resolve()), "overrides": list(args.overrides), "root": str(root)}
    kwargs = {"cron": args.cron} if args.cron else {"interval": args.interval}
    pipeline.serve(name=args.name, parameters=params, limit=args.limit, **kwargs)
    return 0


def _cmd_ui(args: argparse.Namespace, root: Path) -> int:
    from tasks.tracking import quiet_environment, tracking_uri

    quiet_environment()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port),
           "--backend-store-uri", tracking_uri(root), "--workers", "1"]
    print(f"dsv: MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsv`` console script."""
    args = build_parser().parse_args(argv)
    root = Path.cwd().resolve()
    if args.command in ("run", "stage", "serve") and not Path(args.params).is_file():
        _fail(f"params file {args.params!r} not found (run from the project root or pass -p)")
    handlers = {"run": _cmd_run, "stage": _cmd_stage, "serve": _cmd_serve, "ui": _cmd_ui}
    try:
        return handlers[args.command](args, root)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
