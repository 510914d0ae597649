"""MLflow tracking: models land in the run's experiment and store, never in ./mlruns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tasks.tracking import Tracker


def test_logged_model_goes_to_the_runs_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # a stray file store would appear here as ./mlruns
    root = tmp_path / "project"
    root.mkdir()
    tracker = Tracker(root, "dsv-test")
    run_id = tracker.start_run("pretrain")
    model = torch.nn.Linear(3, 2)
    tracker.log(run_id).model(model, "teacher", torch.zeros(1, 3).numpy())
    tracker.end_run(run_id)
    assert not (tmp_path / "mlruns").exists()
    models = tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [m.source_run_id for m in models] == [run_id]
    assert os.path.isdir(root / "mlartifacts")
