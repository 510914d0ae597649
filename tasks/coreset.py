"""Stage ``coreset``: λ for every real training image (the paper's selection use, §5.2).

Outputs: ``artifacts/coreset/lambdas.parquet`` (``index`` into the prepared training split,
``label``, ``lam``, ``rank`` within class, 0 = highest), ``trace.json`` (relative residual per batch);
``metrics/coreset.json`` with per-class Σλ, the teacher's per-class test accuracy and their Pearson
correlation (paper §5.1 reports ρ = 0.783 on CIFAR-10).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dsv.data.core import per_class_indices
from dsv.lam import LambdaConfig, LambdaEvent, LambdaResult, class_lambda_sums, fit_lambdas, pearson
from dsv.train import evaluate
from tasks.artifacts import PARAMS_HASH_KEY, load_model, load_split, read_data_meta, write_lambdas_parquet
from tasks.atomic import write_json
from tasks.figures import lam_histograms, scatter_labeled
from tasks.output import StageConfig, StageOutput, device_of, finish
from tasks.paths import Paths
from tasks.plain import params_hash, to_plain
from tasks.progress import Bar
from tasks.ranges import GE1, SEED, register
from tasks.tracking import StageLog


@dataclass(frozen=True)
class CoresetConfig:
    """Stage ``coreset``: λ of every real training image (selection use of the paper).

    Attributes:
        lam: λ fitting settings (``dsv.lam.LambdaConfig``).
        seed: seeds the stratified batching and the subset.
        per_class: fit λ on a seeded subset of at most this many training images per class (default 300; a
            class with fewer gives all of its images; None = the whole training split). Fitting cost grows
            linearly with the images (λ-fitting throughput: benchmarks/results/perf.md).
    """

    lam: LambdaConfig = field(default_factory=LambdaConfig)
    seed: int = 0
    per_class: int | None = 300

    def __post_init__(self) -> None:
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1 or null, got {self.per_class}")


register(CoresetConfig, {"seed": SEED, "per_class": GE1})


class Config(StageConfig, Protocol):
    @property
    def coreset(self) -> CoresetConfig: ...


def check(cfg: Any, data: dict[str, Any] | None = None) -> list[str]:
    """With ``data`` (meta.json): the λ fit's per-sample gradient matrix (batch × P floats) against
    ``coreset.lam.max_bytes``, known before the teacher is trained (P from the architecture)."""
    lam, classes = cfg.coreset.lam, len(data["classes"]) if data is not None else 0
    if data is None or lam.param_subset != "all" or data.get("input_shape") is None or classes < 2:
        return []
    from dsv.models import build_model

    try:
        p_total = sum(p.numel() for p in build_model(cfg.pretrain.model, tuple(data["input_shape"]), classes)
                      .parameters())
    except ValueError:
        return []
    n_train = sum(data["train_per_class"])
    n = min(n_train, cfg.coreset.per_class * classes) if cfg.coreset.per_class else n_train
    m = min(lam.batch_size, n)
    m_max = math.ceil(n / max(1, round(n / m))) if m else 0
    need = m_max * p_total * 4
    if need > lam.max_bytes:
        return [f"coreset.lam.batch_size = {lam.batch_size}: a batch of {m_max} per-sample gradients of the "
                f"{p_total}-parameter teacher needs {need / 1e9:.1f} GB > coreset.lam.max_bytes = "
                f"{lam.max_bytes / 1e9:.1f} GB; lower the batch size or set coreset.lam.param_subset: last"]
    return []


def run(cfg: Config, paths: Paths, log: StageLog) -> StageOutput:
    """Fit λ on the training split; see the module docstring."""
    started = time.perf_counter()
    device = device_of(cfg)
    meta = read_data_meta(paths.data_meta)
    teacher = load_model(paths.teacher, paths.teacher_spec, device)
    x, y = load_split(paths.train, meta)
    index = torch.arange(y.numel())
    n_train = int(y.numel())  # the teacher's training set: λ is reported on its scale
    if cfg.coreset.per_class is not None:
        g = torch.Generator().manual_seed(cfg.coreset.seed)
        index = per_class_indices(y, cfg.coreset.per_class, meta.num_classes, g, at_most=True).sort().values
        x, y = x[index], y[index]
    trace: list[dict[str, float]] = []
    bar = Bar(cfg.runtime.progress, 0, "coreset λ", unit="batch")

    def on_batch(ev: LambdaEvent) -> None:
        trace.append({"batch": ev.batch, "residual_l2": ev.residual_l2})
        log.metric("residual_l2", ev.residual_l2, step=ev.batch)
        bar.total(ev.total_batches)
        bar.to(ev.batch, residual=ev.residual_l2)

    with bar:
        # λ on the teacher's training-set scale: the teacher saw the whole split, not the subset.
        res = fit_lambdas(teacher, x, y, cfg.coreset.lam, seed=cfg.coreset.seed, callback=on_batch,
                          n_train=n_train)
    write_lambdas_parquet(
        paths.lambdas_parquet, index=index, label=y, lam=res.lam, rank=res.rank, support=res.support,
        margin=res.margin, support_rank=res.support_rank,
        features=meta.denormalize(x) if meta.features else None, feature_names=meta.features,
        metadata={PARAMS_HASH_KEY: params_hash(to_plain(cfg.coreset)), "dsv.dataset": meta.name},
    )
    write_json(paths.coreset_trace, trace)

    metrics = _metrics(res, y, evaluate(teacher, *load_split(paths.test, meta), meta.num_classes).per_class,
                       meta.classes, log)
    return finish("coreset", cfg, paths, [paths.lambdas_parquet, paths.coreset_trace], metrics, started,
                  device=device)


def _metrics(res: LambdaResult, y: torch.Tensor, teacher_acc: list[float], classes: tuple[str, ...], log: StageLog
             ) -> dict[str, Any]:
    """λ's summary and the paper's §5.1 correlation of per-class Σλ with the teacher's per-class accuracy (and
    its figures)."""
    per_class_acc = torch.tensor(teacher_acc)
    sums = class_lambda_sums(res.lam, y, len(classes))
    rho = pearson(sums, per_class_acc)
    support_sums = class_lambda_sums(res.support, y, len(classes)) if res.support is not None else None
    metrics = {
        "n": int(y.numel()),
        "lam_mean": float(res.lam.mean()),
        "lam_negative_fraction": float((res.lam < 0).float().mean()),
        "residual_l2_mean": float(torch.tensor(res.residual_l2).mean()) if res.residual_l2 else float("nan"),
        "pearson_sum_lam_vs_acc": rho,
        "pearson_sum_support_vs_acc": pearson(support_sums, per_class_acc) if support_sums is not None else float("nan"),
        "sum_lam_per_class": [float(v) for v in sums],
        "teacher_acc_per_class": [float(v) for v in per_class_acc],
    }
    log.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    log.figure(lam_histograms(res.lam, y, classes), "coreset/lambda_hist.png")
    log.figure(scatter_labeled(sums.tolist(), per_class_acc.tolist(), classes, "Σλ of the class",
                               "teacher test accuracy", f"per-class Σλ vs accuracy (ρ = {rho:.3f})"),
               "coreset/sum_lambda_vs_acc.png")
    return metrics
