"""Concurrent runs: one writer per output folder (``tasks.lock``); the second refuses naming the
holder's pid, or waits; a dead holder's lock is taken over; writes never interleave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from tasks.lock import LockError, OutputLock
from tests.faults.conftest import FAULT_PARAMS, ROOT, cli_env, tmp_leftovers, wait_for

HOLD = (
    "import sys, time; from pathlib import Path; from tasks.lock import OutputLock; "
    "OutputLock(Path(sys.argv[1]), 'test holder').acquire(); print('locked', flush=True); "
    "time.sleep(float(sys.argv[2]))"
)


def _holder(base: Path, seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(base), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "params.yaml").write_text(FAULT_PARAMS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", [["run"], ["stage", "prepare"], ["run", "--no-mlflow"]])
def test_second_command_refuses_naming_the_holder(
    project: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    holder = _holder(project, 60)
    try:
        before = sorted(str(p) for p in project.rglob("*"))
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 75
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert f"is locked by pid {holder.pid} (test holder)" in err and "--wait" in err, err
        assert str(project / ".dsv" / "output.lock") in err
        # refused before Prefect or MLflow started: nothing new on disk
        assert sorted(str(p) for p in project.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()


def test_wait_option_waits_for_the_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 1.5)
    try:
        with pytest.raises(LockError, match=r"after waiting 0\.3 s"):
            OutputLock(tmp_path, wait=0.3).acquire()
        t0 = time.monotonic()
        with OutputLock(tmp_path, "waiter", wait=30) as lock:
            assert time.monotonic() - t0 < 20
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        holder.wait()


def test_killed_holder_is_taken_over(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 60)
    with pytest.raises(LockError, match=f"pid {holder.pid}"):
        OutputLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)  # the kernel drops its flock
    holder.wait()
    with OutputLock(tmp_path, "successor") as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["command"] == "successor"


def test_stale_lock_file_with_dead_pid_and_temp_leftovers(tmp_path: Path) -> None:
    lock_file = tmp_path / ".dsv" / "output.lock"
    lock_file.parent.mkdir(parents=True)
    lock_file.write_text(json.dumps({"pid": 999_999_999, "command": "dsv run"}))  # no flock held: stale
    # what tasks.atomic names a temp file: .<name>.<writer pid>.<random>.tmp (here a writer that is gone)
    leftover = tmp_path / "artifacts" / "extract" / "shards" / ".noise_ipc2_shard0.safetensors.999999999.abc123.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a file")
    keep = tmp_path / "artifacts" / "extract" / "shards" / "noise_ipc2_shard0.safetensors"
    keep.write_bytes(b"complete")
    with OutputLock(tmp_path) as lock:
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert lock.swept == [leftover]
    assert tmp_leftovers(tmp_path) == [] and keep.read_bytes() == b"complete"


def test_lock_is_taken_once_even_in_one_process(tmp_path: Path) -> None:
    with OutputLock(tmp_path, "outer"), pytest.raises(LockError, match=rf"locked by pid {os.getpid()} \(outer\)"):
        OutputLock(tmp_path, "inner").acquire()
    with OutputLock(tmp_path):  # released
        pass


@pytest.mark.slow
def test_two_real_runs_at_once_one_refuses(tmp_path: Path, prefect_api: str) -> None:
    from tests.integration.conftest import copy_project

    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    env = cli_env(project, prefect_api)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--no-mlflow"]
    first = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (project / ".dsv" / "output.lock").is_file()
                    and str(first.pid) in (project / ".dsv" / "output.lock").read_text(), 60)
    second = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 75, second.stderr[-3000:]
    assert f"locked by pid {first.pid} (dsv run)" in second.stderr.strip().splitlines()[-1]
    assert "dsv: pipeline finished" in out
    assert tmp_leftovers(project) == []


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "symlinked_state_dir"])
def test_planted_link_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    base = tmp_path / "out"
    (base / ".dsv").parent.mkdir(parents=True)
    if kind == "symlink":
        (base / ".dsv").mkdir()
        (base / ".dsv/output.lock").symlink_to(victim)
    elif kind == "hardlink":
        (base / ".dsv").mkdir()
        os.link(victim, base / ".dsv/output.lock")
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (base / ".dsv").symlink_to(elsewhere)
    with pytest.raises(LockError, match="refusing to lock"):
        OutputLock(base, "test").acquire()
    assert victim.read_text() == "precious data\n"
