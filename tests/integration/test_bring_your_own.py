"""Bring your own teacher and data, end to end through ``dsv run`` (the real CLI, a real Prefect server):

* a torchvision ResNet-18 checkpoint written here + an ImageFolder of mixed image sizes written here;
* a tabular CSV, and a wrong label column refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.faults.conftest import dsv
from tests.integration.conftest import copy_project

pytestmark = pytest.mark.slow

BYO_PARAMS = """\
prepare:
  data: {name: imagefolder, root: folder, image_size: 16}
  val_per_class: 2
  init_pool: {dataset: digits, size: 30}
  normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
pretrain:
  model: {name: "torchvision:resnet18"}
  checkpoint: teacher.pt
extract:
  inits: [nshot, 0shot, noise]
  ipcs: [1]
  solver: {steps: 3, log_every: 1, dual: clamp}
coreset:
  per_class: null
  lam: {batch_size: 64, steps: 5, param_subset: last}
distill:
  methods: [dsv_nshot, dsv_0shot, dsv_noise, lambda_topk, random]
  ipcs: [1]
  protocol: {name: dd, epochs: 1, min_steps: 2, n_runs: 1, model: {name: convnet_tiny}}
runtime: {threads: 1, log_models: false, progress: off}
"""

TABULAR_PARAMS = """\
prepare:
  data: {name: tabular, root: wine.csv, label: cultivar}
  val_per_class: 5
pretrain:
  model: {name: mlp, width: 32, depth: 2}
  fit: {optimizer: adam, lr: 5e-3, weight_decay: 5e-3, steps: 60, batch_size: 64, augment: none, schedule: none}
extract:
  inits: [nshot, noise]
  ipcs: [2]
  solver: {steps: 5, log_every: 1, dual: clamp}
coreset:
  per_class: null
  lam: {batch_size: 100, steps: 5}
distill:
  methods: [dsv_nshot, dsv_noise, lambda_topk, support_topk, random, herding]
  ipcs: [2]
  protocol: {name: dd, epochs: 2, min_steps: 5, n_runs: 1, model: {name: mlp, width: 32, depth: 1}}
  cross_model: {name: mlp_tiny}
runtime: {threads: 1, log_models: false, progress: off}
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_imagefolder(root: Path) -> None:
    """3 digit classes as RGB PNG and JPEG files of sizes 10-20 px (mixed on purpose)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for split, (start, n) in {"train": (0, 10), "test": (100, 4)}.items():
        for c in range(3):
            folder = root / split / f"digit_{c}"
            folder.mkdir(parents=True)
            idx = np.flatnonzero(d.target == c)[start : start + n]
            for i, j in enumerate(idx):
                side = int(rng.integers(10, 21))
                gray = (d.images[j] / 16.0 * 255).astype(np.uint8)
                img = Image.fromarray(gray).convert("RGB").resize((side, side + int(rng.integers(0, 4))))
                img.save(folder / f"{i}.{'jpg' if i % 3 == 0 else 'png'}")


def _resnet_checkpoint(path: Path, folder: Path, steps: int, seed: int) -> None:
    """A torchvision ResNet-18 trained briefly on the folder's training images, saved as a plain state dict."""
    from torchvision.models import resnet18

    from dsv.data.readers import read_imagefolder

    s = read_imagefolder(folder, image_size=(16, 16))
    x = (s.train_x - 0.5) / 0.25
    torch.manual_seed(seed)
    net = resnet18(num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), s.train_y).backward()
        opt.step()
    torch.save(net.state_dict(), path)


def _stage_lines(out: str) -> dict[str, str]:
    """stage -> "ran" | "cached", from ``dsv run``'s output lines "stage X: ran (..)"."""
    found = {}
    for line in out.splitlines():
        if "stage " in line and (": ran" in line or ": cached" in line):
            name = line.split("stage ", 1)[1].split(":")[0]
            found[name] = "ran" if ": ran" in line else "cached"
    return found


