"""Safe loading, loopback-only servers, no secrets in MLflow."""

from __future__ import annotations

import re
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
    import os

    assert os.environ["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    seen: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: seen.append(cmd) or 0)
    assert cli.main(["ui"]) == 0
    assert seen[0][seen[0].index("--host") + 1] == "127.0.0.1"


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
