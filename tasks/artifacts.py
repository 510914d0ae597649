"""Reading and writing the pipeline's artifact files (safetensors, Parquet, JSON), atomically.

Safe loading only: tensors come from safetensors files (no pickle), Parquet is read with pyarrow
(whose readers never unpickle), and a file that fails its format check raises
:class:`ArtifactError` naming the file instead of being used.

Parquet layouts:

* ``dsv.parquet``: one row per DSV: ``image`` (``fixed_shape_tensor<float32>[C, H, W]`` in pixel
  units, [0, 1]), ``label``, ``lam``, ``entropy``, ``confidence`` (teacher probability of the label),
  ``class_name``, ``init``, ``ipc``, ``shard``; file metadata ``dsv.params_hash`` (and others).
* ``lambdas.parquet``: one row per real training image: ``index``, ``label``, ``lam``, ``rank``
  (within its class, 0 = highest λ).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from dsv.data.core import denormalize, normalize
from tasks.atomic import atomic_path

PARAMS_HASH_KEY = "dsv.params_hash"


class ArtifactError(RuntimeError):
    """An artifact file is missing, truncated or not in the expected format."""


# ------------------------------------------------------------------------------------- safetensors


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically save named tensors (contiguous CPU copies) as safetensors.

    ``metadata`` is stored as ONE header entry (``dsv.meta``, sorted-key JSON): safetensors keeps
    metadata in a hash map whose order varies between calls, so several entries would make the
    file's bytes (and so its content hash and every cache key downstream) nondeterministic.
    """
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"dsv.meta": json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=header)
    return Path(path)


def load_tensors(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Load a safetensors file; ``keys`` must all be present.

    Raises:
        ArtifactError: missing file, bad format, or a missing key.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p} is missing; rerun the stage that writes it")
    try:
        out = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{p} is corrupt or not a safetensors file ({exc}); delete it and rerun") from exc
    missing = [k for k in keys if k not in out]
    if missing:
        raise ArtifactError(f"{p} lacks tensors {missing}; it was written by another version")
    return out


def read_json(path: str | Path) -> Any:
    """Read a JSON artifact; a missing or truncated file raises :class:`ArtifactError`."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{p} is missing; rerun the stage that writes it") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{p} is corrupt JSON ({exc}); delete it and rerun") from exc


# ----------------------------------------------------------------------------------------- Parquet


def _write_table(path: str | Path, table: pa.Table, metadata: dict[str, str]) -> Path:
    """Atomically write ``table`` with file-level ``metadata`` (zstd)."""
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd")
    return Path(path)


def _read_table(path: str | Path, columns: tuple[str, ...]) -> pa.Table:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p} is missing; rerun the stage that writes it")
    try:
        table = pq.read_table(str(p))
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError(f"{p} is corrupt or not a Parquet file ({exc}); delete it and rerun") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ArtifactError(f"{p} lacks columns {missing}")
    return table


def parquet_metadata(path: str | Path) -> dict[str, str]:
    """The file-level key-value metadata of a Parquet file (without pandas/arrow internals)."""
    meta = pq.read_schema(str(path)).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:")}


@dataclass
class DSVTable:
    """DSVs loaded back from ``dsv.parquet`` (optionally filtered to one init and IPC).

    Attributes:
        x: (M, C, H, W) float32 images in pixel units [0, 1] (normalise before feeding a model).
        y: (M,) int64 labels.
        lam: (M,) λ.
        support: (M,) support score λ·‖∇_θ L‖ (NaN in files written before it existed).
        margin: (M,) teacher margin towards the label (NaN likewise).
        entropy: (M,) teacher entropy (nats).
        confidence: (M,) teacher probability of the label.
        init: (M,) init kind of each row.
        ipc: (M,) IPC of each row.
        shard: (M,) shard of each row.
        class_names: (M,) class name of each row.
        metadata: the file's key-value metadata (params hash, ...).
    """

    x: Tensor
    y: Tensor
    lam: Tensor
    support: Tensor
    margin: Tensor
    entropy: Tensor
    confidence: Tensor
    init: list[str]
    ipc: list[int]
    shard: list[int]
    class_names: list[str]
    metadata: dict[str, str]


DSV_COLUMNS = ("image", "label", "lam", "entropy", "confidence", "class_name", "init", "ipc", "shard")
_RESERVED = frozenset({*DSV_COLUMNS, "png", "support", "margin", "index", "rank", "support_rank"})


def feature_column(name: str) -> str:
    """The Parquet column of a tabular feature: its own name, or ``feature:<name>`` when that is taken."""
    return f"feature:{name}" if name in _RESERVED else name


def png_bytes(x: np.ndarray) -> list[bytes]:
    """(M, C, H, W) images in [0, 1] (C = 1 or 3) as PNG files' bytes, one per image."""
    import io

    from PIL import Image

    out = []
    for img in np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8):
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _feature_columns(arr: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, pa.Array]:
    if arr.ndim != 2 or not names:
        return {}
    if len(names) != arr.shape[1]:
        raise ValueError(f"{len(names)} feature names for {arr.shape[1]} features")
    return {feature_column(n): pa.array(arr[:, i].astype(np.float64)) for i, n in enumerate(names)}


