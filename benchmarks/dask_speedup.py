"""Benchmark: the extract stage of params.smoke.yaml in one process vs on a Dask LocalCluster of 2+ processes.

What is measured (one process drives everything; the same process-level settings for every run):

* ``prepare`` and ``pretrain`` run once (thread runner) in a scratch project; each measured run then
  starts from a copy of that project, so the extract stage has nothing cached and the same teacher.
* For each worker count, the flow :func:`flows.pipeline.pipeline` (``until="extract"``, no MLflow) runs with
  ``runtime.workers=N`` (1: in the flow's process; more: a Dask LocalCluster; ``extract.shards`` as in the
  params file: 2 shards x
  3 inits = 6 shard tasks). ``extract_s`` is the extract stage's wall time inside the flow: Dask
  LocalCluster start-up (N spawned worker processes importing torch and Prefect), the 6 shard tasks,
  and the merge. ``shard_s`` is the sum of the shard tasks' own wall times (from metrics/extract.json).
* speed-up = extract_s(one process) / extract_s(2 Dask workers). The machine is shared with other jobs: the load
  average before and after each run is recorded next to the times.

Usage:
  .venv/bin/python benchmarks/dask_speedup.py     # writes benchmarks/results/dask.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("dsv", "tasks", "flows", "dvc.yaml", "pyproject.toml")


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _run(root: Path, params: str, overrides: list[str], until: str) -> dict:
    from flows.pipeline import pipeline
    from flows.runners import with_runner
    from tasks.config import load_config

    cfg = load_config(root / params, overrides)
    state = with_runner(pipeline, cfg.runtime)(
        params_path=params, overrides=overrides, root=str(root), track=False, until=until, return_state=True
    )
    if not state.is_completed():
        raise RuntimeError(f"run failed: {state.message}")
    return state.result()["stages"]  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.smoke.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", action="store_true", help="keep the scratch projects")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="dsv-dask-bench-"))
    from flows.environment import configure

    configure(scratch)  # one Prefect home for the whole benchmark (before Prefect is imported)
    from tasks.artifacts import read_json
    from tasks.config import load_config
    from tasks.paths import Paths
    from tasks.tracking import git_commit

    base = scratch / "base"
    base.mkdir()
    for name in PROJECT_FILES:  # a copy of the code and params (never writes into the repository)
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, base / name)
    shutil.copy2(REPO / args.params, base / args.params)
    if (REPO / "data").exists():
        os.symlink(REPO / "data", base / "data")
    cfg = load_config(base / args.params)

    t0 = time.perf_counter()
    _run(base, args.params, [], "pretrain")
    setup_s = time.perf_counter() - t0

    rows = []
    for n in args.workers:
        root = scratch / f"workers{n}"
        shutil.copytree(base, root, symlinks=True)
        overrides = [f"runtime.workers={n}"]
        load_before = _loadavg()
        started = time.perf_counter()
        summary = _run(root, args.params, overrides, "extract")
        total = time.perf_counter() - started
        if summary["extract"]["cached"]:
            raise RuntimeError("extract was restored from cache; the measurement is void")
        out = Paths((root / cfg.runtime.output_dir).resolve())
        metrics, timings = read_json(out.metrics("extract")), read_json(out.timings("extract"))
        rows.append({
            "workers": n,
            "extract_s": round(summary["extract"]["seconds"], 2),
            "shard_s": timings["shard_seconds"],
            "flow_s": round(total, 2),
            "n_dsv": metrics["n_dsv"],
            "dsv_sha256": summary["extract"]["files"]["artifacts/extract/dsv.parquet"],
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
        })
        print(json.dumps(rows[-1]))

    by_n = {r["workers"]: r for r in rows}
    speedup = round(by_n[1]["extract_s"] / by_n[2]["extract_s"], 3) if 1 in by_n and 2 in by_n else None
    result = {
        "command": "  ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "git_commit": git_commit(REPO),
        "params": args.params,
        "extract_shards": cfg.extract.shards,
        "shard_tasks": len(cfg.extract.inits) * len(cfg.extract.ipcs) * cfg.extract.shards,
        "torch_threads": cfg.runtime.threads,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "setup_s": round(setup_s, 2),
        "rows": rows,
        "speedup_2_over_1": speedup,
        "same_dsvs": len({r["dsv_sha256"] for r in rows}) == 1,
        "note": "shared 2-core machine: other jobs ran at the same time (see loadavg); one run per setting",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dask.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "dask.md").write_text(render(result))
    print(render(result))
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


def render(r: dict) -> str:
    """The markdown summary of a result dict."""
    lines = [
        "# Extract stage: one process (workers 1) vs a Dask LocalCluster of 2 worker processes",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: `{r['git_commit']}`; params `{r['params']}` (extract.shards = {r['extract_shards']}, "
        f"{r['shard_tasks']} shard tasks, runtime.threads = {r['torch_threads']}); {r['cpu_count']} CPUs, "
        f"Python {r['python']}.",
        "",
        "| workers | extract stage (s) | sum of shard tasks (s) | flow incl. cached prepare/pretrain (s) "
        "| load avg before | load avg after |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['workers']} | {row['extract_s']:.2f} | {row['shard_s']:.2f} | {row['flow_s']:.2f} "
                     f"| {' '.join(map(str, row['loadavg_before']))} | {' '.join(map(str, row['loadavg_after']))} |")
    lines += [
        "",
        f"Speed-up of 2 Dask workers over one process (extract stage wall time): **{r['speedup_2_over_1']}**. "
        f"Identical dsv.parquet in every run: {r['same_dsvs']}.",
        "",
        "With 2 workers the extract stage time includes starting the LocalCluster (worker processes spawn and "
        "import torch and Prefect); with 1 the shards run in the flow's process. Both include the merge; the "
        "shard column is the work that parallelises. "
        "This is a shared 2-core machine: other people's jobs ran at the same time (load average above), "
        "and each setting was run once, so the numbers carry that noise.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
