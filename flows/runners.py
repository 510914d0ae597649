"""What runs the mapped units (extract shards, distill cells): this process, or Dask worker processes.

One parallel model, processes (no state shared between units):

- ``runtime.workers: 1`` and no ``dask_address`` (default): one unit after another in the flow's process.
- ``runtime.workers: N > 1``: prefect-dask's DaskTaskRunner on a LocalCluster of N worker processes (one thread
  each) listening on 127.0.0.1 only, without a dashboard, stopped at the end of the run.
- ``runtime.dask_address``: the same runner connected to that existing cluster (e.g. one worker per GPU, see
  the README).

Only the mapped units go to the runner; whole stages and merges run in the flow's own thread. Every
unit is deterministic given its seed and reads/writes files under the output folder, so the merged
result does not depend on the runner; a remote worker must see the project root at the same path.

Worker processes get the main process's Prefect/MLflow/DVC/telemetry environment (the variables
:func:`flows.environment.configure` sets, plus any ``PREFECT_*``/``MLFLOW_*`` the user set): a local
cluster's processes start with it, a remote cluster's workers receive it through a worker plugin.
When the flow uses Prefect's temporary local server (no ``PREFECT_API_URL``), its address is handed to
the workers with each task, so they report to the same server instead of each starting their own.
Torch threads are set per unit from ``runtime.threads`` (``flows.pipeline``); Dask itself
starts workers with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.config import RuntimeConfig

# Environment handed to Dask workers: what flows.environment.configure sets, and the tools' own settings.
ENV_PREFIXES = ("PREFECT_", "MLFLOW_", "DVC_")
ENV_NAMES = ("DO_NOT_TRACK",)


def worker_environment() -> dict[str, str]:
    """The variables of this process that Dask workers must share (Prefect, MLflow, DVC, telemetry)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def task_runner(runtime: RuntimeConfig) -> TaskRunner[Any]:
    """The task runner ``runtime.workers`` and ``runtime.dask_address`` ask for (see the module docstring)."""
    if runtime.workers > 1 or runtime.dask_address:
        return _dask_runner(runtime)
    return ThreadPoolTaskRunner(max_workers=1)


def with_runner(flow_obj: Any, runtime: RuntimeConfig) -> Any:
    """``flow_obj`` whose mapped units run on :func:`task_runner` (``runtime``)."""
    return flow_obj.with_options(task_runner=task_runner(runtime))


def _dask_runner(runtime: RuntimeConfig) -> TaskRunner[Any]:
    from flows.dask_runner import DaskRunner  # distributed is imported only when asked for

    env = worker_environment()
    if runtime.dask_address:
        return DaskRunner(address=runtime.dask_address, worker_env=env)
    return DaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runtime.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",  # scheduler, nannies and workers listen on the loopback interface only
            "dashboard_address": None,  # no dashboard
            "worker_dashboard_address": None,
            "env": env,  # set in each worker process before it imports anything
            "silence_logs": logging.ERROR,
        },
        worker_env=env,
    )