def write_dsv_parquet(
    path: str | Path,
    *,
    x: Tensor,
    y: Tensor,
    lam: Tensor,
    entropy: Tensor,
    confidence: Tensor,
    class_names: list[str],
    support: Tensor | None = None,
    margin: Tensor | None = None,
    init: list[str],
    ipc: list[int],
    shard: list[int],
    metadata: dict[str, str],
    feature_names: tuple[str, ...] | list[str] = (),
) -> Path:
    """Atomically write DSVs: ``x`` is (M, C, H, W) in pixel units (or (M, D) features in their original
    units); the rest are per-row columns.

    Besides ``image`` (a fixed-shape tensor column: ``pq.read_table(p).column("image").combine_chunks()
    .to_numpy_ndarray()`` gives (M, C, H, W)), images are stored as PNG bytes in ``png`` (any tool reads
    them: ``PIL.Image.open(io.BytesIO(png))``) and tabular rows get one float column per feature, named as in
    the user's file (``feature_names``).
    """
    arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
    if arr.ndim < 2:
        raise ValueError(f"x must be (M, ...) images, got shape {arr.shape}")
    if arr.shape[0] == 0:
        tensor_type = pa.fixed_shape_tensor(pa.float32(), list(arr.shape[1:]))
        image = pa.ExtensionArray.from_storage(
            tensor_type, pa.array([], type=pa.list_(pa.float32(), int(np.prod(arr.shape[1:]))))
        )
    else:
        image = pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
    table = pa.table(
        {
            "image": image,
            "label": pa.array(y.cpu().numpy().astype(np.int64)),
            "lam": pa.array(lam.detach().cpu().numpy().astype(np.float64)),
            "support": pa.array(_col(support, lam)),
            "margin": pa.array(_col(margin, lam)),
            "entropy": pa.array(entropy.detach().cpu().numpy().astype(np.float64)),
            "confidence": pa.array(confidence.detach().cpu().numpy().astype(np.float64)),
            "class_name": pa.array(class_names, type=pa.string()),
            "init": pa.array(init, type=pa.string()),
            "ipc": pa.array(ipc, type=pa.int64()),
            "shard": pa.array(shard, type=pa.int64()),
            **({"png": pa.array(png_bytes(arr), type=pa.binary())} if arr.ndim == 4 and arr.shape[1] in (1, 3)
               else {}),
            **_feature_columns(arr, feature_names),
        }
    )
    return _write_table(path, table, metadata)


def write_generated_parquet(
    path: str | Path,
    *,
    x: Tensor,
    kind: list[str],
    target: Tensor,
    soft_target: Tensor,
    delta: Tensor,
    pair: Tensor,
    source_index: Tensor,
    teacher_probs: Tensor,
    judge_probs: Tensor,
    class_names: list[str],
    metadata: dict[str, str],
) -> Path:
    """Atomically write generated images: ``x`` (M, C, H, W) in pixel units; ``kind`` is "sample",
    "interpolation" or "edit"; ``soft_target``, ``teacher_probs`` and ``judge_probs`` are (M, classes);
    ``delta`` is NaN and ``pair``/``source_index`` are -1 where they do not apply (``source_index``: the edited
    image's index in the prepared test split). Images are also PNG bytes in ``png``, like ``dsv.parquet``."""
    arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"generated images must be a non-empty (M, C, H, W) batch, got shape {arr.shape}")

    def rows(t: Tensor) -> pa.Array:
        return pa.array(list(t.detach().cpu().double().numpy()), type=pa.list_(pa.float64()))

    table = pa.table({
        "image": pa.FixedShapeTensorArray.from_numpy_ndarray(arr),
        "kind": pa.array(kind, type=pa.string()),
        "target": pa.array(target.cpu().numpy().astype(np.int64)),
        "class_name": pa.array([class_names[int(t)] for t in target], type=pa.string()),
        "soft_target": rows(soft_target),
        "delta": pa.array(delta.cpu().numpy().astype(np.float64)),
        "pair": pa.array(pair.cpu().numpy().astype(np.int64)),
        "source_index": pa.array(source_index.cpu().numpy().astype(np.int64)),
        "teacher_probs": rows(teacher_probs),
        "judge_probs": rows(judge_probs),
        **({"png": pa.array(png_bytes(arr), type=pa.binary())} if arr.shape[1] in (1, 3) else {}),
    })
    return _write_table(path, table, metadata)


