"""Safe loading, loopback-only servers, no secrets in MLflow."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import ROOT, SECRET

CODE = [p for d in ("dsv", "tasks", "flows", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]


def test_weights_load_only_safely() -> None:
    bad = []
    for p in CODE:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, bad


def test_no_unpickling_outside_the_restricted_cifar_reader() -> None:
    pattern = re.compile(r"\bpickle\.loads?\(|\bUnpickler\b|\bread_pickle\(|\bjoblib\.load\(|\bdill\.")
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in CODE
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if pattern.search(line) and p != ROOT / "dsv/data/readers.py"]
    assert not bad, bad
    readers = (ROOT / "dsv/data/readers.py").read_text()
    assert "class _RestrictedUnpickler(pickle.Unpickler)" in readers and "pickle.load(" not in readers


def test_parquet_is_read_with_pyarrow_only_and_carries_no_pandas_metadata(tmp_path: Path) -> None:
    import torch

    from tasks.artifacts import parquet_metadata, write_lambdas_parquet

    for p in CODE:
        assert "read_parquet(" not in p.read_text(encoding="utf-8"), p
    out = write_lambdas_parquet(tmp_path / "l.parquet", index=torch.arange(3), label=torch.zeros(3, dtype=torch.long),
                                lam=torch.ones(3), rank=torch.arange(3), metadata={"dsv.params_hash": "x"})
    import pyarrow.parquet as pq

    assert b"pandas" not in (pq.read_schema(out).metadata or {})
    assert parquet_metadata(out) == {"dsv.params_hash": "x"}


def test_servers_bind_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import cli
    from flows.environment import configure

    monkeypatch.delenv("PREFECT_SERVER_API_HOST", raising=False)
    monkeypatch.setenv("PREFECT_HOME", "/tmp/dsv-security-test-prefect")
    configure(Path("/tmp"))

    assert os.environ["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert cli  # the UI below is the real `dsv ui`, started as a user starts it


def _listeners(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6: state 0A = LISTEN)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:
                    out.add(addr)
    return out


@pytest.mark.slow
def test_dsv_ui_binds_loopback_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())", "ui",
                             "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(ROOT)})
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "MLflow UI on" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "MLflow UI on http://127.0.0.1:" in line, line
        assert _listeners(port) == {"0100007F"}  # 127.0.0.1 only, never 0.0.0.0 or ::
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=15) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not _listeners(port)


@pytest.mark.slow
def test_no_environment_secret_reaches_mlflow(completed_project: tuple[Path, dict]) -> None:
    from mlflow import MlflowClient

    project, summary = completed_project
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsv")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 7
    for r in runs:
        values = [*r.data.params.values(), *r.data.tags.values(), *r.data.params.keys(), *r.data.tags.keys()]
        assert not any(SECRET in str(v) for v in values), r.info.run_name
        for f in client.list_artifacts(r.info.run_id):
            if f.path.endswith((".yaml", ".json", ".md")):
                assert SECRET not in Path(client.download_artifacts(r.info.run_id, f.path)).read_text()


PAYLOAD_MARKER = "dsv-pwned-marker"


def _pickle_payload(marker: Path) -> bytes:
    """A pickle that, when loaded, writes ``marker`` (what an attacker would plant)."""
    import pickle

    class Boom:
        def __reduce__(self) -> tuple:
            return (Path.write_text, (marker, PAYLOAD_MARKER))

    return pickle.dumps(Boom())


def _is_pickle(path: Path) -> bool:
    head = path.read_bytes()[:2]
    return len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)


@pytest.mark.slow
def test_no_pickle_under_the_state_folders_after_a_run(completed_project: tuple[Path, dict]) -> None:
    project, _ = completed_project
    files = [p for d in (".dsv", "artifacts", "metrics", "mlartifacts") for p in (project / d).rglob("*") if p.is_file()]
    assert files
    assert [p for p in files if _is_pickle(p) or b'"picklelib"' in p.read_bytes()[:4096]] == []


@pytest.mark.slow
def test_planted_pickles_in_the_cache_are_never_loaded(completed_project: tuple[Path, dict], tmp_path: Path) -> None:
    """Every cache record replaced by (1) a raw pickle and (2) Prefect's result-file format claiming a
    cloudpickle serializer: the next run treats them as misses and reruns; the payload never runs."""
    import base64
    import json

    from flows.pipeline import pipeline

    project, _ = completed_project
    marker = tmp_path / "marker"
    records = sorted((project / ".dsv/cache").rglob("*.json"))
    assert records
    saved = {p: p.read_bytes() for p in records}
    payload = _pickle_payload(marker)
    prefect_like = json.dumps({"metadata": {"serializer": {"type": "pickle", "picklelib": "cloudpickle"}},
                               "result": base64.b64encode(payload).decode()}).encode()
    try:
        for i, p in enumerate(records):
            p.write_bytes(payload if i % 2 else prefect_like)
        state = pipeline(params_path="params.yaml", root=str(project), track=False, return_state=True)
        assert state.is_completed(), state.message
        assert not marker.exists()
    finally:
        for p, b in saved.items():
            p.write_bytes(b)


def _object_array_pickle() -> bytes:
    """A CIFAR-like batch whose 'data' array claims an object dtype over raw bytes (pointers)."""
    import pickle

    import numpy as np

    blob = pickle.dumps({"data": np.zeros(2, dtype=np.uint64), "labels": [0, 1]}, protocol=2)
    blob = blob.replace(b"X\x02\x00\x00\x00u8", b"X\x02\x00\x00\x00O8")
    assert b"O8" in blob
    return blob


@pytest.mark.parametrize("payload", ["object_dtype", "os_system", "builtins_eval"])
def test_cifar_reader_refuses_crafted_pickles_without_crashing(tmp_path: Path, payload: str) -> None:
    """Each crafted batch is loaded in a child process: it must exit normally with a ValueError naming the
    file (a segfault would show as a negative return code), and the marker must never be written."""
    import pickle
    import subprocess
    import sys

    marker = tmp_path / "marker"
    path = tmp_path / "data_batch_1"
    if payload == "object_dtype":
        path.write_bytes(_object_array_pickle())
    elif payload == "os_system":
        path.write_bytes(_pickle_payload(marker))
    else:
        path.write_bytes(b"cbuiltins\neval\n(V__import__('pathlib').Path(" + repr(str(marker)).encode()
                         + b").write_text('x')\ntR.")
    code = ("from dsv.data.readers import safe_unpickle\n"
            f"try:\n    safe_unpickle({str(path)!r})\nexcept ValueError as e:\n    print('REFUSED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "REFUSED" in proc.stdout and str(path) in proc.stdout
    assert not marker.exists()
    del pickle
