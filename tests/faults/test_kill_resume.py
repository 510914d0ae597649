"""SIGKILL during extraction, then resume: no partial artifact visible, the finished shard is not
recomputed (Prefect cache hit, same inode and mtime), and the final artifacts are byte-identical to
an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import FAULT_PARAMS, cli_env, copy_project, dsv, tmp_leftovers, wait_for

pytestmark = pytest.mark.slow

# Slow enough shards (about a second each here) to kill between the first and the last.
OVERRIDES = ("-S", "extract.solver.steps=150", "-S", "extract.solver.log_every=10")


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _complete(path: Path) -> bool:
    """Whether a visible artifact file is whole (loads in its format)."""
    from tasks.artifacts import ArtifactError, load_tensors, read_json

    try:
        if path.suffix == ".safetensors":
            load_tensors(path)
        elif path.suffix == ".json":
            read_json(path)
    except ArtifactError:
        return False
    return True


def _latest_task_states(api_url: str) -> dict[str, set[str]]:
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from tests.integration.test_pipeline import task_states

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    out: dict[str, set[str]] = {}
    for name, state in task_states(run.id):
        out.setdefault(name, set()).add(state)
    return out


def test_sigkill_mid_extraction_then_resume_is_identical(tmp_path: Path, prefect_api: str) -> None:
    killed = copy_project(tmp_path / "killed", FAULT_PARAMS)
    shards = killed / "artifacts" / "extract" / "shards"
    first = shards / "nshot_ipc2_shard0.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--no-mlflow", *OVERRIDES], cwd=killed,
                            env=cli_env(killed, prefect_api), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # The shard's file is written inside its task, its cached result just after: once the next
        # shard's file exists, the first shard is complete in every sense.
        second = shards / "nshot_ipc2_shard1.safetensors"
        assert wait_for(second.is_file, 240, every=0.02), "extraction never wrote its second shard"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in shards.glob("*.safetensors"))
    assert len(done) < 4, f"all shards finished before the kill ({done}); make the shards slower"
    assert not (killed / "artifacts" / "extract" / "dsv.parquet").exists()
    visible = [p for p in (killed / "artifacts").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert visible and all(_complete(p) for p in visible), "a visible artifact is partial"
    stat = first.stat()

    resumed = dsv(killed, "run", "--no-mlflow", *OVERRIDES, api_url=prefect_api)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    states = _latest_task_states(prefect_api)
    assert states["extract-nshot_2_0_2"] == {"Cached"}, states  # the finished shard was not recomputed
    assert states["prepare"] == {"Cached"} and states["pretrain"] == {"Cached"}, states
    assert "Completed" in states["extract-noise_2_1_2"], states
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert tmp_leftovers(killed) == []

    reference = copy_project(tmp_path / "reference", FAULT_PARAMS)
    clean = dsv(reference, "run", "--no-mlflow", *OVERRIDES, api_url=prefect_api)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert _tree(killed / "artifacts") == _tree(reference / "artifacts")  # byte-identical

    def rows(project: Path) -> list[dict]:  # wall times differ; every result must not
        return json.loads((project / "artifacts/evaluate/results.json").read_text())["rows"]

    assert rows(killed) == rows(reference)
