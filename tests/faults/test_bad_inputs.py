"""Bad input files and values only the data can reveal: each ends with one line naming the file (and the row or
the tensor) or the key, exit != 0, before any training on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.faults.conftest import FAULT_PARAMS, copy_project, dsv
from tests.integration.test_bring_your_own import TABULAR_PARAMS

pytestmark = pytest.mark.slow


def _csv(path: Path, header: str, labels: list[str]) -> Path:
    rows = [f"{i % 7}.5,{(3 * i) % 5}.25,{lab}" for i, lab in enumerate(labels)]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _one_line(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv: error: "), out[-3000:]
    return lines[0]


def test_empty_tabular_label_names_the_file_and_the_row(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", TABULAR_PARAMS)
    labels = ["a", "b"] * 12
    labels[6] = ""  # the 7th data row, line 8 of the file
    _csv(project / "wine.csv", "alcohol,proline,cultivar", labels)
    out = dsv(project, "stage", "prepare", "--no-mlflow")
    assert out.returncode != 0, out.stdout[-2000:]
    line = _one_line(out.stderr)
    assert "label column 'cultivar' of wine.csv is empty in row 7 (line 8 with the header)" in line, line
    assert not (project / "artifacts" / "prepare" / "meta.json").exists()


def test_duplicate_tabular_column_names_the_file(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", TABULAR_PARAMS)
    _csv(project / "wine.csv", "alcohol,alcohol,cultivar", ["a", "b"] * 12)
    out = dsv(project, "run", "--no-mlflow")
    assert out.returncode == 2, out.stdout[-2000:]
    line = _one_line(out.stderr)
    assert "prepare.data.root = 'wine.csv'" in line and "['alcohol'] appear more than once" in line, line
    assert not (project / "artifacts").exists()


def test_teacher_checkpoint_with_nan_is_refused_naming_the_file_and_the_tensor(
    tmp_path: Path, prefect_api: str
) -> None:
    from safetensors.torch import save_file

    from dsv.models import ModelConfig, build_seeded

    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    state = dict(build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 10, seed=0).state_dict())
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(project / "teacher.safetensors"))
    out = dsv(project, "run", "--no-mlflow", "-S", "pretrain.checkpoint=teacher.safetensors", api_url=prefect_api)
    assert out.returncode == 1, out.stdout[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("dsv: error: CheckpointError: checkpoint teacher.safetensors: tensor "), last
    assert f"{name!r} has NaN or infinite values" in last, last
    assert not (project / "artifacts" / "pretrain").exists() and not (project / "artifacts" / "extract").exists()


def test_generate_pairs_beyond_the_classes_are_refused_before_any_training(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    bad = ("-S", "generate.pairs=[[0, 99]]")
    message = "dsv: error: generate.pairs [[0, 99]] name classes beyond the 10 of the data (indices 0-9)"
    first = dsv(project, "stage", "prepare", "--no-mlflow", *bad)  # the data is read: checked right after
    assert first.returncode == 2 and _one_line(first.stderr) == message, first.stderr[-2000:]
    then = dsv(project, "stage", "pretrain", "--no-mlflow", *bad)  # and before a stage that trains
    assert then.returncode == 2 and _one_line(then.stderr) == message, then.stderr[-2000:]
    assert not (project / "artifacts" / "pretrain").exists()


def test_read_checkpoint_names_every_non_finite_tensor(tmp_path: Path) -> None:
    from dsv.models import CheckpointError, read_checkpoint

    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")]),
                "steps": torch.tensor([3])}, path)
    with pytest.raises(CheckpointError, match=r"w\.pt: tensor 'b' has NaN or infinite values \(and 1 more"):
        read_checkpoint(path)
