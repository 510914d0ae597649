"""Extraction shards on a real Dask LocalCluster (2 worker processes) give the same DSVs as one process.

Two copies of the tiny project run prepare -> pretrain -> extract (``extract.shards=2``) through the
real Prefect tasks: one in this process (``runtime.workers=1``), one with ``runtime.workers=2``. The
teacher, every shard file and ``dsv.parquet`` must be byte-identical, and the Dask run must really have
run its shards in other processes.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import TINY_DSV_ROWS, copy_project

pytestmark = pytest.mark.slow


def _run(project: Path, overrides: list[str]) -> tuple[dict, float]:
    from flows.pipeline import pipeline
    from flows.runners import with_runner
    from tasks.config import load_config

    cfg = load_config(project / "params.yaml", overrides)
    started = time.perf_counter()
    state = with_runner(pipeline, cfg.runtime)(
        params_path="params.yaml", overrides=overrides, root=str(project), track=False, until="extract",
        return_state=True,
    )
    assert state.is_completed(), state.message
    return state.result()["stages"], time.perf_counter() - started


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dask_local_cluster_matches_one_process(tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.dask_runner import DaskRunner
    from tasks.artifacts import read_dsv_parquet
    from tasks.config import load_config
    from tasks.paths import Paths

    # Record what the Dask runner was given and which processes serve it.
    submitted: list[str] = []
    worker_pids: dict[str, int] = {}
    original = DaskRunner.submit

    def spy(self: DaskRunner, task, parameters, *args, **kwargs):  # noqa: ANN001, ANN202
        future = original(self, task, parameters, *args, **kwargs)
        submitted.append(str(parameters.get("label")))
        if not worker_pids:
            worker_pids.update(self.client.run(os.getpid))
        return future

    monkeypatch.setattr(DaskRunner, "submit", spy)
    threads, t_threads = _run(copy_project(tmp_path / "threads"), ["extract.shards=2", "runtime.workers=1"])
    dask, t_dask = _run(copy_project(tmp_path / "dask"), ["extract.shards=2", "runtime.workers=2"])
    print(f"one process {t_threads:.1f} s, dask LocalCluster (2 workers) {t_dask:.1f} s")

    assert not any(s["cached"] for s in threads.values()) and not any(s["cached"] for s in dask.values())
    # Same teacher, then the same shards and merged table, file by file.
    assert threads["pretrain"]["files"] == dask["pretrain"]["files"]
    shard_files = [f for f in threads["extract"]["files"] if "/shards/" in f]
    inits = load_config(tmp_path / "threads" / "params.yaml").extract.inits
    assert len(shard_files) == len(inits) * 2 * 2  # every init x 2 shards, tensors + trace each
    assert threads["extract"]["files"] == dask["extract"]["files"]

    a, b = Paths(tmp_path / "threads"), Paths(tmp_path / "dask")
    assert _sha(a.dsv_parquet) == _sha(b.dsv_parquet)
    ta, tb = read_dsv_parquet(a.dsv_parquet), read_dsv_parquet(b.dsv_parquet)
    assert ta.x.shape[0] == TINY_DSV_ROWS
    assert torch.equal(ta.x, tb.x) and torch.equal(ta.y, tb.y) and torch.equal(ta.lam, tb.lam)
    assert sorted(set(ta.shard)) == [0, 1]

    # Only the Dask run's shards went to Dask: every init x 2 shards, on 2 worker processes other than this one.
    assert sorted(submitted) == sorted(f"{i}_2_{s}_2" for i in inits for s in (0, 1))
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids.values()
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in worker_pids)
