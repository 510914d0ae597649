"""Stage ``prepare``: load the dataset, hold out a validation split, save tensors and the 0-shot pool.

Outputs (``artifacts/prepare/``): ``train``/``val``/``test.safetensors`` (``x`` in pixel units,
``y``), ``init_pool.safetensors`` (images of another dataset resized to the task's shape), and
``meta.json`` (classes, mean, std, input shape, source). Loaders normalise with meta's mean/std.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from dsv.data.core import class_counts, split_validation
from dsv.data.registry import DataConfig, load_dataset, resize_images
from tasks.artifacts import save_tensors
from tasks.atomic import write_json
from tasks.figures import image_grid
from tasks.output import StageOutput, finish
from tasks.paths import Paths
from tasks.tracking import StageLog

if TYPE_CHECKING:
    from tasks.config import PipelineConfig


def run(cfg: PipelineConfig, paths: Paths, log: StageLog) -> StageOutput:
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

    pool_source = "none (not an image dataset)"
    pool_x = torch.zeros((0, *ds.input_shape))
    if len(ds.input_shape) == 3:
        pool_ds = load_dataset(DataConfig(name=p.init_pool.dataset, root=p.init_pool.root))
        if pool_ds.train_x.dim() != 4:
            raise ValueError(f"prepare.init_pool.dataset = {p.init_pool.dataset!r} is not an image dataset")
        g = torch.Generator().manual_seed(p.init_pool.seed)
        order = torch.randperm(pool_ds.train_x.shape[0], generator=g)
        if p.init_pool.size is not None:
            order = order[: p.init_pool.size]
        pool_x = resize_images(pool_ds.train_x[order], tuple(ds.input_shape))  # type: ignore[arg-type]
        pool_source = f"{p.init_pool.dataset}: {pool_ds.source}"
    save_tensors(paths.init_pool, {"x": pool_x})

    meta = {
        "name": ds.name,
        "classes": list(ds.classes),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "features": list(ds.features),
        "input_shape": list(ds.input_shape),
        "source": ds.source,
        "init_pool_source": pool_source,
        "train_per_class": class_counts(train.train_y, ds.num_classes),
        "test_per_class": class_counts(ds.test_y, ds.num_classes),
    }
    write_json(paths.data_meta, meta)
    if len(ds.input_shape) == 3:
        log.figure(image_grid(train.train_x, train.train_y, ds.classes, f"{ds.name}: training images"),
                   "prepare/train_grid.png")
    metrics = {
        "n_train": int(train.train_y.numel()),
        "n_val": int(val_y.numel()),
        "n_test": int(ds.test_y.numel()),
        "n_init_pool": int(pool_x.shape[0]),
        "num_classes": ds.num_classes,
        "min_train_per_class": min(meta["train_per_class"]),
    }
    log.metrics(metrics)
    files = [paths.train, paths.val, paths.test, paths.init_pool, paths.data_meta]
    return finish("prepare", cfg, paths, files, metrics, started)


def _normalization(mean: tuple[float, ...] | None, std: tuple[float, ...] | None, data_mean: torch.Tensor,
                   data_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``prepare.normalize`` when set (one value per channel or feature), else the training split's."""
    if mean is None or std is None:
        return data_mean, data_std
    if len(mean) != data_mean.numel():
        unit = "channels" if data_mean.numel() in (1, 3) else "features"
        raise ValueError(f"prepare.normalize has {len(mean)} values but the data has {data_mean.numel()} {unit}")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
