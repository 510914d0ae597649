"""Fixtures of the fault-injection suite, and its tally.

Each test module is one fault category; every collected case counts as one fault *tried*, a
passing case as one *survived* (the fault was detected, reported with the expected message, and no
artifact was half-written or lost). The tally is printed at the end of the session and written as
JSON to ``$DSV_FAULT_COUNTS`` when that variable names a file.

The flow-level cases run the real pipeline (Prefect test server, MLflow on a temp SQLite file) on a
tiny digits project made in code, so the whole suite runs in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

# Importing the integration fixtures points Prefect at a private home before anything imports it.
from dsv.protocols import METHOD_NAMES
from tests.integration.conftest import ROOT, TINY_PARAMS, copy_project, prefect_api, state_dir  # noqa: F401

# The tiny project with fewer methods (the faults are in extract and the plumbing, not in distill).
FAULT_PARAMS = TINY_PARAMS.replace(
    f"  methods: [{', '.join(METHOD_NAMES)}]\n", "  methods: [dsv_nshot, dsv_noise, random]\n"
).replace("  inits: [nshot, 0shot, noise, herding, kcenter, kkt_herding]\n", "  inits: [nshot, noise]\n")
assert FAULT_PARAMS != TINY_PARAMS

_TRIED: Counter[str] = Counter()
_SURVIVED: Counter[str] = Counter()


def _category(nodeid: str) -> str:
    name = Path(nodeid.split("::")[0]).stem
    return name.removeprefix("test_")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/faults/" not in report.nodeid.replace(os.sep, "/"):
        return
    if report.skipped:  # not tried (e.g. the read-only-folder case when running as root)
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        cat = _category(report.nodeid)
        _TRIED[cat] += 1
        if report.when == "call" and report.outcome == "passed":
            _SURVIVED[cat] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TRIED:
        return
    tally = {c: {"tried": _TRIED[c], "survived": _SURVIVED[c]} for c in sorted(_TRIED)}
    total = {"tried": sum(_TRIED.values()), "survived": sum(_SURVIVED.values())}
    terminalreporter.write_sep("-", "fault injection tally")
    for c, v in tally.items():
        terminalreporter.write_line(f"{c:>14}: {v['survived']}/{v['tried']} survived")
    terminalreporter.write_line(f"{'total':>14}: {total['survived']}/{total['tried']} survived")
    out = os.environ.get("DSV_FAULT_COUNTS")
    if out:
        Path(out).write_text(json.dumps({"categories": tally, "total": total}, indent=2) + "\n")


# ----------------------------------------------------------------------------------- helpers


def tmp_leftovers(folder: Path) -> list[Path]:
    """Temp files of the atomic writer left under ``folder``."""
    return sorted(folder.rglob(".*.tmp")) if folder.exists() else []


def cli_env(project: Path, api_url: str | None) -> dict[str, str]:
    """Environment of a ``dsv`` subprocess in ``project``: its own MLflow store, the test Prefect API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PYTHONPATH": str(project), "PREFECT_HOME": str(project / ".dsv" / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
    })
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def dsv(project: Path, *args: str, api_url: str | None = None, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m flows.cli ARGS`` in ``project`` (the copy's code) and wait."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env or cli_env(project, api_url),
                          capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(predicate, timeout: float, every: float = 0.05) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


@pytest.fixture
def fault_project(tmp_path: Path) -> Path:
    """A fresh copy of the code with the fault params (nothing run yet)."""
    return copy_project(tmp_path / "project", FAULT_PARAMS)


__all__ = ["ROOT", "FAULT_PARAMS", "copy_project", "prefect_api", "state_dir", "tmp_leftovers", "dsv", "cli_env",
           "wait_for"]


SECRET = "dsv-test-secret-4f1c9a"  # an env var value that must never reach MLflow


@pytest.fixture(scope="session")
def completed_project(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> tuple[Path, dict]:  # noqa: F811
    """A tiny project after one complete, tracked in-process run (with a secret in the environment).

    Tests that damage its files must leave them as they found them (rerun the flow).
    """
    from flows.pipeline import pipeline

    project = copy_project(tmp_path_factory.mktemp("faults") / "done", FAULT_PARAMS)
    os.environ["DSV_FAKE_API_TOKEN"] = SECRET
    try:
        summary = pipeline(params_path="params.yaml", root=str(project))
    finally:
        os.environ.pop("DSV_FAKE_API_TOKEN", None)
    return project, summary