def _col(values: Tensor | None, like: Tensor) -> np.ndarray:
    """A float64 column, or NaN of ``like``'s length when the values are not known."""
    if values is None:
        return np.full(like.shape[0], np.nan)
    return values.detach().cpu().numpy().astype(np.float64)


def _optional(table: pa.Table, name: str) -> np.ndarray:
    """A float column that older files may lack (NaN then)."""
    if name in table.column_names:
        return table.column(name).to_numpy().astype(np.float64)
    return np.full(table.num_rows, np.nan)


def read_dsv_parquet(path: str | Path, init: str | None = None, ipc: int | None = None) -> DSVTable:
    """Load ``dsv.parquet`` back into tensors, optionally only the rows of one init kind and IPC."""
    table = _read_table(path, DSV_COLUMNS)
    meta = parquet_metadata(path)
    col = table.column("image").combine_chunks()
    if not isinstance(col.type, pa.FixedShapeTensorType):
        raise ArtifactError(f"{path}: column 'image' is {col.type}, expected a fixed_shape_tensor")
    images = col.to_numpy_ndarray() if len(col) else np.zeros((0, *col.type.shape), dtype=np.float32)
    inits = table.column("init").to_pylist()
    ipcs = table.column("ipc").to_pylist()
    keep = np.array(
        [(init is None or a == init) and (ipc is None or b == ipc) for a, b in zip(inits, ipcs)], dtype=bool
    )

    def num(name: str, dtype: Any) -> Tensor:
        return torch.from_numpy(table.column(name).to_numpy().astype(dtype)[keep].copy())

    return DSVTable(
        x=torch.from_numpy(np.ascontiguousarray(images[keep], dtype=np.float32)),
        y=num("label", np.int64),
        lam=num("lam", np.float32),
        support=torch.from_numpy(_optional(table, "support")[keep].astype(np.float32)),
        margin=torch.from_numpy(_optional(table, "margin")[keep].astype(np.float32)),
        entropy=num("entropy", np.float32),
        confidence=num("confidence", np.float32),
        init=[v for v, k in zip(inits, keep) if k],
        ipc=[v for v, k in zip(ipcs, keep) if k],
        shard=[v for v, k in zip(table.column("shard").to_pylist(), keep) if k],
        class_names=[v for v, k in zip(table.column("class_name").to_pylist(), keep) if k],
        metadata=meta,
    )


@dataclass
class LambdaTable:
    """``lambdas.parquet`` as tensors: (N,) index, label, lam, rank, support, margin, support_rank."""

    index: Tensor
    label: Tensor
    lam: Tensor
    rank: Tensor
    metadata: dict[str, str]
    support: Tensor | None = None
    margin: Tensor | None = None
    support_rank: Tensor | None = None


def write_lambdas_parquet(
    path: str | Path, *, index: Tensor, label: Tensor, lam: Tensor, rank: Tensor, metadata: dict[str, str],
    support: Tensor | None = None, margin: Tensor | None = None, support_rank: Tensor | None = None,
    features: Tensor | None = None, feature_names: tuple[str, ...] | list[str] = (),
) -> Path:
    """Atomically write one row per real training image (``index`` into the prepared training split); for
    tabular data, ``features`` (N, D) in their original units become one column per feature."""
    cols = {
        "index": pa.array(index.cpu().numpy().astype(np.int64)),
        "label": pa.array(label.cpu().numpy().astype(np.int64)),
        "lam": pa.array(lam.detach().cpu().numpy().astype(np.float64)),
        "rank": pa.array(rank.cpu().numpy().astype(np.int64)),
    }
    if support is not None and margin is not None and support_rank is not None:
        cols["support"] = pa.array(support.detach().cpu().numpy().astype(np.float64))
        cols["margin"] = pa.array(margin.detach().cpu().numpy().astype(np.float64))
        cols["support_rank"] = pa.array(support_rank.cpu().numpy().astype(np.int64))
    if features is not None:
        cols.update(_feature_columns(features.detach().cpu().numpy(), feature_names))
    table = pa.table(cols)
    return _write_table(path, table, metadata)


