"""Stage ``prepare``: load the dataset, hold out a validation split, save tensors and the 0-shot pool.

Outputs (``artifacts/prepare/``): ``train``/``val``/``test.safetensors`` (``x`` in pixel units,
``y``), ``init_pool.safetensors`` (images of another dataset resized to the task's shape), and
``meta.json`` (classes, mean, std, input shape, source). Loaders normalise with meta's mean/std.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dsv.checks import at_least, one_of
from dsv.data.core import class_counts, split_validation
from dsv.data.registry import DATASET_NAMES, DataConfig, load_dataset, resize_images
from tasks.artifacts import save_tensors
from tasks.atomic import write_json
from tasks.figures import image_grid
from tasks.output import StageConfig, StageOutput, finish
from tasks.paths import Paths
from tasks.ranges import ANY, GE0, GE1, GT0, SEED, register
from tasks.tracking import StageLog


@dataclass(frozen=True)
class InitPoolConfig:
    """Images of another dataset used to initialise 0-shot DSVs (no real image of the task).

    Attributes:
        dataset: any registry dataset; resized (and grey/RGB converted) to the task's image shape.
        root: where that dataset's files are looked for.
        size: number of pool images kept (seeded, stratified over the pool's classes); None keeps all.
        seed: seed of that subset.
    """

    dataset: str = "digits"
    root: str = "data"
    size: int | None = 500
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, DATASET_NAMES)
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be >= 1 or null, got {self.size}")


@dataclass(frozen=True)
class NormalizeConfig:
    """The model's input normalisation, x' = (x - mean) / std per channel (per feature for tabular data).

    Attributes:
        mean: one value per channel (pixel units, [0, 1]) or per feature; None = the training split's.
        std: as ``mean``; every value > 0. Set both or neither, e.g. ImageNet's for a torchvision or timm
            checkpoint trained with them: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225].
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be set together (or both null)")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
            if min(self.std) <= 0:
                raise ValueError(f"std must be > 0, got {list(self.std)}")


@dataclass(frozen=True)
class PrepareConfig:
    """Stage ``prepare``: load, hold out a validation split, normalise, build the 0-shot pool.

    Attributes:
        data: the dataset (name, root, per-class subset sizes).
        val_per_class: training images per class held out for model selection (never trained on).
        seed: seed of the validation split.
        init_pool: the 0-shot initialisation pool.
        normalize: the input normalisation every model sees (default: the training split's statistics; set
            it to what a checkpoint given in ``pretrain.checkpoint`` was trained with).
    """

    data: DataConfig = field(default_factory=DataConfig)
    val_per_class: int = 100
    seed: int = 0
    init_pool: InitPoolConfig = field(default_factory=InitPoolConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)

    def __post_init__(self) -> None:
        at_least(self, 0, "val_per_class")
        n = self.data.n_per_class
        if n is not None and self.val_per_class >= n:
            raise ValueError(
                f"val_per_class = {self.val_per_class} leaves no training images (data.n_per_class = {n})"
            )


register(PrepareConfig, {"val_per_class": GE0, "seed": SEED})
register(InitPoolConfig, {"size": GE1, "seed": SEED})
register(NormalizeConfig, {"mean": ANY, "std": GT0})  # mean: a feature's mean may be negative


class Config(StageConfig, Protocol):
    @property
    def prepare(self) -> PrepareConfig: ...


def check(cfg: Any, data: dict[str, Any] | None = None) -> list[str]:
    """Problems of the ``prepare`` section in the whole config (``cfg``), or with ``data`` (meta.json's
    ``classes``, ``train_per_class``, ``test_per_class``) in the prepared data; one message per problem."""
    p = cfg.prepare
    if data is None:
        errors = check_columns(p.data)
        if ("0shot" in cfg.extract.inits or cfg.generate.init == "pool") and p.init_pool.dataset == p.data.name:
            errors.append(f"prepare.init_pool.dataset = {p.data.name!r} is the task's own dataset: 0-shot starts "
                          "must come from another one (e.g. photos, digits)")
        return errors
    classes = data["classes"]
    errors = []
    if len(classes) < 2:
        errors.append(f"prepare.data: the dataset {p.data.name!r} has {len(classes)} class(es); "
                      "a classifier needs at least two")
    empty_test = [c for c, n in zip(classes, data["test_per_class"]) if n == 0]
    if empty_test:
        errors.append(f"prepare.data: class(es) {empty_test} have no test images (test split, "
                      "prepare.data.test_per_class): their accuracy would be undefined")
    empty_train = [c for c, n in zip(classes, data["train_per_class"]) if n == 0]
    if empty_train:
        errors.append(f"prepare.data: class(es) {empty_train} have no training images after the validation "
                      "hold-out (prepare.val_per_class)")
    return errors


