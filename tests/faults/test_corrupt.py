"""Corrupt or truncated artifacts: detected by the hash check (and rebuilt byte-identical by the next
run) or by the format check (an ArtifactError naming the file); never silently used."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tasks.artifacts import (
    ArtifactError,
    load_tensors,
    read_data_meta,
    read_dsv_parquet,
    read_json,
    read_lambdas_parquet,
    save_tensors,
)
from tests.faults.conftest import tmp_leftovers, wait_for


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


def _flip(p: Path) -> None:  # same size, one byte changed: only a hash can tell
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00garbage" * 20)


def _empty(p: Path) -> None:
    p.write_bytes(b"")


REBUILD_CASES = [
    ("artifacts/pretrain/teacher.safetensors", _truncate, "pretrain"),
    ("artifacts/extract/shards/noise_ipc2_shard1.safetensors", _flip, "extract-noise_2_1_2"),
    ("artifacts/extract/dsv.parquet", _truncate, "extract-merge"),
    ("artifacts/coreset/lambdas.parquet", _garbage, "coreset"),
    ("artifacts/prepare/meta.json", _empty, "prepare"),
    ("artifacts/distill/cells/random_ipc2.json", _flip, "distill-random_2"),
    ("artifacts/prepare/train.safetensors", _flip, "prepare"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("rel", "damage", "task"), REBUILD_CASES, ids=[f"{c[1].__name__[1:]}-{Path(c[0]).name}"
                                                                     for c in REBUILD_CASES])
def test_damaged_artifact_is_detected_and_rebuilt(
    completed_project: tuple[Path, dict], rel: str, damage: Callable[[Path], None], task: str
) -> None:
    from flows.pipeline import pipeline
    from tests.integration.test_pipeline import task_states

    project, _ = completed_project
    target = project / rel
    good = hashlib.sha256(target.read_bytes()).hexdigest()
    damage(target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() != good
    state = pipeline(params_path="params.yaml", root=str(project), track=False, return_state=True)
    assert state.is_completed(), state.message
    states: dict[str, set[str]] = {}
    for name, s in task_states(state.state_details.flow_run_id):
        states.setdefault(name, set()).add(s)
    assert states[task] == {"Completed"}, states  # cache record rejected by the hash check: the task ran
    assert hashlib.sha256(target.read_bytes()).hexdigest() == good  # rebuilt byte-identical
    assert tmp_leftovers(project) == []


def _run_log(flow_run_id: object) -> list[str]:
    """The messages a flow run (and its task runs) sent to the Prefect API so far (sent in batches)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


@pytest.mark.slow
def test_tampered_cache_record_metric_is_not_reported(completed_project: tuple[Path, dict]) -> None:
    """A record's metrics are covered by its digest: 0.999 written into a record (its artifact hashes intact)
    never reaches metrics/ or the summary; the stage is recomputed with a warning naming the record."""
    import json

    from flows.cache import load_record
    from flows.pipeline import pipeline
    from tests.integration.test_pipeline import task_states

    project, _ = completed_project
    truth = json.loads((project / "metrics/evaluate.json").read_text())["teacher_acc"]
    assert truth != 0.999
    records = sorted((project / ".dsv/cache/evaluate").glob("*.json"))
    assert len(records) == 2  # the stage's record and its latest output (what `dsv stage` reads)
    original = {rec: rec.read_bytes() for rec in records}  # restored at the end: they name the tracked run
    for rec in records:
        data = json.loads(rec.read_text())
        data["metrics"]["teacher_acc"] = 0.999
        rec.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    state = pipeline(params_path="params.yaml", root=str(project), track=False, return_state=True)
    assert state.is_completed(), state.message
    assert wait_for(lambda: any("does not match its integrity digest" in m and str(records[0].parent) in m
                                for m in _run_log(state.state_details.flow_run_id)), 30, every=0.5)
    states = {name: s for name, s in task_states(state.state_details.flow_run_id)}
    assert states["evaluate"] == "Completed", states  # recomputed, not restored
    assert json.loads((project / "metrics/evaluate.json").read_text())["teacher_acc"] == truth
    assert state.result()["stages"]["evaluate"]["cached"] is False
    for rec in records:  # rewritten whole
        data = load_record(rec)
        assert data is not None and data["metrics"]["teacher_acc"] == truth
    for rec, raw in original.items():  # the untracked rerun recorded no MLflow run: put back the tracked records
        rec.write_bytes(raw)


def _shard(tmp: Path) -> Path:
    return save_tensors(tmp / "s.safetensors", {"x": torch.randn(4, 1, 8, 8), "y": torch.arange(4)})


READ_CASES = [
    ("truncated safetensors", lambda t: (_truncate(_shard(t)), load_tensors(t / "s.safetensors"))[1],
     r"s\.safetensors is corrupt or not a safetensors file"),
    ("safetensors lacking a tensor", lambda t: load_tensors(_shard(t), ("x", "lam")),
     r"s\.safetensors lacks tensors \['lam'\]"),
    ("garbage dsv.parquet", lambda t: (_garbage(t / "dsv.parquet"), read_dsv_parquet(t / "dsv.parquet"))[1],
     r"dsv\.parquet is corrupt or not a Parquet file"),
    ("missing lambdas.parquet", lambda t: read_lambdas_parquet(t / "lambdas.parquet"),
     r"lambdas\.parquet is missing; rerun the stage"),
    ("truncated json", lambda t: ((t / "m.json").write_text('{"a": [1, 2'), read_json(t / "m.json"))[1],
     r"m\.json is corrupt JSON"),
    ("meta.json without fields", lambda t: ((t / "meta.json").write_text('{"name": "x"}'),
                                            read_data_meta(t / "meta.json"))[1], r"meta\.json lacks field"),
]


@pytest.mark.parametrize(("case", "read", "match"), READ_CASES, ids=[c[0] for c in READ_CASES])
def test_damaged_file_read_directly_raises_naming_it(tmp_path: Path, case: str, read: Callable, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        read(tmp_path)


@pytest.mark.parametrize("damage", ["truncated_jpeg", "garbage_png"])
def test_undecodable_image_names_the_file_and_is_not_retried(tmp_path: Path, damage: str) -> None:
    import numpy as np
    from PIL import Image

    from dsv.data.readers import ImageDecodeError
    from dsv.data.registry import DataConfig, load_dataset
    from flows.pipeline import retry_on_io

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i + 10, dtype=np.uint8)).save(tmp_path / split / c / f"{i}.jpg")
    bad = tmp_path / "train" / "dog" / "1.jpg"
    if damage == "truncated_jpeg":
        bad.write_bytes(bad.read_bytes()[:-200])
    else:
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageDecodeError, match=str(bad)) as info:
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))

    class _State:
        def result(self) -> None:
            raise info.value

    assert retry_on_io(None, None, _State()) is False  # a bad file is final, not transient IO
