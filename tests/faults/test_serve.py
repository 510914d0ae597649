"""Schedules: `dsv serve` runs its schedule on its own (a temporary Prefect server with its scheduler), and
refuses a server that would never run it instead of idling."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import FAULT_PARAMS, cli_env, copy_project, wait_for
from tests.faults.test_interrupt import _processes_of

pytestmark = pytest.mark.slow


def _serve(project: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    log = open(project / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *args], cwd=project, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _log(project: Path) -> str:
    return (project / "serve.log").read_text(errors="replace")


def _flow_run_finished(project: Path) -> re.Match[str] | None:
    return re.search(r"Flow run '[^']+' - Finished in state (\w+)", _log(project))


def test_serve_without_a_user_server_completes_a_scheduled_run(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    # Runs are due at multiples of the interval: the first within 10 s.
    proc = _serve(project, cli_env(project, None), "--interval", "10")
    try:
        assert wait_for(lambda: _flow_run_finished(project) or proc.poll() is not None, 400, every=0.5), \
            _log(project)[-3000:]
        assert proc.poll() is None, _log(project)[-3000:]
        finished = _flow_run_finished(project)
        assert finished is not None and finished.group(1) == "Completed", _log(project)[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 130, _log(project)[-3000:]
    assert (project / "artifacts" / "evaluate" / "results.json").is_file()  # the scheduled run did the work
    with sqlite3.connect(project / "mlflow.db") as db:
        parents = [s for (s,) in db.execute("select status from runs r join tags t on r.run_uuid = t.run_uuid "
                                            "where t.key = 'dsv.kind' and t.value = 'pipeline' order by start_time")]
    # The first one finished; the next one may have started before the Ctrl-C, which then stopped it.
    assert parents[0] == "FINISHED" and "RUNNING" not in parents, parents
    assert wait_for(lambda: not _processes_of(project), 10), _processes_of(project)  # the server stopped with it


def test_serve_refuses_a_server_without_a_scheduler(tmp_path: Path, prefect_api: str) -> None:
    from flows.cli import SCHEDULER_WAIT

    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    # The test server is an ephemeral one (prefect_test_harness): an API without background services.
    proc = _serve(project, cli_env(project, prefect_api), "--interval", "5")
    started = time.monotonic()
    try:
        rc = proc.wait(timeout=SCHEDULER_WAIT + 90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = _log(project).strip().splitlines()[-1]
    assert rc == 1, _log(project)[-3000:]
    assert last.startswith("dsv: error: the Prefect server at ") and "runs no scheduler service" in last, last
    assert time.monotonic() - started < SCHEDULER_WAIT + 60
    assert not (project / "artifacts").exists()  # nothing ran
