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


def test_experiment_opens_in_the_model_training_view(tmp_path: Path) -> None:
    from tasks.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    tracker = Tracker(tmp_path, "dsv-test")
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # an experiment made before the tag gets it when next opened; a kind the user chose is kept
    old = tracker.client.create_experiment("old", artifact_location=(tmp_path / "mlartifacts").as_uri())
    Tracker(tmp_path, "old")
    assert tracker.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    mine = tracker.client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(tmp_path, "mine")
    assert tracker.client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_logged_models_are_named_and_carry_their_input_normalisation(tmp_path: Path) -> None:
    import mlflow

    from tasks.artifacts import DataMeta
    from tasks.atomic import write_json

    meta = DataMeta(name="digits", classes=("zero", "one"), mean=(0.25,), std=(0.5,), input_shape=(1, 2, 2),
                    source="test")
    meta_file = write_json(tmp_path / "meta.json", {"name": meta.name, "classes": list(meta.classes),
                                                    "mean": list(meta.mean), "std": list(meta.std),
                                                    "input_shape": list(meta.input_shape), "source": "test"})
    tracker = Tracker(tmp_path, "dsv-test")
    stage = tracker.start_run("pretrain")
    example = torch.zeros(1, 1, 2, 2).numpy()
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    tracker.log(stage, meta_file).model(teacher, "teacher", example)  # the metadata read from the data's meta.json
    tracker.end_run(stage)
    row = {"method": "dsv_nshot", "label": "DSV from random real images (n-shot)", "ipc": 2, "shots": 2,
           "protocol": "dd", "label_type": "hard", "n_train": 4, "acc_mean": 0.75, "acc_std": 0.05, "rank": 1,
           "delta_best": 0.0, "delta_random": 0.1, "n_runs": 2}
    from tasks.tracking import model_metadata

    [result] = tracker.log_results(stage, [row], models={"dsv_nshot_ipc2": teacher}, input_example=example,
                                   metadata=model_metadata(meta))
    models = {m.name: m for m in tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id])}
    assert set(models) == {"teacher", "student-dsv_nshot-ipc2"}
    for m in models.values():
        info = mlflow.models.get_model_info(f"models:/{m.model_id}")
        assert info.metadata["input"]["mean"] == [0.25] and info.metadata["input"]["std"] == [0.5]
        assert info.metadata["input"]["shape"] == [1, 2, 2] and info.metadata["classes"] == ["zero", "one"]
    run = tracker.client.get_run(result)
    assert run.data.metrics["acc_pct"] == 75.0 and run.data.metrics["delta_random_pct"] == 10.0
    assert run.data.params["method_name"] == row["label"]


def test_a_copied_store_is_relocated_to_its_own_folder(tmp_path: Path) -> None:
    import hashlib
    import shutil

    from tasks.tracking import relocate_store

    def tree(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    a = tmp_path / "a b"  # a space: locations are percent-encoded file URIs
    a.mkdir()
    tracker = Tracker(a, "dsv-test")
    run_id = tracker.start_run("pretrain")
    tracker.log_json(run_id, {"x": 1}, "x.json")
    tracker.end_run(run_id)
    b = tmp_path / "moved" / "b"
    shutil.copytree(a, b)
    before = tree(a)
    copy = Tracker(b, "dsv-test")
    assert copy.client.get_experiment(copy.experiment_id).artifact_location == (b / "mlartifacts").as_uri()
    assert copy.client.get_run(run_id).info.artifact_uri.startswith((b / "mlartifacts").as_uri() + "/")
    copy.log_json(run_id, {"x": 2}, "y.json")  # written into the copy
    assert (b / "mlartifacts" / run_id / "artifacts" / "y.json").is_file()
    assert tree(a) == before  # the original was neither read for writing nor changed
    assert relocate_store(b) is None  # already local: nothing to do