def run(cfg: Config, paths: Paths, log: StageLog) -> StageOutput:
    """Load, split, save; see the module docstring."""
    started = time.perf_counter()
    p = cfg.prepare
    ds = load_dataset(p.data)
    if p.val_per_class > 0:
        train, val_x, val_y = split_validation(ds, p.val_per_class, p.seed)
    else:
        train, val_x, val_y = ds, ds.train_x[:0], ds.train_y[:0]
    save_tensors(paths.train, {"x": train.train_x, "y": train.train_y})
    save_tensors(paths.val, {"x": val_x, "y": val_y})
    save_tensors(paths.test, {"x": ds.test_x, "y": ds.test_y})
    mean, std = _normalization(p.normalize.mean, p.normalize.std, ds.mean, ds.std)

    pool_x, pool_source = _init_pool(p.init_pool, tuple(ds.input_shape))
    save_tensors(paths.init_pool, {"x": pool_x})
    meta = {"name": ds.name, "classes": list(ds.classes), "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "features": list(ds.features), "input_shape": list(ds.input_shape),
            "source": ds.source, "init_pool_source": pool_source,
            "train_per_class": class_counts(train.train_y, ds.num_classes),
            "test_per_class": class_counts(ds.test_y, ds.num_classes)}
    write_json(paths.data_meta, meta)
    if len(ds.input_shape) == 3:
        log.figure(image_grid(train.train_x, train.train_y, ds.classes, f"{ds.name}: training images"),
                   "prepare/train_grid.png")
    metrics = {"n_train": int(train.train_y.numel()), "n_val": int(val_y.numel()), "n_test": int(ds.test_y.numel()),
               "n_init_pool": int(pool_x.shape[0]), "num_classes": ds.num_classes,
               "min_train_per_class": min(meta["train_per_class"])}
    log.metrics(metrics)
    files = [paths.train, paths.val, paths.test, paths.init_pool, paths.data_meta]
    return finish("prepare", cfg, paths, files, metrics, started)


def _init_pool(pool: InitPoolConfig, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """The 0-shot pool (images of another dataset, seeded subset, resized to ``shape``) and where it came from;
    empty for inputs that are not images."""
    if len(shape) != 3:
        return torch.zeros((0, *shape)), "none (not an image dataset)"
    pool_ds = load_dataset(DataConfig(name=pool.dataset, root=pool.root))
    if pool_ds.train_x.dim() != 4:
        raise ValueError(f"prepare.init_pool.dataset = {pool.dataset!r} is not an image dataset")
    order = torch.randperm(pool_ds.train_x.shape[0], generator=torch.Generator().manual_seed(pool.seed))
    if pool.size is not None:
        order = order[: pool.size]
    return resize_images(pool_ds.train_x[order], shape), f"{pool.dataset}: {pool_ds.source}"  # type: ignore[arg-type]


def _normalization(mean: tuple[float, ...] | None, std: tuple[float, ...] | None, data_mean: torch.Tensor,
                   data_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``prepare.normalize`` when set (one value per channel or feature), else the training split's."""
    if mean is None or std is None:
        return data_mean, data_std
    if len(mean) != data_mean.numel():
        unit = "channels" if data_mean.numel() in (1, 3) else "features"
        raise ValueError(f"prepare.normalize has {len(mean)} values but the data has {data_mean.numel()} {unit}")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def tabular_columns(path: Path) -> list[str]:
    """The column names of a CSV (its header line) or Parquet file (its schema), reading no data."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"file {str(path)!r} not found")
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad footer
            raise ValueError(f"{path} is not a readable Parquet file ({type(exc).__name__})") from None
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    raise ValueError(f"{path} is not a .csv or .parquet or .pq file")


def check_columns(data: DataConfig) -> list[str]:
    """Problems with a tabular config's columns, from the file's header alone (empty for other datasets)."""
    if data.name != "tabular":
        return []
    try:
        names = tabular_columns(Path(data.root))
    except (OSError, ValueError) as exc:
        return [f"prepare.data.root = {data.root!r}: {exc}"]
    out = []
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        out.append(f"prepare.data.root = {data.root!r}: column name(s) {dupes} appear more than once in its header; "
                   "every column needs its own name")
    shown = names if len(names) <= 12 else [*names[:6], "...", *names[-6:]]
    listed = ", ".join(shown) + (f" ({len(names)} columns)" if len(names) > 12 else "")
    if data.label not in names:
        hint = difflib.get_close_matches(str(data.label), names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        out.append(f"prepare.data.label = {data.label!r} is not a column of {data.root}{extra}; its columns: {listed}")
    missing = [c for c in data.features or () if c not in names]
    if missing:
        out.append(f"prepare.data.features {missing} are not columns of {data.root}; its columns: {listed}")
    return out
