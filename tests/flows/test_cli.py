"""The dsv command line: help, and bad input as one line with exit code 2 (nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dsv(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    r = _dsv(["--help"], tmp_path)
    assert r.returncode == 0
    for cmd in ("run", "stage", "serve", "ui"):
        assert cmd in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-S", "extract.stpes=3"], "unknown key 'extract.stpes' (did you mean 'extract.solver.steps'?)"),
        (["run", "-S", "pretrain.fit.lr=-1"], "pretrain.fit.lr must be > 0, got -1.0"),
        (["stage", "extract", "-S", "extract.ipcs=[0]"], "extract.ipcs must all be >= 1"),
        (["run", "-p", "missing.yaml"], "params file 'missing.yaml' not found"),
        (["stage", "nosuch"], "invalid choice: 'nosuch'"),
        (["run", "-S", "novalue"], "is not of the form section.key=value"),
        (["serve", "-S", "runtime.workers=0"], "runtime.workers must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    if args[:2] == ["serve", "-S"]:
        args = [*args, "--interval", "60"]
    r = _dsv(args, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv: error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_full_disk_under_the_tracking_store_is_named(tmp_path: Path) -> None:
    from flows.cli import _describe_failure

    try:
        try:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full")
        except RuntimeError as inner:
            raise ValueError("MLflow: could not log metric") from inner
    except ValueError as exc:
        line = _describe_failure(exc, tmp_path)
    assert line.startswith("disk full (no space left for sqlite:///") and "could not log metric" in line
    assert _describe_failure(KeyError("x"), tmp_path) == "KeyError: 'x'"


def test_ui_on_a_busy_port_refuses_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _dsv(["ui", "--port", str(port)], tmp_path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dsv: error: cannot serve the MLflow UI on 127.0.0.1:{port}: ")
    assert "in use" in lines[0] and "MLflow UI on" not in r.stdout  # never claimed to have started
    assert not (tmp_path / "mlflow.db").exists()
