"""First runs: two `dsv run`s started at once on a fresh project (two output folders, one MLflow store, one
Prefect home) both succeed: the store's and the temporary server's first-run initialisation is serialised."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import FAULT_PARAMS, cli_env, copy_project

pytestmark = pytest.mark.slow


def test_two_simultaneous_first_runs_both_succeed(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    env = cli_env(project, None)  # each starts its own temporary Prefect server on the project's Prefect home
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-S", f"runtime.output_dir=out{i}"],
                              cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for i in range(2):
        assert (project / f"out{i}" / "artifacts" / "evaluate" / "results.json").is_file()
    with sqlite3.connect(project / "mlflow.db") as db:
        parents = [s for (s,) in db.execute("select status from runs r join tags t on r.run_uuid = t.run_uuid "
                                            "where t.key = 'dsv.kind' and t.value = 'pipeline'")]
    assert parents == ["FINISHED", "FINISHED"], parents
