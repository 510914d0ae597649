"""prefect-dask's DaskTaskRunner, handing its workers this process's environment and Prefect API.

Imported only when the mapped units go to Dask (``runtime.workers > 1`` or ``runtime.dask_address``, see
:mod:`flows.runners`), so a single-process run never imports ``distributed``. Lives at module level so that worker processes unpickle it by reference.
"""

from __future__ import annotations

import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner


class WorkerEnvironment(WorkerPlugin):  # type: ignore[misc]
    """Sets the main process's tool environment (Prefect, MLflow, DVC, telemetry) in every worker.

    Args:
        env: variable -> value, from :func:`flows.runners.worker_environment`.
    """

    name = "dsv-environment"

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)

    def setup(self, worker: Any) -> None:
        os.environ.update(self.env)


def flow_api_url() -> str | None:
    """The Prefect API the current flow run talks to (the temporary local server's when none is set)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    client = getattr(ctx, "client", None) if ctx is not None else None
    url = getattr(client, "api_url", None)
    return str(url).rstrip("/") + "/" if url else None


class DaskRunner(DaskTaskRunner):  # type: ignore[misc]
    """DaskTaskRunner whose workers share this process's environment and Prefect API.

    - On an existing cluster (``address``), a :class:`WorkerEnvironment` plugin sets ``worker_env`` in
      every worker (a LocalCluster's processes get it at start through ``cluster_kwargs["env"]``).
    - Without ``PREFECT_API_URL`` the flow runs on Prefect's temporary local server; its address goes
      with every task (in the serialized settings), so workers report to that server instead of each
      starting their own on the same database.

    Args:
        worker_env: variables to set in the workers.
        *args, **kwargs: DaskTaskRunner's (``address`` or ``cluster_class``/``cluster_kwargs``, ...).
    """

    def __init__(self, *args: Any, worker_env: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_env = dict(worker_env or {})
        self._plugin_registered = False

    def duplicate(self) -> DaskRunner:
        return type(self)(
            address=self.address, cluster_class=self.cluster_class, cluster_kwargs=self.cluster_kwargs,
            adapt_kwargs=self.adapt_kwargs, client_kwargs=self.client_kwargs,
            performance_report_path=self.performance_report_path, worker_env=self.worker_env,
        )

    @property
    def client(self) -> Any:
        client = super().client
        if self.address and self.worker_env and not self._plugin_registered:
            client.register_plugin(WorkerEnvironment(self.worker_env))
            self._plugin_registered = True
        return client

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        url = None if PREFECT_API_URL.value() else flow_api_url()
        if url is None:
            return super().submit(task, parameters, wait_for, dependencies)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            return super().submit(task, parameters, wait_for, dependencies)