def test_torchvision_checkpoint_and_mixed_size_imagefolder(tmp_path: Path, prefect_api: str) -> None:
    project = copy_project(tmp_path / "byo", BYO_PARAMS)
    _write_imagefolder(project / "folder")
    ckpt = project / "teacher.pt"
    _resnet_checkpoint(ckpt, project / "folder", steps=15, seed=0)
    before = _sha(ckpt)

    first = dsv(project, "run", api_url=prefect_api, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _sha(ckpt) == before, "the user's checkpoint was written"

    meta = json.loads((project / "artifacts/prepare/meta.json").read_text())
    assert meta["input_shape"] == [3, 16, 16] and meta["classes"] == ["digit_0", "digit_1", "digit_2"]
    assert meta["mean"] == [0.5, 0.5, 0.5]  # prepare.normalize, not the data's statistics
    spec = json.loads((project / "artifacts/pretrain/model.json").read_text())
    assert spec["source"] == "checkpoint" and spec["model"]["name"] == "torchvision:resnet18"
    pre = json.loads((project / "metrics/pretrain.json").read_text())
    assert 0.0 <= pre["test_acc"] <= 1.0
    assert json.loads((project / "timings/pretrain.json").read_text())["train_seconds"] == 0.0
    assert np.isfinite(pre["kkt_certificate_last"])
    dsvs = pq.read_table(project / "artifacts/extract/dsv.parquet")
    assert dsvs.num_rows > 0 and set(dsvs.column("init").to_pylist()) <= {"nshot", "0shot", "noise"}
    lams = pq.read_table(project / "artifacts/coreset/lambdas.parquet")
    assert lams.num_rows == 3 * (10 - 2)
    rows = json.loads((project / "artifacts/evaluate/results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"dsv_nshot", "dsv_0shot", "dsv_noise", "lambda_topk", "random"}

    # A different checkpoint at the same path: pretrain and everything downstream rerun, prepare does not.
    _resnet_checkpoint(ckpt, project / "folder", steps=3, seed=1)
    second = dsv(project, "run", api_url=prefect_api, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    stages = _stage_lines(second.stdout + second.stderr)
    assert stages.get("prepare") == "cached", stages
    assert stages.get("pretrain") == "ran" and stages.get("extract") == "ran", stages


def _write_wine(path: Path) -> None:
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    frame["cultivar"] = frame.pop("target").map({0: "barolo", 1: "grignolino", 2: "barbera"})
    frame.to_csv(path, index=False)


def test_tabular_csv_runs_and_wrong_label_is_named(tmp_path: Path, prefect_api: str) -> None:
    project = copy_project(tmp_path / "tab", TABULAR_PARAMS)
    _write_wine(project / "wine.csv")

    bad = dsv(project, "run", "-S", "prepare.data.label=grape", api_url=prefect_api)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "prepare.data.label = 'grape'" in lines[0] and "cultivar" in lines[0], bad.stderr
    assert not (project / "artifacts").exists()

    run = dsv(project, "run", api_url=prefect_api, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    dsvs = pq.read_table(project / "artifacts/extract/dsv.parquet").to_pandas()
    assert len(dsvs) > 0
    # One column per feature, in the file's own units: DSVs stay inside the training data's range.
    real = __import__("pandas").read_csv(project / "wine.csv")
    for col in ("alcohol", "proline", "magnesium"):
        assert col in dsvs.columns
        assert real[col].min() - 1e-3 <= dsvs[col].min() and dsvs[col].max() <= real[col].max() + 1e-3
    assert set(dsvs["class_name"]) <= {"barolo", "grignolino", "barbera"}
    meta = json.loads((project / "artifacts/prepare/meta.json").read_text())
    lams = pq.read_table(project / "artifacts/coreset/lambdas.parquet").to_pandas()
    assert "proline" in lams.columns and len(lams) == sum(meta["train_per_class"]) == 127
    assert meta["features"][:2] == ["alcohol", "malic_acid"] and len(meta["mean"]) == 13
    rows = json.loads((project / "artifacts/evaluate/results.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"dsv_nshot", "random", "herding"}
    # distill.cross_model: a second architecture trained on every set, in its own columns
    assert all(r["cross_model"] == "mlp_tiny" and 0.0 <= r["cross_acc_mean"] <= 1.0 for r in rows if r["n_runs"])
    assert "second architecture" in (project / "artifacts/evaluate/results.md").read_text()
    flat = json.loads((project / "metrics/evaluate.json").read_text())
    assert set(flat["cross_acc"]) == set(flat["acc"])