def read_lambdas_parquet(path: str | Path) -> LambdaTable:
    """Load ``lambdas.parquet`` back into tensors."""
    table = _read_table(path, ("index", "label", "lam", "rank"))

    def num(name: str, dtype: Any) -> Tensor:
        return torch.from_numpy(table.column(name).to_numpy().astype(dtype).copy())

    has_support = "support_rank" in table.column_names
    return LambdaTable(
        index=num("index", np.int64),
        label=num("label", np.int64),
        lam=num("lam", np.float32),
        rank=num("rank", np.int64),
        metadata=parquet_metadata(path),
        support=num("support", np.float64) if has_support else None,
        margin=num("margin", np.float64) if has_support else None,
        support_rank=num("support_rank", np.int64) if has_support else None,
    )


def write_records_parquet(path: str | Path, rows: list[dict[str, Any]], metadata: dict[str, str]) -> Path:
    """Atomically write a list of flat dicts (a trace) as a Parquet table."""
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    return _write_table(path, table, metadata)


# ------------------------------------------------------------------------------ data and models


@dataclass(frozen=True)
class DataMeta:
    """``artifacts/prepare/meta.json``: what the prepared tensors are."""

    name: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]
    source: str
    features: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def images(self) -> bool:
        """Whether the inputs are (C, H, W) images (else (D,) feature vectors)."""
        return len(self.input_shape) == 3

    def stats(self) -> tuple[Tensor, Tensor]:
        """(mean, std) as (C,) tensors."""
        return torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)

    def normalize(self, x: Tensor) -> Tensor:
        """Pixel (or feature) units -> the models' normalised inputs, (x − mean) / std per channel or feature."""
        return normalize(x, *self.stats())

    def denormalize(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`normalize`."""
        return denormalize(x, *self.stats())

    def bounds(self, train_x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The valid input range in normalised units, (lo, hi) per channel or feature: pixels in [0, 1]; a feature
        between its smallest and largest value in ``train_x`` (the normalised training split, needed for
        feature vectors), so synthesised inputs stay in the range of the real data."""
        if self.images:
            mean, std = self.stats()
            return (0.0 - mean) / std, (1.0 - mean) / std
        if train_x is None:
            raise ValueError("the bounds of feature vectors come from the training split: pass train_x")
        return train_x.min(dim=0).values, train_x.max(dim=0).values


def read_data_meta(path: str | Path) -> DataMeta:
    """Read ``meta.json`` written by the prepare stage."""
    d = read_json(path)
    try:
        return DataMeta(
            name=str(d["name"]), classes=tuple(d["classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            input_shape=tuple(int(s) for s in d["input_shape"]), source=str(d["source"]),
            features=tuple(str(f) for f in d.get("features", [])),
        )
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} lacks field {exc}; rerun the prepare stage") from exc


def load_split(path: str | Path, meta: DataMeta) -> tuple[Tensor, Tensor]:
    """A prepared split as (x normalised (N, C, H, W) float32, y (N,) int64)."""
    t = load_tensors(path, ("x", "y"))
    return meta.normalize(t["x"]).contiguous(), t["y"].long()


def save_model(weights: str | Path, spec: str | Path, model: torch.nn.Module, spec_data: dict[str, Any]) -> None:
    """Save a model's state dict (safetensors) and the JSON spec needed to rebuild it."""
    from tasks.atomic import write_json

    save_tensors(weights, dict(model.state_dict()))
    write_json(spec, spec_data)


def load_model(weights: str | Path, spec: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Rebuild a model from its spec (``model`` = ModelConfig fields, ``in_shape``, ``num_classes``)
    and load its safetensors weights (strict), in eval mode."""
    from dsv.models import ModelConfig, build_seeded

    s = read_json(spec)
    try:
        cfg = ModelConfig(**s["model"])
        # The initial weights are overwritten below; build_seeded only keeps construction from drawing on
        # the global RNG while another thread (runtime.workers > 1) is building a seeded model.
        model = build_seeded(cfg, tuple(s["in_shape"]), int(s["num_classes"]), seed=0)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{spec} does not describe a model ({exc}); rerun the pretrain stage") from exc
    state = load_tensors(weights)
    from dsv.models import non_finite_tensors

    bad = non_finite_tensors(state)
    if bad:
        raise ArtifactError(f"{weights}: tensor {bad[0]!r} has NaN or infinite values; rerun the stage that wrote it")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights} does not match {spec}: {exc}") from exc
    return model.to(device).eval()
