"""Interrupts as a user sends them: Ctrl-C (SIGINT to the whole process group, as a terminal does),
SIGTERM, and SIGKILL (what the OOM killer sends). `dsv run` starts its own temporary Prefect server here
(no PREFECT_API_URL), the case that used to hang for minutes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lock import OutputLock
from tests.faults.conftest import FAULT_PARAMS, cli_env, copy_project, dsv, tmp_leftovers, wait_for

pytestmark = pytest.mark.slow

OVERRIDES = ("-S", "extract.solver.steps=150", "-S", "extract.solver.log_every=10")


def _processes_of(project: Path) -> list[str]:
    """Processes whose environment points PREFECT_HOME into ``project`` (dsv, its server, its workers)."""
    needle = f"PREFECT_HOME={project / '.dsv' / 'prefect'}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{d.name}: {cmd[:200]}")
        except OSError:
            continue
    return found


def _statuses(project: Path) -> dict[str, int]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return dict(db.execute("select status, count(*) from runs group by status").fetchall())


def _start(project: Path, *overrides: str) -> subprocess.Popen[bytes]:
    env = cli_env(project, None)  # no PREFECT_API_URL: dsv starts (and must stop) its own server
    log = open(project / "dsv.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *(overrides or OVERRIDES)], cwd=project,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until_extracting(project: Path, proc: subprocess.Popen[bytes]) -> None:
    shard = project / "artifacts" / "extract" / "shards" / "nshot_ipc2_shard0.safetensors"
    assert wait_for(lambda: shard.is_file() or proc.poll() is not None, 300, every=0.05), "never reached extract"
    assert proc.poll() is None, (project / "dsv.log").read_text()[-3000:]


def _interrupt(proc: subprocess.Popen[bytes], sig: signal.Signals) -> tuple[int, float]:
    """Send ``sig`` to the process group (as a terminal does); (exit code, seconds until the exit)."""
    try:
        sent = time.monotonic()
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=60)
        return rc, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _check_stopped(project: Path, rc: int, code: int, seconds: float, stage: str) -> None:
    """Exit code and time, the last line, no process left, no RUNNING run (the stage's and the pipeline's
    KILLED), the lock released, finished work kept, no temp file."""
    log = (project / "dsv.log").read_text()
    print(f"{stage}: exit code {rc} {seconds:.2f} s after the signal")  # shown with pytest -rP
    assert rc == code, log[-3000:]
    assert seconds < 10, f"exited {seconds:.1f} s after the signal"
    assert log.strip().splitlines()[-1].startswith("dsv: interrupted" if code == 130 else "dsv: terminated")
    assert wait_for(lambda: not _processes_of(project), 10), _processes_of(project)  # the server too
    status = _statuses(project)
    assert "RUNNING" not in status, status
    with sqlite3.connect(project / "mlflow.db") as db:
        killed = {name for (name,) in db.execute("select name from runs where status = 'KILLED'")}
    assert stage in killed and any(n.startswith("digits") for n in killed), killed  # the stage and the pipeline
    OutputLock(project, "test").acquire().release()  # the lock was released
    assert (project / "artifacts" / "pretrain" / "teacher.safetensors").is_file()  # finished work kept
    assert tmp_leftovers(project) == []


# Shards of a few seconds (the signal lands inside the second one) and distill cells that would train for
# minutes: only a stop inside the running unit ends the run within seconds.
LONG_UNITS = ("-S", "extract.solver.steps=600", "-S", "extract.solver.log_every=10",
              "-S", "distill.protocol.min_steps=50000")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_interrupt_inside_a_unit_stops_it_and_a_resume_recomputes_only_it(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    shards = project / "artifacts" / "extract" / "shards"
    # 1. Inside an extraction shard.
    proc = _start(project, *LONG_UNITS)
    _wait_until_extracting(project, proc)  # shard 0 written (its record just after); shard 1 starts
    time.sleep(0.5)
    rc, seconds = _interrupt(proc, sig)
    _check_stopped(project, rc, code, seconds, "extract")
    # The running shard stopped where it was: no file (it did not run on to its end after the signal).
    assert sorted(p.name for p in shards.glob("*.safetensors")) == ["nshot_ipc2_shard0.safetensors"]
    first = (shards / "nshot_ipc2_shard0.safetensors").stat()
    # 2. The resume recomputes the interrupted shard (and those never started), not the finished one; then a
    # second interrupt inside the first distill cell.
    proc = _start(project, *LONG_UNITS)
    assert wait_for(lambda: b"stage coreset:" in (project / "dsv.log").read_bytes() or proc.poll() is not None,
                    300, every=0.05), "never reached distill"
    time.sleep(2.0)  # the first cell is training its students
    assert proc.poll() is None, (project / "dsv.log").read_text()[-3000:]
    again = (shards / "nshot_ipc2_shard0.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # the finished shard: cached
    assert len(list(shards.glob("*.safetensors"))) == 4  # the interrupted one and the others: computed now
    rc, seconds = _interrupt(proc, sig)
    _check_stopped(project, rc, code, seconds, "distill")
    assert not (project / "artifacts" / "distill" / "cells").exists()  # the cell wrote no result...
    assert not (project / ".dsv" / "cache" / "distill").exists()  # ...and no record: a resume recomputes it
    assert len(list((project / ".dsv" / "cache" / "extract").glob("*.json"))) == 6  # 4 shards, merge, last: kept


def test_sigkill_leaves_nothing_running_and_the_next_run_closes_its_runs(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    proc = _start(project)
    try:
        _wait_until_extracting(project, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert wait_for(lambda: not _processes_of(project), 15), _processes_of(project)  # server died with its parent
    assert _statuses(project).get("RUNNING", 0) >= 2  # a killed process cannot close its runs
    again = dsv(project, "run", *OVERRIDES, env=cli_env(project, None), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    status = _statuses(project)
    assert "RUNNING" not in status and status.get("FAILED", 0) >= 2, status
    with sqlite3.connect(project / "mlflow.db") as db:
        reasons = [r[0] for r in db.execute("select value from tags where key = 'dsv.stale_reason'")]
    assert reasons and all("ended without closing the run" in r for r in reasons), reasons


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_serve_stops_on_interrupt(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    log = open(project / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    # Once a year: no run is due while the test runs (an interval schedule runs at once).
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "0 0 1 1 *"], cwd=project,
                            env=cli_env(project, None), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: b"being served" in (project / "serve.log").read_bytes() or proc.poll() is not None,
                        120, every=0.2)
        time.sleep(3)
        assert proc.poll() is None, (project / "serve.log").read_text()[-2000:]
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == code, (project / "serve.log").read_text()[-2000:]
    assert wait_for(lambda: not _processes_of(project), 10), _processes_of(project)
