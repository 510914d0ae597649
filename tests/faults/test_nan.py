"""NaN/inf injection: the stage stops with an error naming the shard, the step and the last finite
loss; its MLflow run and the parent are FAILED with that message; nothing downstream runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import FAULT_PARAMS, copy_project, tmp_leftovers

pytestmark = pytest.mark.slow

CASES = [
    # (override, failing stage, message regex)
    ("extract.solver.lr_lam=1e30", "extract",
     r"extract shard 1/2 \(init nshot, IPC 2, 1 per class\) diverged: λ diverged at step 0: .*last finite loss \d"),
    ("extract.solver.kkt.beta_tv=1e308", "extract",
     r"extract shard 1/2 \(init nshot, IPC 2, 1 per class\) diverged: non-finite DeepKKT loss \(inf\) at step 0"),
    ("pretrain.fit.lr=1e30", "pretrain", r"non-finite training loss \(nan\) at step \d+ of 40"),
    ("generate.recipe.beta_tv=1e308", "generate", r"non-finite generation loss \(inf\) at step 0"),
]


@pytest.mark.parametrize(("override", "stage", "match"), CASES, ids=[c[0] for c in CASES])
def test_nan_stops_the_stage_and_marks_mlflow_failed(
    tmp_path: Path, prefect_api: str, override: str, stage: str, match: str
) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import pipeline

    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    with pytest.raises(FloatingPointError, match=match):
        pipeline(params_path="params.yaml", overrides=[override], root=str(project))
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsv")
    runs = {("pipeline" if r.data.tags.get("dsv.kind") == "pipeline" else r.info.run_name): r
            for r in client.search_runs([exp.experiment_id])}
    assert runs["pipeline"].info.status == "FAILED"
    assert runs[stage].info.status == "FAILED"
    import re

    assert re.search(match, runs[stage].data.tags["error"]), runs[stage].data.tags["error"]
    assert re.search(match, runs["pipeline"].data.tags["error"])
    from tasks.paths import STAGE_NAMES

    order = list(STAGE_NAMES)
    downstream = order[order.index(stage) + 1:]
    assert not set(downstream) & set(runs), sorted(runs)  # nothing downstream ran
    for later in downstream:
        assert not (project / "artifacts" / later).exists() and not (project / "metrics" / f"{later}.json").exists()
    if stage == "extract":  # the diverged shard wrote nothing; no merged file
        assert not (project / "artifacts/extract/shards/nshot_ipc2_shard0.safetensors").exists()
        assert not (project / "artifacts/extract/dsv.parquet").exists()
    assert tmp_leftovers(project) == []
