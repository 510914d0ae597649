"""Process environment for Prefect and MLflow, set before either is imported.

Prefect reads its settings at import time, so :func:`configure` must run before ``import prefect``:
the CLI calls it first thing, tests call it in their session fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.paths import ProjectPaths


def configure(root: Path) -> None:
    """Project-local Prefect home, telemetry and analytics off (existing settings win).

    Args:
        root: the project root (``.dsv/prefect`` under it becomes PREFECT_HOME unless already set).
    """
    project = ProjectPaths(root)
    os.environ.setdefault("PREFECT_HOME", str(project.prefect_home.resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # Prefect's temporary local server (and `prefect server start` run from this environment) listens
    # on the loopback interface only, unless the user set another host.
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
    # The temporary server's SQLite database lives in PREFECT_HOME; keep it from timing out when
    # several tasks report at once.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
