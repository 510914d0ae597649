"""Artifact files: Parquet/safetensors round trips, pandas readability, corruption detection."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from dsv.models import ModelConfig, build_seeded
from dsv.sets import build_set
from tasks.artifacts import (
    PARAMS_HASH_KEY,
    ArtifactError,
    load_model,
    load_tensors,
    read_dsv_parquet,
    read_lambdas_parquet,
    save_model,
    save_tensors,
    write_dsv_parquet,
    write_lambdas_parquet,
)


def _dsv(tmp_path: Path, m: int = 6) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((m, 1, 4, 5), generator=g)
    p = write_dsv_parquet(
        tmp_path / "dsv.parquet", x=x, y=torch.arange(m) % 3, lam=torch.linspace(0, 1, m),
        entropy=torch.ones(m), confidence=torch.full((m,), 0.5), class_names=[f"c{i % 3}" for i in range(m)],
        init=["nshot"] * 4 + ["noise"] * (m - 4), ipc=[2] * m, shard=[0, 1] * (m // 2),
        metadata={PARAMS_HASH_KEY: "abc123"},
    )
    return p, x


def test_dsv_parquet_roundtrip_exact(tmp_path: Path) -> None:
    p, x = _dsv(tmp_path)
    t = read_dsv_parquet(p)
    assert torch.equal(t.x, x) and t.x.shape == (6, 1, 4, 5)
    assert t.y.tolist() == [0, 1, 2, 0, 1, 2] and t.metadata[PARAMS_HASH_KEY] == "abc123"
    noise = read_dsv_parquet(p, init="noise", ipc=2)
    assert torch.equal(noise.x, x[4:]) and noise.init == ["noise", "noise"]


def test_dsv_parquet_reads_in_pandas_and_pyarrow(tmp_path: Path) -> None:
    p, _ = _dsv(tmp_path)
    df = pd.read_parquet(p)
    assert len(df) == 6
    assert {"image", "label", "lam", "entropy", "confidence", "class_name", "init", "ipc", "shard"} <= set(df.columns)
    assert str(pq.read_schema(p).field("image").type).startswith("extension<arrow.fixed_shape_tensor")
    assert pq.read_schema(p).metadata[PARAMS_HASH_KEY.encode()] == b"abc123"


def test_dsv_images_readable_without_the_arrow_type(tmp_path: Path) -> None:
    """The README's one-liners: PNG bytes in pandas, or the (M, C, H, W) array from pyarrow."""
    import io

    import numpy as np
    from PIL import Image

    p, x = _dsv(tmp_path)
    df = pd.read_parquet(p)
    img = np.asarray(Image.open(io.BytesIO(df["png"][0])))
    assert img.shape == (4, 5) and np.abs(img / 255.0 - x[0, 0].numpy()).max() <= 0.5 / 255 + 1e-6
    arr = pq.read_table(p).column("image").combine_chunks().to_numpy_ndarray()
    assert arr.shape == (6, 1, 4, 5) and np.array_equal(arr, x.numpy())


def test_tabular_rows_have_one_column_per_feature(tmp_path: Path) -> None:
    x = torch.tensor([[1.5, 200.0], [2.5, 300.0]])
    p = write_dsv_parquet(
        tmp_path / "t.parquet", x=x, y=torch.tensor([0, 1]), lam=torch.ones(2), entropy=torch.ones(2),
        confidence=torch.ones(2), class_names=["a", "b"], init=["nshot"] * 2, ipc=[1, 1], shard=[0, 0],
        metadata={}, feature_names=("age", "label"),
    )
    df = pd.read_parquet(p)
    assert df["age"].tolist() == [1.5, 2.5] and df["feature:label"].tolist() == [200.0, 300.0]
    assert df["label"].tolist() == [0, 1] and "png" not in df.columns
    assert torch.equal(read_dsv_parquet(p).x, x)
    lp = write_lambdas_parquet(tmp_path / "l.parquet", index=torch.arange(2), label=torch.tensor([0, 1]),
                               lam=torch.ones(2), rank=torch.zeros(2, dtype=torch.long), metadata={},
                               features=x, feature_names=("age", "label"))
    assert pd.read_parquet(lp)["age"].tolist() == [1.5, 2.5]


def test_empty_dsv_table(tmp_path: Path) -> None:
    p = write_dsv_parquet(
        tmp_path / "e.parquet", x=torch.zeros((0, 1, 2, 2)), y=torch.zeros(0, dtype=torch.long), lam=torch.zeros(0),
        entropy=torch.zeros(0), confidence=torch.zeros(0), class_names=[], init=[], ipc=[], shard=[], metadata={},
    )
    t = read_dsv_parquet(p)
    assert t.x.shape == (0, 1, 2, 2) and t.y.numel() == 0


def test_lambdas_roundtrip_and_topk(tmp_path: Path) -> None:
    label = torch.tensor([0, 0, 0, 1, 1, 1])
    lam = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8])
    rank = torch.tensor([2, 0, 1, 1, 2, 0])
    index = torch.tensor([10, 11, 12, 13, 14, 15])
    p = write_lambdas_parquet(tmp_path / "l.parquet", index=index, label=label, lam=lam, rank=rank, metadata={})
    t = read_lambdas_parquet(p)
    assert torch.equal(t.rank, rank) and torch.equal(t.index, index)
    x = torch.arange(16.0).view(16, 1)  # image i is the number i: the set shows which rows were taken
    x_set, y_set = build_set("lambda_topk", x=x, y=torch.arange(16) % 2, k=2, num_classes=2, seed=0,
                             ranking=(t.index, t.label, t.rank))
    assert x_set.flatten().tolist() == [11, 12, 15, 13]
    assert len(pd.read_parquet(p)) == 6
    with pytest.raises(ValueError, match="fewer than k=4"):
        build_set("lambda_topk", x=x, y=x.flatten(), k=4, num_classes=2, seed=0, ranking=(t.index, t.label, t.rank))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_files_are_detected(tmp_path: Path, damage: str) -> None:
    p, _ = _dsv(tmp_path)
    s = save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(100, 10)})
    for f in (p, s):
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        elif damage == "garbage":
            f.write_bytes(b"\x00garbage" * 50)
        else:
            f.unlink()
    with pytest.raises(ArtifactError, match="dsv.parquet"):
        read_dsv_parquet(p)
    with pytest.raises(ArtifactError, match="t.safetensors"):
        load_tensors(s)


def test_model_roundtrip_is_exact(tmp_path: Path) -> None:
    cfg = ModelConfig(name="convnet_tiny")
    m = build_seeded(cfg, (1, 8, 8), 3, seed=1)
    spec = {"model": {"name": "convnet_tiny", "width": 128, "depth": 3, "norm": "instance", "activation": "relu",
                      "pool": "avg"}, "in_shape": [1, 8, 8], "num_classes": 3}
    save_model(tmp_path / "w.safetensors", tmp_path / "m.json", m, spec)
    back = load_model(tmp_path / "w.safetensors", tmp_path / "m.json")
    x = torch.randn(4, 1, 8, 8)
    m.eval()
    assert torch.equal(back(x), m(x))
    with pytest.raises(ArtifactError, match="missing"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(ArtifactError, match="lacks tensors"):
        load_tensors(tmp_path / "w.safetensors", ("nope",))
